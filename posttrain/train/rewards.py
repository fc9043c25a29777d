"""Rule-based rewards for GRPO and rejection sampling (DeepSeek-R1 style: verifiable, no reward model).

Each reward has TRL's signature, `f(completions, **columns) -> list[float | None]`: completions
are strings or conversational message lists, extra dataset columns (`answer`, `tests`,
`entry_point`) arrive as keyword lists, and None means "does not apply to this row" (TRL then
leaves that reward out of the row's sum).

    math_answer     1.0 if the final answer (\\boxed{}, "#### N", "the answer is N", else the
                    last number) equals the reference number, else 0.0
    think_format    1.0 for one <think>...</think> block followed by a non-empty answer
    length_penalty  0 up to `max_chars`, then down linearly to -1 at twice that
    code_tests      fraction of the row's `tests` (assert lines) that pass when the completion's
                    code runs in a subprocess: time limit, memory limit, no network, empty cwd
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from functools import partial
from typing import Any, Callable

from posttrain.errors import PosttrainError

Reward = Callable[..., list]

_BOXED = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?\s*([-+]?[\d,]*\.?\d+(?:/\d+)?)", re.IGNORECASE)
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?|[-+]?\.\d+")
_THINK_THEN_ANSWER = re.compile(r"\s*<think>(?:(?!</?think>).)*\S(?:(?!</?think>).)*</think>(?:(?!</?think>).)*\S"
                                r"(?:(?!</?think>).)*", re.DOTALL)
_CODE_BLOCK = re.compile(r"```(?:python|py)?\s*\n(.*?)```", re.DOTALL)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the content of a conversational reply."""
    if isinstance(completion, str):
        return completion
    return "".join(m.get("content") or "" for m in completion if m.get("role", "assistant") == "assistant")


def _as_number(text: str) -> Fraction | None:
    cleaned = text.strip().strip("$ .").replace(",", "").replace("\\$", "").replace("\\%", "").rstrip("%")
    cleaned = re.sub(r"\\[a-z]?frac\{([^{}]+)\}\{([^{}]+)\}", r"\1/\2", cleaned)
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        found = _NUMBER.findall(cleaned)
        if len(found) == 1 and found[0] != cleaned:
            return _as_number(found[0])
        return None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the last \\boxed{}, else after '####', else after
    'the answer is', else the last number in the text."""
    after_thinking = text.rsplit("</think>", 1)[-1]
    for pattern in (_BOXED, _HASHES, _ANSWER_IS):
        found = pattern.findall(after_thinking)
        if found:
            return found[-1].strip()
    numbers = _NUMBER.findall(after_thinking)
    return numbers[-1] if numbers else None


def math_answer(completions: list, answer: list, **_: Any) -> list[float | None]:
    rewards: list[float | None] = []
    for completion, reference in zip(completions, answer):
        if reference is None:
            rewards.append(None)
            continue
        expected = _as_number(str(reference))
        got = extract_answer(completion_text(completion))
        rewards.append(float(expected is not None and got is not None and _as_number(got) == expected))
    return rewards


def think_format(completions: list, **_: Any) -> list[float]:
    return [float(bool(_THINK_THEN_ANSWER.fullmatch(completion_text(c)))) for c in completions]


def length_penalty(completions: list, max_chars: int = 1000, **_: Any) -> list[float]:
    return [-min(1.0, max(0, len(completion_text(c)) - max_chars) / max_chars) or 0.0 for c in completions]


# --- code ----------------------------------------------------------------------------------

def extract_code(text: str) -> str:
    """The last fenced code block, or the whole text if there is none."""
    blocks = _CODE_BLOCK.findall(text.rsplit("</think>", 1)[-1])
    return blocks[-1] if blocks else text


# The child confines itself before it runs anything of the completion's: memory, CPU time and
# file-size limits, and a network namespace of its own (only a downed loopback: no network).
# Root can make one directly; others need a user namespace first. Each test line runs on its
# own, so one failure does not hide the others.
_HARNESS = """
import ctypes, os, resource, sys
memory, cpu = int(sys.argv[3]) << 20, int(sys.argv[4])
resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0 and libc.unshare(0x10000000 | 0x40000000) != 0:
    sys.exit(97)
del ctypes, os, resource, libc
_ns = {"__name__": "__main__"}
exec(compile(sys.argv[1], "<completion>", "exec"), _ns)
_passed = 0
_tests = [t for t in sys.argv[2].splitlines() if t.strip()]
for _t in _tests:
    try:
        exec(_t, _ns)
        _passed += 1
    except BaseException:
        pass
print(f"PASSED {_passed}/{len(_tests)}")
"""
NO_SANDBOX = 97


def run_code(code: str, tests: str, timeout_s: float = 5.0, memory_mb: int = 512) -> float:
    """Fraction of `tests` (one statement per line) that pass after running `code`; 0.0 if the
    code does not run, times out, or exhausts its memory."""
    cpu_s = str(max(1, int(timeout_s) + 1))
    with tempfile.TemporaryDirectory(prefix="posttrain-reward-") as cwd:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _HARNESS, code, tests, str(memory_mb), cpu_s], cwd=cwd,
            env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the whole group: the completion may have forked
            process.communicate()
            return 0.0
    if process.returncode == NO_SANDBOX:
        raise PosttrainError("code rewards run completions in a network namespace of their own, and this host "
                             "refuses to make one (in Docker: --cap-add SYS_ADMIN, or allow user namespaces)")
    match = re.search(r"PASSED (\d+)/(\d+)\s*$", stdout)
    if process.returncode != 0 or match is None or int(match.group(2)) == 0:
        return 0.0
    return int(match.group(1)) / int(match.group(2))


def code_tests(completions: list, tests: list, timeout_s: float = 5.0, memory_mb: int = 512,
               **_: Any) -> list[float | None]:
    jobs = [(extract_code(completion_text(c)), t) for c, t in zip(completions, tests)]
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        scores = pool.map(lambda job: None if not job[1] else run_code(job[0], job[1], timeout_s, memory_mb), jobs)
        return list(scores)


REWARDS: dict[str, Reward] = {f.__name__: f for f in (math_answer, think_format, length_penalty, code_tests)}


def make(name: str, **params: Any) -> Reward:
    """A reward by name with its parameters bound (TRL logs it under `name`)."""
    if name not in REWARDS:
        raise PosttrainError(f"unknown reward {name!r} (one of {', '.join(REWARDS)})")
    reward = partial(REWARDS[name], **params)
    reward.__name__ = name
    return reward
