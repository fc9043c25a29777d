"""Data loading and scoring for posttrain's own tasks: the offline pack and the sandboxed humaneval
(referenced from the YAMLs)."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path
from typing import Any

from posttrain.errors import PosttrainError

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


HUMANEVAL_FILES = ("HumanEval.jsonl.gz", "HumanEval.jsonl")
HUMANEVAL_FIELDS = ("task_id", "prompt", "test", "entry_point")
# HumanEval's own harness allows 3 s a problem; here every call crosses a pipe, on shared machines.
HUMANEVAL_TIMEOUT_S = 10.0


def load_humaneval(local_copy: str | None = None, **_metadata: Any) -> dict[str, Any]:
    """lm-eval `custom_dataset` of `humaneval`: the original release's file in `local_copy`, the
    folder `posttrain eval bench --data-dir` found. Checks for the sandbox first, so that a
    machine without one fails before the model generates anything."""
    import datasets

    from posttrain import sandbox

    sandbox.require()
    if local_copy is None:
        raise PosttrainError("humaneval reads a local copy of its data: pass --data-dir DIR, with "
                             "DIR/humaneval/HumanEval.jsonl.gz (the file github.com/openai/human-eval ships)")
    folder = Path(local_copy)
    path = next((folder / name for name in HUMANEVAL_FILES if (folder / name).is_file()), None)
    if path is None:
        raise PosttrainError(f"{folder}: no {' or '.join(HUMANEVAL_FILES)} in it "
                             f"(HumanEval's data file, as github.com/openai/human-eval ships it)")
    return {"test": datasets.Dataset.from_list(read_humaneval(path))}


def read_humaneval(path: Path) -> list[dict[str, str]]:
    """HumanEval's problems from its JSONL file (gzipped or not); a bad record is a one-line error
    naming its line."""
    problems = []
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    problems.append(_humaneval_problem(line, f"{path}:{number}"))
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise PosttrainError(f"{path}: cannot read it: {exc}") from None
    if not problems:
        raise PosttrainError(f"{path}: no problems in it")
    return problems


def _humaneval_problem(line: str, where: str) -> dict[str, str]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PosttrainError(f"{where}: not JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(record, dict):
        raise PosttrainError(f"{where}: a HumanEval problem is a JSON object, not {type(record).__name__}")
    bad = [field for field in HUMANEVAL_FIELDS if not isinstance(record.get(field), str) or not record[field].strip()]
    if bad:
        raise PosttrainError(f"{where}: not a HumanEval problem: {', '.join(bad)} missing or not a string")
    if not record["entry_point"].isidentifier():
        raise PosttrainError(f"{where}: entry_point {record['entry_point']!r} is not a function name")
    return {field: record[field] for field in HUMANEVAL_FIELDS}


def humaneval_verdicts(resps: list[list[str]], docs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """lm-eval filter of `humaneval`: each completion's verdict from posttrain's sandbox, a whole
    task's completions at once so that they run in parallel. The program is the prompt plus the
    completion, as lm-eval's own task builds it."""
    from posttrain import sandbox

    jobs = [sandbox.Job(doc["prompt"] + completion, doc["test"], doc["entry_point"])
            for completions, doc in zip(resps, docs) for completion in completions]
    verdicts = iter(sandbox.run_many(jobs, timeout_s=HUMANEVAL_TIMEOUT_S))
    return [[{"passed": v.score == 1.0, "error": v.error} for v in (next(verdicts) for _ in completions)]
            for completions in resps]


def pass_at_1(doc: dict[str, Any], results: list[list[dict[str, Any]]]) -> dict[str, float]:
    """The fraction of the problem's completions that pass: with one greedy completion, 1 or 0."""
    verdicts = results[0]
    return {"pass@1": sum(v["passed"] for v in verdicts) / len(verdicts)}
