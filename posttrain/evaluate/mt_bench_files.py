"""MT-Bench's file formats, as FastChat's llm_judge writes them: questions (`question_id`,
`category`, `turns`, optional `reference`) and judge prompts (`name`, `type`, `system_prompt`,
`prompt_template`, `output_format`), one JSON object a line. Ours ship in `data/`; a bad line is
reported as `file:line: what is wrong`."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

DATA = Path(__file__).parent / "data"
QUESTIONS = DATA / "mt_bench_questions.jsonl"
JUDGE_PROMPTS = DATA / "judge_prompts.jsonl"
# Which prompt grades which turn, with or without a reference answer.
PROMPT_NAMES = {
    ("single", 1, False): "single-v1", ("single", 1, True): "single-math-v1",
    ("single", 2, False): "single-v1-multi-turn", ("single", 2, True): "single-math-v1-multi-turn",
    ("pairwise", 1, False): "pair-v2", ("pairwise", 1, True): "pair-math-v1",
    ("pairwise", 2, False): "pair-v2-multi-turn", ("pairwise", 2, True): "pair-math-v1-multi-turn",
}
PLACEHOLDERS = {"question", "answer", "answer_a", "answer_b", "ref_answer_1", "ref_answer_2", "question_1",
                "question_2", "answer_1", "answer_2", "answer_a_1", "answer_a_2", "answer_b_1", "answer_b_2"}


@dataclass(frozen=True)
class Question:
    question_id: int | str
    category: str
    turns: tuple[str, ...]
    reference: tuple[str, ...] | None = None


@dataclass(frozen=True)
class JudgePrompt:
    name: str
    type: str  # "single" or "pairwise"
    system_prompt: str
    prompt_template: str


def _jsonl_objects(path: Path, what: str):
    """(line number, object) for each non-empty line; `file:line: ...` errors."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise PosttrainError(f"{path}: cannot read the {what} file ({exc.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise PosttrainError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise PosttrainError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def load_questions(path: str | Path | None = None) -> list[Question]:
    """MT-Bench questions from a JSONL file (default: ours), checked line by line."""
    path = Path(path) if path else QUESTIONS
    questions, seen = [], {}
    for number, obj in _jsonl_objects(path, "question"):
        at = f"{path}:{number}"
        if "question_id" not in obj:
            raise PosttrainError(f"{at}: no question_id (is this an MT-Bench question file?)")
        qid = obj["question_id"]
        if not isinstance(qid, (int, str)) or isinstance(qid, bool):
            raise PosttrainError(f"{at}: question_id must be an integer or a string")
        if qid in seen:
            raise PosttrainError(f"{at}: question_id {qid} already used on line {seen[qid]}")
        seen[qid] = number
        if not isinstance(obj.get("category"), str) or not obj["category"]:
            raise PosttrainError(f"{at}: category must be a non-empty string")
        turns = obj.get("turns")
        if not _strings(turns) or not 1 <= len(turns) <= 2 or not all(t.strip() for t in turns):
            raise PosttrainError(f"{at}: turns must be a list of 1 or 2 non-empty strings")
        reference = obj.get("reference")
        if reference is not None and (not _strings(reference) or len(reference) < len(turns)):
            raise PosttrainError(f"{at}: reference must be a list of strings, one per turn")
        questions.append(Question(qid, obj["category"], tuple(turns), tuple(reference) if reference else None))
    if not questions:
        raise PosttrainError(f"{path}: no questions")
    return questions


def load_judge_prompts(path: str | Path | None = None) -> dict[str, JudgePrompt]:
    """Judge prompt templates in FastChat's `judge_prompts.jsonl` format (default: ours)."""
    path = Path(path) if path else JUDGE_PROMPTS
    prompts = {}
    for number, obj in _jsonl_objects(path, "judge prompt"):
        at = f"{path}:{number}"
        for key in ("name", "type", "system_prompt", "prompt_template"):
            if not isinstance(obj.get(key), str):
                raise PosttrainError(f"{at}: {key} must be a string")
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(obj["prompt_template"]) if name is not None}
        except ValueError as exc:
            raise PosttrainError(f"{at}: prompt_template: {exc}") from None
        if unknown := fields - PLACEHOLDERS:
            raise PosttrainError(f"{at}: prompt_template uses unknown placeholders {sorted(unknown)}")
        prompts[obj["name"]] = JudgePrompt(obj["name"], obj["type"], obj["system_prompt"], obj["prompt_template"])
    if missing := sorted(set(PROMPT_NAMES.values()) - set(prompts)):
        raise PosttrainError(f"{path}: missing judge prompts {', '.join(missing)}")
    return prompts
