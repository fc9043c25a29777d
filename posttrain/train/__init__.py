"""Post-training on TRL + PEFT: SFT, DPO, GRPO, merge, quantize; every output registered."""
