"""posttrain's offline lm-eval task pack (YAML configs, `utils.py`, data under `data/`).

lm-eval reads this folder through `TaskManager(include_path=...)`; nothing here downloads.
"""
