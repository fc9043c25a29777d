"""train/: post-training stages on TRL + PEFT, each producing a registered checkpoint.

    sft.py    supervised fine-tuning (LoRA / QLoRA / full, assistant-only loss, packing,
              thinking-mode fusion)            -> SFTRecipe, train_sft
    dpo.py    direct preference optimization  -> DPORecipe, train_dpo
    grpo.py   GRPO with rule-based rewards     -> GRPORecipe, train_grpo (rewards.py)
    merge.py  adapter into its base            -> merge
    quantize.py  llm-compressor schemes vLLM loads -> quantize
    data.py   the data formats, validated      base.py  what the methods share
"""
