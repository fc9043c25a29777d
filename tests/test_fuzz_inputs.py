"""Fuzzed inputs for the data loaders and the recipe loader (Hypothesis): whatever a user hands
in is either loaded or refused with one line naming the file (and line), `file:line: what is
wrong`; never a traceback, and nothing is written while reading. Each bug the fuzzing found is
kept as an `@example`. Bounded to run in well under a minute on 2 cores; a longer hunt:
POSTTRAIN_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz_inputs.py."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from posttrain.errors import PosttrainError
from posttrain.train.data import DataSource, load

FUZZ = settings(max_examples=int(os.environ.get("POSTTRAIN_FUZZ_EXAMPLES", 60)), deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# Keys the loaders look for, so random records often get deep into a format's checks.
KEYS = ["messages", "role", "content", "reasoning", "prompt", "chosen", "rejected", "question", "answer",
        "instruction", "context", "response", "completion", "tests", "entry_point", "meta", "x"]
ROLES = ["system", "user", "assistant", "tool", "bot"]
TEXT = st.one_of(st.sampled_from(["", " ", "a", "<think>", "</think>", "#### 4", "\n\nHuman: a\n\nAssistant: b",
                                  "<think>t</think> a", "4", "\u2028", "é"]), st.text(max_size=12))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(allow_nan=False), TEXT)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.one_of(TEXT, SCALARS)},
                                optional={"reasoning": TEXT})
VALUES = st.recursive(st.one_of(SCALARS, st.lists(MESSAGE, max_size=4)),
                      lambda inner: st.one_of(st.lists(inner, max_size=3),
                                              st.dictionaries(st.sampled_from(KEYS), inner, max_size=3)),
                      max_leaves=8)
TURNS = st.lists(MESSAGE, min_size=1, max_size=4)
# One template per format: a file of one shape, its records bent (an extra column of any type, a
# value of the wrong type) gets past format detection into each format's own checks.
SHAPES = [
    {"messages": TURNS}, {"instruction": TEXT, "context": TEXT, "response": TEXT},
    {"prompt": st.one_of(TEXT, TURNS), "chosen": st.one_of(TEXT, TURNS), "rejected": st.one_of(TEXT, TURNS)},
    {"question": TEXT, "answer": st.one_of(TEXT, st.just("1 + 1\n#### 2"))}, {"prompt": TEXT, "completion": TEXT},
    {"prompt": TEXT, "tests": TEXT, "entry_point": st.one_of(TEXT, SCALARS)}, {"prompt": st.one_of(TEXT, TURNS)},
]
BENT = {"x": VALUES, "meta": VALUES, "answer": VALUES}
NOISE = st.one_of(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=5), st.text(max_size=8),
                  st.sampled_from(["[1]", "{", "1" * 5000]))


@st.composite
def record_files(draw):
    template = draw(st.sampled_from(SHAPES))
    shape = st.fixed_dictionaries(template, optional={k: v for k, v in BENT.items() if k not in template})
    return draw(st.lists(st.one_of(shape, NOISE) if draw(st.booleans()) else shape, max_size=5))


SOURCES = st.fixed_dictionaries({}, optional={
    "format": st.sampled_from(["auto", "messages", "dolly", "preference", "gsm8k", "prompt_completion", "code",
                               "prompt"]),
    "thinking": st.sampled_from(["think", "no_think"]), "limit": st.integers(1, 3),
    "system_prompt": st.sampled_from(["Be brief.", ""])})
METHODS = st.sampled_from(["sft", "dpo", "grpo"])


def files_under(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def loads_or_names_the_place(tmp_path: Path, path: Path, source: dict, method: str) -> None:
    """The loader's contract: rows TRL can take, or a one-line error at `path[:line]`."""
    before = files_under(tmp_path)
    try:
        data = load([DataSource(path=str(path), **source)], method)
    except PosttrainError as exc:
        message = str(exc)
        assert "\n" not in message, message
        assert re.match(rf"{re.escape(str(path))}(:\d+)?: \S", message), message
    else:
        assert data.rows and data.to_hf().num_rows == len(data.rows)
    assert files_under(tmp_path) == before  # reading writes nothing


def jsonl_line(record) -> str:
    return record if isinstance(record, str) else json.dumps(record)


@FUZZ
@given(records=record_files(), source=SOURCES, method=METHODS)
@example(records=["1" * 5000], source={}, method="sft")  # ValueError: Python's 4300-digit limit on int()
@example(records=[{"prompt": "a", "completion": "", "x": {}}, {"prompt": "a", "completion": "", "x": []}],
         source={}, method="grpo")  # ArrowInvalid: an extra column of two types, at training time
@example(records=[{"prompt": "a", "tests": "a", "entry_point": None}, {"prompt": "a", "tests": "a", "entry_point": True}],
         source={}, method="grpo")  # ArrowTypeError: entry_point true became a bool column beside ""
@example(records=[{"messages": [{"role": "assistant", "content": "a"}]}], source={"thinking": "no_think"},
         method="sft")  # ValueError: max() of no user turn in thinking-mode fusion
def test_jsonl_records_load_or_name_their_line(tmp_path_factory, records, source, method):
    tmp_path = tmp_path_factory.mktemp("jsonl")
    path = tmp_path / "data.jsonl"
    path.write_text("".join(jsonl_line(r).replace("\n", " ") + "\n" for r in records), encoding="utf-8")
    loads_or_names_the_place(tmp_path, path, source, method)


@FUZZ
@given(raw=st.binary(max_size=40), method=METHODS)
@example(raw=b"\x80", method="sft")  # UnicodeDecodeError
@example(raw=b"\xef\xbb\xbf" + json.dumps({"messages": [{"role": "user", "content": "a"},
                                                          {"role": "assistant", "content": "b"}]}).encode(),
         method="sft")  # an editor's byte-order mark is not invalid JSON
def test_jsonl_bytes_load_or_name_their_line(tmp_path_factory, raw, method):
    tmp_path = tmp_path_factory.mktemp("bytes")
    path = tmp_path / "data.jsonl"
    path.write_bytes(raw)
    loads_or_names_the_place(tmp_path, path, {}, method)


CELLS = st.one_of(TEXT, st.just('{"a": 1}'), st.just("line\nbreak"), st.just('say "hi", twice'))


@FUZZ
@given(header=st.lists(st.sampled_from(KEYS), min_size=1, max_size=4),
       rows=st.lists(st.lists(CELLS, max_size=5), max_size=4), source=SOURCES, method=METHODS)
# Through `datasets`: errors named "record N", not the line; "42" became a number and "" None.
@example(header=["role"], rows=[[""]], source={}, method="sft")
@example(header=["prompt", "completion"], rows=[["q", "42"]], source={}, method="sft")
def test_csv_records_load_or_name_their_line(tmp_path_factory, header, rows, source, method):
    tmp_path = tmp_path_factory.mktemp("csv")
    path = tmp_path / "data.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows([header, *rows])
    loads_or_names_the_place(tmp_path, path, source, method)


@FUZZ
@given(path=st.one_of(st.sampled_from(["~", "~nobody-here/x.jsonl", "builtin:", "builtin:chat", "x.csv", "./x",
                                       "/", "org/name", "@stage"]), st.text(min_size=1, max_size=10)), method=METHODS)
@example(path="~nobody-here/x.jsonl", method="sft")  # RuntimeError from Path.expanduser()
@example(path="data.jsonl\n", method="sft")  # a two-line error: `path: |` in YAML keeps the line break
def test_any_source_path_loads_or_says_why(tmp_path_factory, path, method):
    try:
        data = load([DataSource.model_validate({"path": path})], method)
    except ValidationError:
        assert not path.isprintable()
    except PosttrainError as exc:
        assert "\n" not in str(exc), str(exc)
    else:
        assert data.rows


# --- recipes ---------------------------------------------------------------------------------

RECIPE_KEYS = ["model", "output", "method", "lora", "r", "alpha", "dropout", "target_modules", "data", "path",
               "format", "limit", "thinking", "training", "max_steps", "learning_rate", "batch_size", "precision",
               "max_length", "packing", "beta", "stages", "name", "type", "recipe", "from", "teacher", "prompts",
               "rewards", "params", "weight", "scheme", "threshold", "benchmarks", "dpo", "x"]
YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=False),
                         st.sampled_from(["lora", "full", "sft", "dpo", "merge", "builtin:chat", "@a", "~zz/x",
                                          "all-linear", "1e-4", "a", "tiny-qwen3"]),
                         st.text(max_size=8))
YAML_DATA = st.recursive(YAML_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(RECIPE_KEYS), inner, max_size=4)), max_leaves=12)
RECIPE_TEXT = st.one_of(
    st.dictionaries(st.sampled_from(RECIPE_KEYS), YAML_DATA, max_size=5).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.text(max_size=40),
    st.sampled_from(["a: *x\n", "a: &x [*x]\n", "- 1\n", "a: 1\n---\nb: 2\n", "{a: 1\n", "? [a]\n: b\n"]))


def recipe_classes():
    from posttrain.loop import LoopRecipe
    from posttrain.pipeline import PipelineRecipe
    from posttrain.train.distill import GenerateRecipe
    from posttrain.train.dpo import DPORecipe
    from posttrain.train.grpo import GRPORecipe
    from posttrain.train.quantize import QuantizeRecipe
    from posttrain.train.sft import SFTRecipe

    return [SFTRecipe, DPORecipe, GRPORecipe, QuantizeRecipe, GenerateRecipe, PipelineRecipe, LoopRecipe]


@pytest.fixture(scope="module")
def recipes():
    return recipe_classes()


@FUZZ
@given(text=RECIPE_TEXT, which=st.integers(0, 6))
@example(text="0: &0 [*0]", which=0)  # RecursionError: an alias inside its own anchor
@example(text="\x08", which=0)  # a two-line error: PyYAML's reader error has no problem/mark
def test_recipes_load_or_name_their_line(tmp_path_factory, recipes, text, which):
    tmp_path = tmp_path_factory.mktemp("recipe")
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    before = files_under(tmp_path)
    try:
        recipes[which].load(path)
    except PosttrainError as exc:
        message = str(exc)
        assert "\n" not in message and re.match(rf"{re.escape(str(path))}(:\d+)?: \S", message), message
    assert files_under(tmp_path) == before


@FUZZ
@given(overrides=st.lists(st.tuples(st.lists(st.one_of(st.sampled_from(RECIPE_KEYS), st.sampled_from(["0", "1", "9"]),
                                                       st.text(max_size=3)), min_size=1, max_size=4),
                                    st.text(max_size=10)), max_size=3),
       which=st.integers(0, 6))
@example(overrides=[(["\n"], "{")], which=0)  # a line break in a key made a two-line error
@example(overrides=[(["data", "²"], "x")], which=0)  # ValueError: "²".isdigit() but int("²") fails
@example(overrides=[(["data", "0", "path"], "*x")], which=0)  # yaml ComposerError: an alias of nothing
def test_set_overrides_apply_or_name_the_key(recipes, overrides, which):
    items = [".".join(keys) + "=" + value for keys, value in overrides]
    try:
        recipes[which].load(None, items)
    except PosttrainError as exc:
        assert "\n" not in str(exc) and str(exc).startswith(("--set", "recipe: ")), str(exc)
