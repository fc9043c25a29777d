"""Asking an LLM judge for a verdict, and reading it: what MT-Bench and judge agreement share.

- **Constrained verdicts.** Where the judge's endpoint supports vLLM's structured outputs
  (`extra_body={"structured_outputs": {"grammar": ...}}`, any vLLM server, ours included), the
  reply is forced into the shape FastChat's prompts ask for: an explanation first (free text
  without square brackets), then `[[1]]`..`[[10]]` (single grading) or `[[A]]` / `[[B]]` /
  `[[C]]` (pairwise). The explanation is capped at `max_tokens - 8` characters: every token
  carries at least one character, so the verdict always fits in `max_tokens` and always parses.
  The constraint is an EBNF grammar, not the equivalent regex: compiling a capped repetition
  takes xgrammar seconds (4-20 s on a loaded 2-core machine), past vLLM's 5 s limit on regex
  compilation, which grammars do not have; the engine compiles it once and caches it.
  vLLM cuts `max_tokens` to the context the prompt leaves; a verdict cut short by that is asked
  again once, capped to the room left (the model card's `max_model_len` less the prompt).
- **Support is detected once per endpoint** by a tiny probe forced to an answer no model gives
  by itself ("ZQ"): a 400 or another answer means constraints are unsupported or ignored, and
  verdicts are parsed from free text as FastChat does. The same probe asks for `top_logprobs`.
  Probes are cached like any request, so a resumed run does not ask again.
- **Verdict probabilities.** Where the endpoint returns `top_logprobs` (vLLM, OpenAI), the
  distribution at the token after the verdict's `[[` is renormalized over the verdict tokens:
  ratings 1-10 (the probability-weighted rating is its expectation, as in G-Eval) or A / B / C.
  Only a reply whose last `[[` opens a well-formed verdict gets one. "10" is two tokens in most
  tokenizers ("1", "0"): when the reply itself took "1", the next position splits P("1") into
  P(1) and P(10) = P("1") x P("0" | "1"); when it took another digit that continuation was never
  computed and P("1") counts as a rating of 1, an approximation that can only pull the
  expectation down, by at most 9 x P("1").
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import re
from dataclasses import dataclass, replace
from typing import Any, Literal

from posttrain.evaluate.endpoint import Endpoint, RequestCache, check_serves, judge_key
from posttrain.evaluate.mt_bench_files import JudgePrompt
from posttrain.registry import Registry

Kind = Literal["rating", "winner"]
RATING = r"\[\[(10|[1-9])\]\]"
WINNER = r"\[\[([ABC])\]\]"
VERDICT_GRAMMAR = {"rating": '"[[" ("10" | [1-9]) "]]"', "winner": '"[[" [ABC] "]]"'}
VERDICT_TOKENS = 8  # "[[10]]" and the end of the reply take at most this many tokens
TOP_LOGPROBS = 20  # the most OpenAI's API returns
PROBE_ANSWER = "ZQ"


@dataclass(frozen=True)
class JudgeSupport:
    """What the judge's endpoint can do: constrain its output (vLLM's structured outputs) and
    return top log-probabilities."""

    constrained: bool
    logprobs: bool

    @property
    def verdict_format(self) -> str:
        return "constrained" if self.constrained else "parsed"


def make_judge(registry: Registry, model: str, base_url: str, api_key: str | None, cache: RequestCache, *,
               models_base_url: str | None = None, models_api_key: str | None = None) -> Endpoint:
    """The judge's endpoint after checking it serves `model`, with its key (`judge_key`) and
    identity in every cache key: the checkpoint (folder and registration time) when the endpoint
    serves a registered checkpoint's folder, else the URL and what it reports as the model's
    root, so a retrained judge under the same name never reuses stale verdicts."""
    base_url = base_url.rstrip("/")
    api_key = judge_key(base_url, models_base_url, models_api_key, api_key)
    card = check_serves(base_url, api_key, model)[model]
    row = registry.find(model)
    if row is not None and card.get("root") == row.path:
        identity = f"{row.path}@{row.created_at}"
    else:
        identity = f"{base_url} {card.get('root') or ''}".rstrip()
    return Endpoint(model, base_url, api_key, cache, identity=identity, context=card.get("max_model_len"))


async def detect_support(judge: Endpoint, gate: asyncio.Semaphore, constrain: bool = True) -> JudgeSupport:
    """Probe the judge once (see the module's docstring); `constrain=False` never constrains."""
    messages = [{"role": "user", "content": "Answer with one word."}]
    probe = {"max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": TOP_LOGPROBS}
    record = await judge.chat(messages, gate, **probe,
                              extra_body={"structured_outputs": {"grammar": f'root ::= "{PROBE_ANSWER}"'}})
    if "error" in record:  # OpenAI answers 400 to a parameter it does not know
        record = await judge.chat(messages, gate, **probe)
    support = JudgeSupport(constrained=record.get("text") == PROBE_ANSWER, logprobs=bool(record.get("logprobs")))
    return support if constrain else replace(support, constrained=False)


def verdict_grammar(kind: Kind, max_tokens: int) -> str:
    """The constraint (xgrammar EBNF): at most `max_tokens - 8` characters without square
    brackets, then the verdict."""
    return rf"root ::= [^\[\]]{{0,{max(0, max_tokens - VERDICT_TOKENS)}}} {VERDICT_GRAMMAR[kind]}"


async def ask(judge: Endpoint, support: JudgeSupport, kind: Kind, prompt: JudgePrompt, fields: dict[str, str],
              gate: asyncio.Semaphore, max_tokens: int) -> dict[str, Any]:
    """One verdict: the judge's cached record plus `verdict` (a rating, "A" / "B" / "C", or None
    when unparsable) and `probs` (the verdict's distribution, or None)."""
    messages = [{"role": "system", "content": prompt.system_prompt},
                {"role": "user", "content": prompt.prompt_template.format(**fields)}]
    params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": 0}
    if support.constrained:
        params["extra_body"] = {"structured_outputs": {"grammar": verdict_grammar(kind, max_tokens)}}
    if support.logprobs:
        params |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
    record = await judge.chat(messages, gate, **params)
    if "error" in record:
        return record
    verdict = parse_rating(record["text"]) if kind == "rating" else parse_winner(record["text"])
    # vLLM gave the long prompt fewer tokens than the explanation's cap assumed: ask within them.
    room = judge.context - record["prompt_tokens"] if judge.context and record.get("prompt_tokens") else None
    if verdict is None and support.constrained and record.get("finish_reason") == "length" and room \
            and VERDICT_TOKENS < room < max_tokens:
        return await ask(judge, support, kind, prompt, fields, gate, room)
    probs = verdict_distribution(record.get("logprobs"), kind) if verdict is not None else None
    return record | {"verdict": verdict, "probs": probs}


def parse_rating(judgment: str) -> float | None:
    """The last `[[n]]` (or, failing that, `[n]`) in a judgment, if it is a rating from 1 to 10."""
    for pattern in (r"\[\[(\d+(?:\.\d+)?)\]\]", r"\[(\d+(?:\.\d+)?)\]"):
        found = re.findall(pattern, judgment)
        if found:
            rating = float(found[-1])
            return rating if 1 <= rating <= 10 else None
    return None


def parse_winner(judgment: str) -> str | None:
    """"A", "B" or "C" (tie) from the last `[[A]]` / `[[B]]` / `[[C]]` in a judgment."""
    found = re.findall(WINNER, judgment)
    return found[-1] if found else None


def pair_outcome(first: str | None, second: str | None) -> str | None:
    """Combine the verdicts of both orders (first: model is A; second: model is B) into "a"
    (the model won), "b" (the other one won) or "tie"; None when either is unparsable. Orders
    that disagree are a tie: that is position bias, not a preference."""
    if first is None or second is None:
        return None
    model_first = {"A": "a", "B": "b", "C": "tie"}[first]
    model_second = {"A": "b", "B": "a", "C": "tie"}[second]
    return model_first if model_first == model_second else "tie"


def orders_disagree(first: str, second: str) -> bool:
    """Whether the two orders' verdicts name different outcomes for the same answers."""
    return {"A": "a", "B": "b", "C": "tie"}[first] != {"A": "b", "B": "a", "C": "tie"}[second]


def outcome_probs(first: dict[str, float] | None, second: dict[str, float] | None) -> dict[str, float] | None:
    """P(the model wins), P(the other wins), P(tie), averaged over both orders (first: the model is A)."""
    if first is None or second is None:
        return None
    return {"a": (first["A"] + second["B"]) / 2, "b": (first["B"] + second["A"]) / 2,
            "tie": (first["C"] + second["C"]) / 2}


def expected_rating(probs: dict[str, float] | None) -> float | None:
    return sum(int(k) * p for k, p in probs.items()) if probs else None


def verdict_distribution(tail: list[list[Any]] | None, kind: Kind) -> dict[str, float] | None:
    """The verdict's distribution ({"1": p, ..., "10": p} or {"A": p, "B": p, "C": p}, summing
    to 1) read from a reply's last tokens (`endpoint.logprob_tail`), or None."""
    located = _verdict_position(tail or [], kind)
    if located is None:
        return None
    index, prefix = located
    token, logprob, alternatives = tail[index]
    if not any(alt == token for alt, _ in alternatives):
        alternatives = [*alternatives, [token, logprob]]
    probs = dict.fromkeys([str(r) for r in range(1, 11)] if kind == "rating" else ["A", "B", "C"], 0.0)
    for alt, alt_logprob in alternatives:
        if not alt.startswith(prefix):
            continue
        for verdict, share in _readings(alt[len(prefix):], kind, tail[index + 1:index + 2] if alt == token else []):
            probs[verdict] += math.exp(alt_logprob) * share
    total = sum(probs.values())
    return {k: p / total for k, p in probs.items()} if total > 0 else None


def _verdict_position(tail: list[list[Any]], kind: Kind) -> tuple[int, str] | None:
    """(index of the token holding the verdict's first character, the part of that token
    before it), if the last `[[` in the tail opens a well-formed verdict."""
    starts, text = [], ""
    for token, _, _ in tail:
        starts.append(len(text))
        text += token
    at = text.rfind("[[")
    if at < 0 or not re.match(RATING if kind == "rating" else WINNER, text[at:]):
        return None
    first = at + 2
    index = next(i for i, start in enumerate(starts) if start <= first < start + len(tail[i][0]))
    return index, text[starts[index]:first]


def _readings(rest: str, kind: Kind, following: list[list[Any]]) -> list[tuple[str, float]]:
    """The verdicts an alternative token (less the part before the verdict) stands for, with
    their shares; `following` is the next position when this is the token the reply took."""
    if kind == "winner":
        return [(rest[0], 1.0)] if re.fullmatch(r"[ABC](\].*)?", rest) else []
    found = re.fullmatch(r"([1-9]\d?)(\].*)?", rest)
    if found is None or int(found[1]) > 10:
        return []
    if found[1] != "1" or found[2] is not None or not following:
        return [(found[1], 1.0)]
    # "1" alone: rating 1 or the first half of 10, as the next token tells.
    ten = close = 0.0
    _, _, alternatives = following[0]
    for alt, logprob in alternatives:
        ten += math.exp(logprob) if alt.startswith("0") else 0.0
        close += math.exp(logprob) if alt.startswith("]") else 0.0
    share = ten / (ten + close) if ten + close > 0 else 0.0
    return [("10", share), ("1", 1 - share)]


async def ask_pair(judge: Endpoint, support: JudgeSupport, prompt: JudgePrompt, orders: list[dict[str, str]],
                   gate: asyncio.Semaphore, max_tokens: int) -> dict[str, Any]:
    """A pairwise verdict asked in both orders (`orders[0]` shows the first side as A, `orders[1]`
    as B): `judgments`, `verdicts`, `outcome` for the first side ("a" / "b" / "tie", see
    `pair_outcome`), `unparsable`, `order_probs` and `outcome_probs`, and `key` (the two
    requests' hash); or `error`."""
    replies = [await ask(judge, support, "winner", prompt, fields, gate, max_tokens) for fields in orders]
    record: dict[str, Any] = {"judgments": [r.get("text") for r in replies]}
    if errors := [r["error"] for r in replies if "error" in r]:
        return record | {"error": "; ".join(errors)}
    verdicts = [r["verdict"] for r in replies]
    order_probs = [r["probs"] for r in replies]
    return record | {"verdicts": verdicts, "outcome": pair_outcome(*verdicts), "unparsable": None in verdicts,
                     "order_probs": order_probs, "outcome_probs": outcome_probs(*order_probs),
                     "key": hashlib.sha256("".join(r["key"] for r in replies).encode()).hexdigest()[:16]}
