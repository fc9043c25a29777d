"""lm-eval benchmarks, MT-Bench with an LLM judge, results history and the nightly report."""
