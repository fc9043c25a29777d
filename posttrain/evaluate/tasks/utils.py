"""Data loading and scoring for posttrain's offline task pack (referenced from the YAMLs)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data"


def load_splits(splits: dict[str, str], **_metadata: Any) -> dict[str, Any]:
    """lm-eval `custom_dataset`: the JSONL files next to this module, one per split. Paths are
    resolved here rather than in the YAML because lm-eval would resolve them against the cwd."""
    import datasets

    return {split: datasets.Dataset.from_list(_read_jsonl(DATA / name)) for split, name in splits.items()}


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open() as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9][\w'-]*", text)


def _has_word(text: str, word: str) -> bool:
    return re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE) is not None


def _is_json(text: str) -> bool:
    body = re.sub(r"^```(?:json)?\s*|\s*```$", "", text.strip())
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


# Each check takes the response and the instruction's own arguments.
CHECKS = {
    "lowercase": lambda r: _has_letters(r) and r == r.lower(),
    "uppercase": lambda r: _has_letters(r) and r == r.upper(),
    "bullets": lambda r, n: len(re.findall(r"^\s*[-*] \S", r, flags=re.MULTILINE)) == n,
    "include": lambda r, word: _has_word(r, word),
    "exclude": lambda r, word: not _has_word(r, word),
    "max_words": lambda r, n: 0 < len(_words(r)) <= n,
    "min_words": lambda r, n: len(_words(r)) >= n,
    "start_with": lambda r, phrase: r.strip().lower().startswith(phrase.lower()),
    "end_with": lambda r, phrase: r.strip().lower().endswith(phrase.lower()),
    "no_commas": lambda r: bool(r.strip()) and "," not in r,
    "json": _is_json,
    "quoted": lambda r: len(r.strip()) > 1 and r.strip()[0] == r.strip()[-1] == '"',
    "title": lambda r: re.search(r"<<[^\n<>]+>>", r) is not None,
}


def follows(response: str, instruction: dict[str, Any]) -> bool:
    """Whether `response` follows one instruction ({"type": ..., its arguments})."""
    args = {k: v for k, v in instruction.items() if k != "type" and v is not None}
    return bool(CHECKS[instruction["type"]](response, **args))


def process_ifeval(doc: dict[str, Any], results: list[str]) -> dict[str, Any]:
    followed = [follows(results[0], instruction) for instruction in doc["instructions"]]
    return {"prompt_level_acc": float(all(followed)), "inst_level_acc": followed}


def mean_of_all(items: list[list[bool]]) -> float:
    """Instruction-level accuracy: every instruction of every prompt counts once."""
    flat = [x for per_prompt in items for x in per_prompt]
    return sum(flat) / len(flat)
