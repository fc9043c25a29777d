"""vLLM engines for registered checkpoints behind one OpenAI-compatible front door."""
