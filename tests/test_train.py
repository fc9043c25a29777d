"""train/ on the tiny Qwen3 (real TRL trainers, a few steps each): SFT, DPO, GRPO, merge,
quantize, resume, masking, bad input; then SmolLM2 with the shipped recipe, and 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.errors import PosttrainError
from posttrain.train.base import finish, has_cuda, prepare
from posttrain.train.dpo import DPORecipe, train_dpo
from posttrain.train.grpo import GRPORecipe, train_grpo
from posttrain.train.merge import merge
from posttrain.train.sft import SFTRecipe, sft_trainer, train_sft

from conftest import TINY_LORA, build_tiny_lora

ROOT = Path(__file__).parent.parent
FAST = ["training.max_steps=2", "training.batch_size=2", "max_length=256"]


def recipe(cls, *overrides: str, model: str = "tiny-qwen3", path: str | None = None):
    return cls.load(path, [f"model={model}", *FAST, *overrides])


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, timeout=600)


def test_assistant_only_loss_labels_exactly_the_assistant_tokens(registry, tiny, tmp_path):
    conversation = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi there"},
                    {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Name a colour"},
                    {"role": "assistant", "content": "Blue."}]
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"messages": conversation}) + "\n")
    sft = recipe(SFTRecipe, "output=mask-probe", f"data.0.path={data}")
    prepared = prepare(sft, "sft", registry)
    trainer = sft_trainer(sft, prepared)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    # Independently: the character spans of each reply (its <|im_end|> included) in the rendered
    # conversation, and which tokens fall inside them.
    text = prepared.tokenizer.apply_chat_template(conversation, tokenize=False)
    spans = [(i, i + len(reply)) for reply in ("Hello.<|im_end|>", "Blue.<|im_end|>")
             for i in [text.index("<|im_start|>assistant\n" + reply) + len("<|im_start|>assistant\n")]]
    encoded = prepared.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    assert encoded["input_ids"] == ids
    for index, ((start, end), token, label) in enumerate(zip(encoded["offset_mapping"], ids, labels)):
        in_reply = any(a <= start and end <= b for a, b in spans)
        assert label == (token if in_reply else -100), f"token {index} {text[start:end]!r}"
    assert sum(label != -100 for label in labels) == len(prepared.tokenizer("Hello.<|im_end|>Blue.<|im_end|>",
                                                                            add_special_tokens=False)["input_ids"])


def test_sft_lora_registers_an_adapter_with_lineage_data_hash_and_card(registry, tiny):
    row = train_sft(recipe(SFTRecipe, "output=tiny-sft-lora"), registry)
    assert (row.stage, row.kind, row.parent) == ("sft", "adapter", "tiny-qwen3")
    assert row.datasets[0]["path"].endswith("chat.jsonl") and len(row.datasets[0]["sha256"]) == 64
    assert row.recipe["lora"]["target_modules"] == "all-linear" and row.recipe["training"]["max_steps"] == 2
    folder = Path(row.path)
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "README.md"} <= \
        {p.name for p in folder.iterdir()}
    assert "tiny-sft-lora <- tiny-qwen3" in (folder / "README.md").read_text()
    run = registry.settings.runs_dir / "tiny-sft-lora"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and "tokens_per_second" in steps[1]
    assert any((run / "tensorboard").iterdir()) and not list(run.glob("checkpoint-*"))
    adapter = json.loads((folder / "adapter_config.json").read_text())
    assert {"q_proj", "v_proj", "gate_proj", "down_proj"} <= {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]}


def test_sft_full_fine_tuning_with_packing_registers_a_full_checkpoint(registry, tiny):
    sft = recipe(SFTRecipe, "output=tiny-sft-full", "method=full", "packing=true")
    prepared = prepare(sft, "sft", registry)
    trainer = sft_trainer(sft, prepared)
    tokenizer, packed = prepared.tokenizer, trainer.train_dataset
    lengths = [min(len(tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]),
                   256) for row in prepared.data.rows]
    assert len(packed) < len(prepared.data.rows) == 64  # several conversations per training sequence
    assert all(len(ids) <= 256 and sum(seq) == len(ids) for ids, seq in zip(packed["input_ids"], packed["seq_lengths"]))
    assert sorted(n for seq in packed["seq_lengths"] for n in seq) == sorted(lengths)  # each one whole, once
    row = finish(trainer, prepared, sft, stage="sft")
    assert (row.stage, row.kind) == ("sft", "full")
    assert (Path(row.path) / "model.safetensors").exists() and (Path(row.path) / "chat_template.jinja").exists()


@pytest.mark.skipif(has_cuda(), reason="checks the CPU's mixed precision")
def test_bf16_on_a_cpu_trains_with_autocast_over_fp32_weights(registry, tiny):
    import torch

    bf16 = recipe(SFTRecipe, "output=tiny-sft-bf16", "training.precision=bf16")
    prepared = prepare(bf16, "sft", registry)
    assert {p.dtype for p in prepared.model.parameters()} == {torch.float32}
    trainer = sft_trainer(bf16, prepared)
    assert trainer.args.bf16
    assert finish(trainer, prepared, bf16, stage="sft").kind == "adapter"
    with pytest.raises(PosttrainError, match="fp16 needs a GPU"):
        prepare(recipe(SFTRecipe, "output=tiny-sft-fp16", "training.precision=fp16"), "sft", registry)


def test_thinking_fusion_recipe_trains_on_both_modes(registry, tiny):
    from posttrain.registry import file_sha256
    from posttrain.train.data import EMPTY_THINK, builtin_dir

    fusion = recipe(SFTRecipe, "output=tiny-fusion", path=str(ROOT / "recipes/sft-thinking-fusion.yaml"))
    prepared = prepare(fusion, "sft", registry)
    trainer = sft_trainer(fusion, prepared)
    modes = []
    for example in trainer.train_dataset:
        text = prepared.tokenizer.decode(example["input_ids"])
        learned = prepared.tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"])
                                             if label != -100])
        mode = "think" if " /think<|im_end|>" in text else "no_think" if " /no_think<|im_end|>" in text else None
        modes.append(mode)
        if mode == "think":  # its trace is learned, right after the switch
            assert learned.startswith("<think>\n") and not learned.startswith(EMPTY_THINK), learned[:80]
        else:  # an empty think block is learned before the direct answer
            assert EMPTY_THINK in learned, learned[:80]
    assert modes.count("think") == 24 and modes.count("no_think") == 24  # all of thinking.jsonl, chat's limit
    assert modes[:24] != ["think"] * 24  # the two sources are interleaved
    row = finish(trainer, prepared, fusion, stage="sft")
    assert row.datasets == [{"path": str(builtin_dir() / name), "sha256": file_sha256(builtin_dir() / name)}
                            for name in ("thinking.jsonl", "chat.jsonl")]
    assert [(d["thinking"], d["limit"]) for d in row.recipe["data"]] == [("think", None), ("no_think", 24)]


def test_an_interrupted_run_resumes_from_its_last_checkpoint(registry, tiny):
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise KeyboardInterrupt

    sft = recipe(SFTRecipe, "output=tiny-resumed", "training.max_steps=4", "training.save_steps=2")
    with pytest.raises(KeyboardInterrupt):
        train_sft(sft, registry, callbacks=[Crash()])
    run = registry.settings.runs_dir / "tiny-resumed"
    assert registry.find("tiny-resumed") is None and not registry.model_dir("tiny-resumed").exists()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    with pytest.raises(PosttrainError, match="interrupted run .*checkpoint-2.*--resume"):
        train_sft(sft, registry)
    row = train_sft(sft, registry, resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps if s] == [1, 2, 3, 4, 4]  # 1-2, crash, 3-4 resumed (+ the final summary)
    assert row.name == "tiny-resumed" and not list(run.glob("checkpoint-*"))


def test_dpo_on_the_arena_export_starts_from_a_merged_adapter(registry, tiny, tmp_path):
    build_tiny_lora(registry)
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Question {i}?"}], "chosen": [{"role": "assistant", "content": "Yes."}],
        "rejected": [{"role": "assistant", "content": "No!"}], "meta": {"battle_id": i, "source": "arena"}}) + "\n"
        for i in range(4)))
    row = train_dpo(recipe(DPORecipe, "output=tiny-dpo", f"data.0.path={prefs}", model=TINY_LORA), registry)
    merged = registry.get(f"{TINY_LORA}-merged")
    assert (row.stage, row.kind, row.parent) == ("dpo", "adapter", merged.name)
    assert [c.name for c in registry.lineage(row.name)] == ["tiny-dpo", merged.name, TINY_LORA, "tiny-qwen3"]
    assert row.datasets[0]["path"] == str(prefs)


def test_grpo_with_rule_rewards_registers(registry, tiny):
    row = train_grpo(recipe(GRPORecipe, "output=tiny-grpo", "max_completion_length=8", "num_generations=2",
                            "data.0.path=builtin:mixed_prompts"), registry)
    assert (row.stage, row.kind) == ("grpo", "adapter")
    logged = [json.loads(line) for line in (registry.settings.runs_dir / "tiny-grpo" / "metrics.jsonl").open()]
    assert "rewards/math_answer/mean" in logged[0] and "rewards/think_format/mean" in logged[0]


def test_merged_logits_equal_the_adapters(registry, tiny):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = build_tiny_lora(registry)
    merged = merge(adapter.name, "tiny-merge-check", registry)
    assert (merged.stage, merged.kind, merged.parent) == ("merge", "full", adapter.name)
    ids = torch.tensor([[1, 500, 42, 7, 900, 3, 11]])
    base = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, adapter.path).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged.path, dtype=torch.float32).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.float32).eval()(ids).logits
    assert (got - expected).abs().max().item() < 1e-4
    assert (plain - expected).abs().max().item() > 1e-2  # the adapter really changes the model
    with pytest.raises(PosttrainError, match="is a full checkpoint, not an adapter"):
        merge(tiny.name, registry=registry)


def test_merge_saves_a_transformers_4_bf16_base_in_bf16(registry, tiny, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "bf16-base"
    AutoModelForCausalLM.from_pretrained(tiny.path, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(tiny.path).save_pretrained(base)
    config = json.loads((base / "config.json").read_text())
    config["torch_dtype"] = config.pop("dtype")  # the key transformers 4.x wrote
    assert config["torch_dtype"] == "bfloat16"
    (base / "config.json").write_text(json.dumps(config))
    registry.add("tiny-bf16-v4", base, stage="base")
    lora = LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(tmp_path / "lora")
    registry.add("tiny-bf16-v4-lora", tmp_path / "lora", stage="sft", kind="adapter", parent="tiny-bf16-v4")
    merged = merge("tiny-bf16-v4-lora", registry=registry)
    with safe_open(Path(merged.path) / "model.safetensors", "pt") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"BF16"}
    assert merged.recipe["dtype"] == "bfloat16"


@pytest.mark.skipif(has_cuda(), reason="on a CUDA machine qlora runs")
def test_qlora_without_cuda_says_what_it_needs(registry, tiny):
    with pytest.raises(PosttrainError, match="qlora .* needs a CUDA GPU"):
        train_sft(recipe(SFTRecipe, "output=tiny-qlora", "method=qlora"), registry)


def test_a_malformed_data_line_stops_the_cli_before_training(session_home, tiny, tmp_path):
    data = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n" + '{"messages": [}\n')
    result = cli("train", "sft", "--set", "model=tiny-qwen3", "--set", "output=tiny-bad", "--set", f"data.0.path={data}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"posttrain: error: {data}:3: invalid JSON")
    assert not (session_home / "models" / "tiny-bad").exists() and not (session_home / "runs" / "tiny-bad").exists()
    assert "tiny-bad" not in cli("models", "list").stdout
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("model: tiny-qwen3\nlora:\n  r: many\n")
    bad = cli("train", "sft", "--recipe", str(recipe_file))
    assert bad.returncode == 2 and f"{recipe_file}:3: lora.r: Input should be a valid integer" in bad.stderr


@pytest.mark.slow
def test_two_cpu_processes_train_with_accelerate(session_home, tiny):
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "recipes/accelerate/cpu-ddp.yaml"), "-m", "posttrain", "train", "sft", "--set", "model=tiny-qwen3",
         "--set", "output=tiny-ddp", "--set", "training.max_steps=2", "--set", "training.batch_size=2"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("registered tiny-ddp") == 1  # only the main process registers
    logged = [json.loads(line) for line in (session_home / "runs/tiny-ddp/metrics.jsonl").open()]
    assert logged[0]["num_tokens"] > 0 and [s["step"] for s in logged if "loss" in s] == [1, 2]


@pytest.mark.slow
def test_the_sft_recipe_tunes_smollm2_to_answer_in_the_chat_format(registry, smollm2):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    row = train_sft(SFTRecipe.load(ROOT / "recipes/sft.yaml"), registry)
    assert (row.name, row.parent) == ("smollm2-135m-instruct-sft", smollm2.name)
    tokenizer = AutoTokenizer.from_pretrained(row.path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2.path, dtype=torch.float32), row.path)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0][prompt["input_ids"].shape[1]:]
    answer = tokenizer.decode(out)
    assert answer.endswith("<|im_end|>") and "Paris" in answer, answer


@pytest.mark.slow
def test_quantized_checkpoints_are_registered_with_size_and_perplexity_and_vllm_serves_them(registry, tiny):
    import openai

    from posttrain.serve.app import start_front_door
    from posttrain.train.quantize import QuantizeRecipe, quant_python, quantize

    try:
        quant_python()
    except PosttrainError as exc:
        pytest.skip(str(exc))
    row = quantize(QuantizeRecipe.load(None, ["model=tiny-qwen3", "calibration_samples=8"]), registry)
    report = row.recipe["report"]
    assert (row.name, row.stage, row.parent) == ("tiny-qwen3-w8a8-int8", "quantize", "tiny-qwen3")
    assert report["bytes_after"] < report["bytes_before"] and report["ppl_after"] > 0
    config = json.loads((Path(row.path) / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    with start_front_door([row.name], registry=registry) as door:
        reply = openai.OpenAI(base_url=door.base_url, api_key="none").completions.create(
            model=row.name, prompt="Hello", max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4
    with pytest.raises(PosttrainError, match="already registered"):
        quantize(QuantizeRecipe.load(None, ["model=tiny-qwen3"]), registry)
