"""Rule-based rewards for GRPO and rejection sampling (DeepSeek-R1 style: verifiable, no reward model).

Each reward has TRL's signature, `f(completions, **columns) -> list[float | None]`: completions
are strings or conversational message lists, extra dataset columns (`answer`, `tests`,
`entry_point`) arrive as keyword lists, and None means "does not apply to this row" (TRL then
leaves that reward out of the row's sum).

    math_answer     1.0 if the final answer (\\boxed{}, "#### N", "the answer is N", else the
                    last number) equals the reference number, else 0.0
    think_format    1.0 for one <think>...</think> block followed by a non-empty answer
    length_penalty  0 up to `max_chars`, then down linearly to -1 at twice that
    code_tests      fraction of the row's `tests` that the completion's code passes in
                    posttrain.sandbox (bubblewrap; verdicts the code cannot forge): each plain
                    `assert` line counts, or HumanEval's check(candidate) with `entry_point`
"""

from __future__ import annotations

import re
from fractions import Fraction
from functools import partial
from typing import Any, Callable

from posttrain import sandbox
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


def code_tests(completions: list, tests: list, entry_point: list | None = None, timeout_s: float = 5.0,
               memory_mb: int = 512, unsafe_exec: bool = False, **_: Any) -> list[float | None]:
    """Fraction of the row's tests the completion's code passes, run in posttrain.sandbox. Plain
    `assert` lines count one each; HumanEval's `def check(candidate)` with the row's
    `entry_point` counts as one. `unsafe_exec` runs without bubblewrap (logged)."""
    entry_points = entry_point or [None] * len(completions)
    jobs = [sandbox.Job(extract_code(completion_text(c)), t, e or None) if t else None
            for c, t, e in zip(completions, tests, entry_points)]
    verdicts = iter(sandbox.run_many([j for j in jobs if j], timeout_s, memory_mb, unsafe=unsafe_exec))
    return [None if job is None else next(verdicts).score for job in jobs]


REWARDS: dict[str, Reward] = {f.__name__: f for f in (math_answer, think_format, length_penalty, code_tests)}


def make(name: str, **params: Any) -> Reward:
    """A reward by name with its parameters bound (TRL logs it under `name`)."""
    if name not in REWARDS:
        raise PosttrainError(f"unknown reward {name!r} (one of {', '.join(REWARDS)})")
    if name == "code_tests":  # no sandbox: fail before a model loads, not at the first step
        sandbox.require(unsafe=bool(params.get("unsafe_exec")))
    reward = partial(REWARDS[name], **params)
    reward.__name__ = name
    return reward
