"""Whether a checkpoint thinks (reasons in a `<think>` block before it answers), and in which
format: the registry records it (`Checkpoint.thinking`) and the front door serves by it.

    qwen3        Qwen3's thinking-mode fusion: thinks by default, answers directly when the chat
                 template gets `enable_thinking=False` (or the user turn ends in `/no_think`)
    deepseek_r1  always thinks (DeepSeek-R1, Qwen3-Thinking-2507, posttrain's R1-style training)

posttrain writes one ChatML template into every model it builds, with Qwen3's
`enable_thinking=False` switch whether the model learned to think or not, so for those the
template says nothing and the lineage decides: what the checkpoint was trained on, else what its
parent did. A template posttrain did not write (a checkpoint from the Hub) is read as written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMATS = ("qwen3", "deepseek_r1")
# Enough records to tell a source of reasoning traces from chat data without reading it all.
SCANNED_RECORDS = 64


def detect_thinking(path: str | Path, recipe: dict[str, Any] | None, parent_thinking: str | None) -> str | None:
    """A new checkpoint's format: what its training taught, else what its chat template says,
    else its parent's (a DPO, merge or quantization of a thinking model still thinks)."""
    return taught_thinking(recipe or {}) or template_thinking(Path(path)) or parent_thinking


def taught_thinking(recipe: dict[str, Any]) -> str | None:
    """From a training recipe: data marked `thinking: think|no_think` is Qwen3's fusion; reasoning
    traces without the switch (or GRPO's think_format reward) teach a model that always thinks."""
    sources = [d for d in recipe.get("data") or [] if isinstance(d, dict)]
    if any(d.get("thinking") for d in sources):
        return "qwen3"
    rewards = {r.get("name") for r in recipe.get("rewards") or [] if isinstance(r, dict)}
    if "think_format" in rewards or any(_has_traces(str(d.get("path", ""))) for d in sources):
        return "deepseek_r1"
    return None


def _has_traces(source: str) -> bool:
    """Whether the first records of a local JSON Lines source carry reasoning: an assistant
    `reasoning` field or a non-empty `<think>` block (an empty one is a /no_think answer)."""
    from posttrain.train.data import BUILTIN, builtin_dir

    path = builtin_dir() / f"{source[len(BUILTIN):]}.jsonl" if source.startswith(BUILTIN) else Path(source)
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    with path.open(encoding="utf-8", errors="replace") as lines:
        for _, line in zip(range(SCANNED_RECORDS), lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if any(has_trace(m) for m in record.get("messages") or [] if isinstance(m, dict)
                   and m.get("role") == "assistant"):
                return True
    return False


def has_trace(reply: dict[str, Any]) -> bool:
    """Whether an assistant message carries reasoning: a non-empty `reasoning` (or
    `reasoning_content`) field or a non-empty leading `<think>` block (an empty one is a
    /no_think answer: the model did not think)."""
    from posttrain.train.data import split_thinking

    if any(isinstance(reply.get(key), str) and reply[key].strip() for key in ("reasoning", "reasoning_content")):
        return True
    return isinstance(reply.get("content"), str) and bool(split_thinking(reply["content"])[0])


MODE_MISMATCH = "mode_mismatch"  # the meta key, and what the export summaries count


def mode_mismatch(pair: dict[str, Any]) -> bool:
    """A preference pair whose one side thought and the other did not: DPO on it would teach
    thinking (or not) as much as the better answer."""
    return has_trace(pair["chosen"][-1]) != has_trace(pair["rejected"][-1])


def template_thinking(folder: Path) -> str | None:
    """From a chat template posttrain did not write: a generation prompt that opens a think block
    is a model that always thinks; one that `enable_thinking=False` changes is Qwen3's switch."""
    template = chat_template(folder)
    if template is None or "think" not in template or template in _posttrain_templates():
        return None
    prompt = _generation_prompt(template)
    if "<think>" in prompt and "</think>" not in prompt:
        return "deepseek_r1"
    return "qwen3" if _generation_prompt(template, enable_thinking=False) != prompt else None


def chat_template(folder: Path) -> str | None:
    """The default chat template a tokenizer folder holds (transformers saves it as
    chat_template.jinja now, inside tokenizer_config.json before)."""
    if (jinja := folder / "chat_template.jinja").is_file():
        return jinja.read_text(encoding="utf-8")
    try:
        template = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError):
        return None
    if isinstance(template, list):  # named templates: the default one
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _posttrain_templates() -> set[str]:
    from posttrain.models import SMOLLM2_SYSTEM, chatml_template

    return {chatml_template(), chatml_template(SMOLLM2_SYSTEM)}


def _generation_prompt(template: str, **kwargs: Any) -> str:
    """What the template renders after a user turn when asked for the assistant's reply."""
    from transformers.utils.chat_template_utils import render_jinja_template

    marker = "PosttrainUserTurn"
    rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": marker}]],
                                        chat_template=template, add_generation_prompt=True, **kwargs)
    return rendered[0].rpartition(marker)[2]


MISMATCH_DROPPED = "mode-mismatched (one side thought, the other did not)"


def flag_mode_mismatch(pair: dict[str, Any]) -> bool:
    """Whether a pair is mode-mismatched; if so its meta says so (`mode_mismatch: true`), so a
    kept pair can still be filtered out later."""
    if not mode_mismatch(pair):
        return False
    pair.setdefault("meta", {})[MODE_MISMATCH] = True
    return True


def mismatch_line(kept: int) -> str:
    """The export summaries' line for mode-mismatched pairs that were kept."""
    return (f"  {kept} of them mode-mismatched: one side thought, the other did not (meta.{MODE_MISMATCH}; "
            "--drop-mode-mismatch leaves them out)")
