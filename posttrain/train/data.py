"""Training data: the formats users have, validated line by line, normalized to what TRL reads.

A source is a JSONL / JSON / CSV (UTF-8, a header row, cells read as text) / Parquet file, a
folder written by `datasets.save_to_disk`, `builtin:NAME` (the samples shipped in
posttrain/data/samples, so every recipe runs offline) or a Hugging Face dataset name (its
lineage records the Hub commit read). Its format is detected from the first record's keys:

    messages           {"messages": [{"role", "content"}, ...]}             chat (TRL conversational)
    dolly              {"instruction", "context", "response"}                instruction tuning
    preference         {"prompt"?, "chosen", "rejected"}: strings, message lists, or
                       Anthropic HH transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...")
    gsm8k              {"question", "answer": "... #### 42"}                 math with a final number
    prompt_completion  {"prompt", "completion"}
    code               {"prompt", "tests", "entry_point"?}                   code with unit tests
    prompt             {"prompt", ...}                                       prompts for GRPO / sampling

Every record is checked before anything is trained; the first bad one stops the run with
`file:line: what is wrong`. Each method takes the formats it can learn from and gets TRL's shape:
SFT `{"messages"}`, DPO `{"prompt", "chosen", "rejected"}` (conversational), GRPO `{"prompt"}`
plus the columns its rewards read (`answer`, `tests`, `entry_point`).

Thinking-mode fusion (Qwen3): a source marked `thinking: think` keeps its `<think>` traces and
gets the `/think` switch on its user turn; one marked `no_think` gets an empty think block and
`/no_think`, which is exactly what the chat template renders with `enable_thinking=False`.
"""

from __future__ import annotations

import csv
import json
import random
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from posttrain.errors import PosttrainError

Format = Literal["auto", "messages", "dolly", "preference", "gsm8k", "prompt_completion", "code", "prompt"]
Method = Literal["sft", "dpo", "grpo"]
ROLES = ("system", "user", "assistant")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
EMPTY_THINK = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"
BUILTIN = "builtin:"
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")
_GSM8K_FINAL = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)\s*$")
_CALCULATOR = re.compile(r"<<[^>]*>>")
_COMMIT = re.compile(r"[0-9a-f]{40}")


class DataSource(BaseModel):
    """One dataset in a recipe's `data:` list."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1, description="File, datasets folder, builtin:NAME, or a Hugging Face dataset name.")
    format: Format = "auto"
    split: str = "train"
    limit: int | None = Field(None, gt=0, description="Use at most this many records (the first ones).")
    thinking: Literal["think", "no_think"] | None = Field(
        None, description="Thinking-mode fusion: mark this source's examples /think or /no_think.")
    system_prompt: str | None = Field(None, description="Prepended as a system turn where none is given.")

    @field_validator("path")
    @classmethod
    def _printable(cls, path: str) -> str:
        # A YAML block scalar (`path: |`) ends in a line break; errors name the path on one line.
        if not path.isprintable():
            raise ValueError(f"{path!r} holds a line break or another control character")
        return path


class BadRecord(ValueError):
    """A record that does not fit its format; the loader adds where it is."""


@dataclass
class Dataset:
    """Normalized rows ready for a TRL trainer, and where they came from: per source a file or
    folder, or a Hub dataset's lineage entry (what `Registry.add(datasets=...)` takes)."""

    rows: list[dict[str, Any]]
    sources: list[Path | dict[str, Any]] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [s for s in self.sources if isinstance(s, Path) and s.is_file()]

    def to_hf(self):
        import datasets

        return datasets.Dataset.from_list(self.rows)


def builtin_dir() -> Path:
    return Path(str(resources.files("posttrain") / "data" / "samples"))


def builtin_names() -> list[str]:
    return sorted(p.stem for p in builtin_dir().glob("*.jsonl"))


# --- reading -------------------------------------------------------------------------------

def _read_jsonl(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            where = f"{path}:{number}"
            try:  # an editor's byte-order mark opens line 1 only
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise PosttrainError(f"{where}: not UTF-8 text (byte {exc.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PosttrainError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            except ValueError as exc:  # Python refuses integers of more than 4300 digits
                raise PosttrainError(f"{where}: invalid JSON: {str(exc).split(':')[0]}") from None
            except RecursionError:
                raise PosttrainError(f"{where}: invalid JSON: nested too deeply") from None
            if not isinstance(record, dict):
                raise PosttrainError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _read_csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Cells stay the text they are (`datasets` would guess that "42" is a number and an empty
    cell None); each record is named by the line it starts on."""
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is not None and len(set(header)) < len(header):
                repeated = next(name for name in header if header.count(name) > 1)
                raise PosttrainError(f"{path}:1: the header names the column {repeated!r} twice")
            start = reader.line_num + 1
            for cells in reader:
                where, start = f"{path}:{start}", reader.line_num + 1
                if not any(cells):
                    continue
                if len(cells) != len(header):
                    raise PosttrainError(f"{where}: {len(cells)} cells, but the header names {len(header)} columns")
                yield where, dict(zip(header, cells))
    except UnicodeDecodeError as exc:
        raise PosttrainError(f"{path}: not UTF-8 text (at byte {exc.start + 1})") from None
    except csv.Error as exc:
        raise PosttrainError(f"{path}:{reader.line_num}: invalid CSV: {exc}") from None


def _open_table(source: DataSource, path: Path | None):
    """A file or `save_to_disk` folder through `datasets`, or a Hub dataset (then also its
    revision: the commit `datasets` resolved, or None where it cannot tell)."""
    import datasets

    name = str(path) if path is not None else source.path
    revision = None
    try:
        if path is not None and path.is_dir():
            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                data = data[source.split]
        elif path is not None:
            data = datasets.load_dataset(FILE_SUFFIXES[path.suffix], data_files=str(path), split="train")
        else:
            # load_dataset without its wrapper: the builder's hash is the Hub commit it read.
            builder = datasets.load_dataset_builder(source.path)
            builder.download_and_prepare()
            data = builder.as_dataset(split=source.split)
            revision = builder.hash if _COMMIT.fullmatch(str(builder.hash)) else None
    except KeyError:
        raise PosttrainError(f"{name}: no split {source.split!r}") from None
    except Exception as exc:  # datasets raises many types: offline, unknown name, bad file
        hint = "" if path is not None else " (not a local file or folder; as a Hugging Face dataset it needs the hub)"
        raise PosttrainError(f"{name}: cannot load: {str(exc).splitlines()[0]}{hint}") from None
    return data, revision


def _table_records(name: str, data) -> Iterator[tuple[str, dict[str, Any]]]:
    for index, record in enumerate(data, 1):
        yield f"{name} record {index}", record


def _records(source: DataSource) -> tuple[Iterator[tuple[str, dict[str, Any]]], Path | dict[str, Any]]:
    """The records of a source, and what its lineage records: a file or folder (hashed when the
    checkpoint is registered), or for a Hub dataset its revision or why it has none."""
    if source.path.startswith(BUILTIN):
        name = source.path[len(BUILTIN):]
        path = builtin_dir() / f"{name}.jsonl"
        if not path.exists():
            raise PosttrainError(f"unknown built-in dataset {source.path!r} (one of: "
                                 f"{', '.join(BUILTIN + n for n in builtin_names())})")
        return _read_jsonl(path), path
    try:
        path = Path(source.path).expanduser()
    except RuntimeError:  # ~name of no such user
        raise PosttrainError(f"{source.path}: no such file (no home folder for {source.path.split('/')[0]})") from None
    if path.is_file() and path.suffix not in FILE_SUFFIXES:
        raise PosttrainError(f"{path}: unsupported file type (use {', '.join(FILE_SUFFIXES)})")
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        return (_read_jsonl(path) if path.suffix == ".jsonl" else _read_csv(path)), path
    if path.is_file() or path.is_dir():
        return _table_records(str(path), _open_table(source, path)[0]), path
    if path.suffix in FILE_SUFFIXES or source.path.startswith((".", "/", "~")):
        raise PosttrainError(f"{source.path}: no such file")
    data, revision = _open_table(source, None)
    hub = {"path": source.path, "split": source.split}
    if revision:
        return _table_records(source.path, data), hub | {"revision": revision}
    return _table_records(source.path, data), hub | {"unhashed": "datasets did not say which Hub commit it read"}


def detect_format(record: dict[str, Any]) -> str:
    keys = set(record)
    for fmt, needed in (("messages", {"messages"}), ("dolly", {"instruction", "response"}),
                        ("preference", {"chosen", "rejected"}), ("gsm8k", {"question", "answer"}),
                        ("prompt_completion", {"prompt", "completion"}), ("code", {"prompt", "tests"}),
                        ("prompt", {"prompt"})):
        if needed <= keys:
            return fmt
    raise BadRecord(f"cannot tell the format from the keys {sorted(keys)}; expected e.g. messages, "
                    "instruction/response, prompt/chosen/rejected, question/answer or prompt/completion")


# --- checking one record ---------------------------------------------------------------------

def _text(record: dict[str, Any], key: str, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise BadRecord(f"{key!r} must be a string" if key in record else f"missing {key!r}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"{key!r} is empty")
    return value


def _check_think(content: str, role: str, index: int) -> None:
    opens, closes = content.count(THINK_OPEN), content.count(THINK_CLOSE)
    if opens != closes or opens > 1 or (opens and not content.lstrip().startswith(THINK_OPEN)):
        raise BadRecord(f"message {index} ({role}): a reasoning trace must be one {THINK_OPEN}...{THINK_CLOSE} "
                        "block at the start of the reply")


def messages(value: Any, key: str = "messages") -> list[dict[str, str]]:
    """Validate a message list; a `reasoning` field on an assistant turn becomes its think block."""
    if value is None:
        raise BadRecord(f"missing {key!r}")
    if not isinstance(value, list) or not value:
        raise BadRecord(f"{key!r} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise BadRecord(f"{key}[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise BadRecord(f"{key}[{i}]: role must be one of {', '.join(ROLES)}, not {role!r}")
        if not isinstance(content, str):
            raise BadRecord(f"{key}[{i}] ({role}): content must be a string")
        reasoning = message.get("reasoning") or message.get("reasoning_content")
        if role == "assistant" and isinstance(reasoning, str) and reasoning.strip():
            if THINK_OPEN in content:
                raise BadRecord(f"{key}[{i}]: both a reasoning field and a {THINK_OPEN} block")
            # Exactly as Qwen3's chat template renders `reasoning_content` (it strips line breaks only).
            trace, answer = reasoning.strip("\n"), content.lstrip("\n")
            content = f"{THINK_OPEN}\n{trace}\n{THINK_CLOSE}\n\n{answer}"
        if role == "assistant":
            _check_think(content, role, i)
        out.append({"role": role, "content": content})
    return out


def hh_transcript(text: str, key: str) -> list[dict[str, str]]:
    """Anthropic HH: "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages."""
    parts = _HH_TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord(f"{key!r} is not a '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript")
    turns = [{"role": "user" if who == "Human" else "assistant", "content": body.strip()}
             for who, body in zip(parts[1::2], parts[2::2])]
    if turns[-1]["role"] != "assistant":
        raise BadRecord(f"{key!r} must end with an Assistant turn")
    return turns


def _side(record: dict[str, Any], key: str) -> list[dict[str, str]]:
    value = record.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise BadRecord(f"{key!r} is empty")
        return [{"role": "assistant", "content": value}]
    turns = messages(value, key)
    if turns[-1]["role"] != "assistant" or not turns[-1]["content"].strip():
        raise BadRecord(f"{key!r} must end with a non-empty assistant reply")
    return turns


def preference(record: dict[str, Any]) -> dict[str, Any]:
    """prompt (messages ending with a user turn) / chosen / rejected (one assistant reply each)."""
    chosen, rejected = record.get("chosen"), record.get("rejected")
    if "prompt" not in record and isinstance(chosen, str) and isinstance(rejected, str):
        a, b = hh_transcript(chosen, "chosen"), hh_transcript(rejected, "rejected")
        if a[:-1] != b[:-1]:
            raise BadRecord("chosen and rejected transcripts differ before their last Assistant turn")
        return {"prompt": a[:-1], "chosen": a[-1:], "rejected": b[-1:]}
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": _text(record, "prompt")}]
        chosen_turns, rejected_turns = _side(record, "chosen"), _side(record, "rejected")
    elif prompt is None:
        # Conversational rows may carry the whole dialogue in chosen/rejected.
        chosen_turns, rejected_turns = _side(record, "chosen"), _side(record, "rejected")
        if chosen_turns[:-1] != rejected_turns[:-1] or len(chosen_turns) < 2:
            raise BadRecord("without 'prompt', chosen and rejected must be the same dialogue up to the last reply")
        prompt = chosen_turns[:-1]
    else:
        prompt = messages(prompt, "prompt")
        chosen_turns, rejected_turns = _side(record, "chosen"), _side(record, "rejected")
    if prompt[-1]["role"] != "user":
        raise BadRecord("'prompt' must end with a user turn")
    return {"prompt": prompt, "chosen": chosen_turns[-1:], "rejected": rejected_turns[-1:]}


def gsm8k_answer(answer: str) -> tuple[str, str]:
    """(reasoning without calculator annotations, final number) of a GSM8K answer."""
    match = _GSM8K_FINAL.search(answer.strip())
    if match is None:
        raise BadRecord("'answer' must end with '#### <number>'")
    reasoning = _CALCULATOR.sub("", answer.strip()[: match.start()]).strip()
    return reasoning, match.group(1).replace(",", "")


def _prompt_turns(record: dict[str, Any]) -> list[dict[str, str]]:
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return [{"role": "user", "content": _text(record, "prompt")}]
    turns = messages(prompt, "prompt")
    if turns[-1]["role"] != "user":
        raise BadRecord("'prompt' must end with a user turn")
    return turns


def _extras(record: dict[str, Any], *skip: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in skip and k != "meta"}


def to_sft(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    if fmt == "messages":
        turns = messages(record.get("messages"))
        if not any(m["role"] == "assistant" for m in turns):
            raise BadRecord("no assistant turn to learn from")
        return {"messages": turns}
    if fmt == "dolly":
        instruction, context = _text(record, "instruction"), record.get("context") or ""
        if not isinstance(context, str):
            raise BadRecord("'context' must be a string")
        user = f"{instruction}\n\n{context}" if context.strip() else instruction
        return {"messages": [{"role": "user", "content": user},
                             {"role": "assistant", "content": _text(record, "response")}]}
    if fmt == "gsm8k":
        reasoning, number = gsm8k_answer(_text(record, "answer"))
        return {"messages": [{"role": "user", "content": _text(record, "question")},
                             {"role": "assistant", "content": f"{reasoning}\n#### {number}"}]}
    if fmt == "prompt_completion":
        completion = record.get("completion")
        reply = _side(record, "completion")[-1] if not isinstance(completion, str) else \
            {"role": "assistant", "content": _text(record, "completion")}
        return {"messages": [*_prompt_turns(record), reply]}
    raise BadRecord(f"SFT learns from messages, dolly, gsm8k or prompt/completion data, not {fmt}")


def to_dpo(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    if fmt != "preference":
        raise BadRecord(f"DPO needs preference pairs (prompt/chosen/rejected), not {fmt} data")
    return preference(record)


def to_grpo(fmt: str, record: dict[str, Any]) -> dict[str, Any]:
    if fmt == "gsm8k":
        _, number = gsm8k_answer(_text(record, "answer"))
        return {"prompt": [{"role": "user", "content": _text(record, "question")}], "answer": number}
    if fmt == "code":
        row = {"prompt": _prompt_turns(record), "tests": _text(record, "tests")}
        return row | {"entry_point": _text(record, "entry_point", allow_empty=True) if record.get("entry_point") is not None
                      else ""}
    if fmt in ("prompt", "prompt_completion"):
        return {"prompt": _prompt_turns(record)} | _extras(record, "prompt", "completion")
    if fmt == "messages":
        turns = messages(record.get("messages"))
        while turns and turns[-1]["role"] == "assistant":
            turns = turns[:-1]
        if not turns or turns[-1]["role"] != "user":
            raise BadRecord("no user turn to prompt with")
        return {"prompt": turns} | _extras(record, "messages")
    raise BadRecord(f"GRPO needs prompts (gsm8k, code, prompt or messages data), not {fmt}")


NORMALIZE: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "sft": to_sft, "dpo": to_dpo, "grpo": to_grpo}


# --- thinking-mode fusion ------------------------------------------------------------------

def split_thinking(content: str) -> tuple[str | None, str]:
    """(reasoning or None, answer) of an assistant reply."""
    stripped = content.lstrip()
    if not stripped.startswith(THINK_OPEN) or THINK_CLOSE not in stripped:
        return None, content
    head, _, answer = stripped[len(THINK_OPEN):].partition(THINK_CLOSE)
    return head.strip(), answer.lstrip()


def fuse_thinking(row: dict[str, Any], mode: str) -> dict[str, Any]:
    """Qwen3's thinking-mode fusion for one SFT row: switch on the last user turn, and a think
    block on the reply (the trace for /think, an empty one for /no_think)."""
    turns = [dict(m) for m in row["messages"]]
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=None)
    if last_user is None:
        raise BadRecord("thinking-mode fusion needs a user turn to mark /think or /no_think")
    reply = next((m for m in turns[last_user + 1:] if m["role"] == "assistant"), None)
    if reply is None:
        raise BadRecord("thinking-mode fusion needs an assistant reply after the last user turn")
    reasoning, answer = split_thinking(reply["content"])
    if mode == "think":
        if not reasoning:
            raise BadRecord(f"a 'thinking: think' source needs a {THINK_OPEN}...{THINK_CLOSE} trace in the reply")
    else:
        reply["content"] = EMPTY_THINK + answer
    turns[last_user]["content"] = f"{turns[last_user]['content'].rstrip()} /{mode}"
    return {"messages": turns}


# --- loading -------------------------------------------------------------------------------

def load_source(source: DataSource, method: Method) -> tuple[list[tuple[str, dict[str, Any]]], Path | dict[str, Any]]:
    """The source's rows, each with where it was read (`file:line`), and its lineage origin."""
    records, origin = _records(source)
    rows: list[tuple[str, dict[str, Any]]] = []
    fmt = None if source.format == "auto" else source.format
    for where, record in records:
        if source.limit is not None and len(rows) >= source.limit:
            break
        try:
            fmt = fmt or detect_format(record)
            row = NORMALIZE[method](fmt, record)
            if source.system_prompt and "prompt" in row and row["prompt"][0]["role"] != "system":
                row["prompt"] = [{"role": "system", "content": source.system_prompt}, *row["prompt"]]
            if source.system_prompt and "messages" in row and row["messages"][0]["role"] != "system":
                row["messages"] = [{"role": "system", "content": source.system_prompt}, *row["messages"]]
            if source.thinking is not None:
                if method != "sft":
                    raise BadRecord("thinking-mode fusion applies to SFT data")
                row = fuse_thinking(row, source.thinking)
        except BadRecord as exc:
            raise PosttrainError(f"{where}: {exc}") from None
        rows.append((where, row))
    return rows, origin


def load(sources: list[DataSource], method: Method, seed: int = 0) -> Dataset:
    """Load and check every source before training starts; mixed sources are shuffled together
    (seeded), so a fusion of thinking and non-thinking data interleaves them."""
    if not sources:
        raise PosttrainError("the recipe has no data: add at least one entry under `data:`")
    placed: list[tuple[str, dict[str, Any]]] = []
    origins: list[Path | dict[str, Any]] = []
    for source in sources:
        loaded, origin = load_source(source, method)
        if not loaded and len(sources) > 1:
            print(f"warning: {source.path} has no records; training on the other sources", flush=True)
        placed.extend(loaded)
        origins.append(origin)
    if not placed:
        raise PosttrainError(f"{', '.join(s.path for s in sources)}: no records")
    rows = _uniform_columns([row for _, row in placed])
    _check_column_types([where for where, _ in placed], rows)
    if len(sources) > 1:
        random.Random(seed).shuffle(rows)
    return Dataset(rows=rows, sources=origins)


def _uniform_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Arrow needs one schema: give every row every column (GRPO sources may differ in extras)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    if all(len(row) == len(keys) for row in rows):
        return rows
    return [{k: row.get(k) for k in keys} for row in rows]


# Built by the normalizers above: always lists of {"role", "content"} strings.
_CONVERSATIONS = ("messages", "prompt", "chosen", "rejected")


def _check_column_types(wheres: list[str], rows: list[dict[str, Any]]) -> None:
    """A column Arrow cannot hold (GRPO carries extra columns as they are: an `x` that is a number
    on one line and text on another) is refused at the first record that breaks it."""
    import pyarrow as pa

    def fits(column: str, end: int) -> bool:
        try:
            pa.array([row[column] for row in rows[:end]])
            return True
        except (pa.ArrowException, OverflowError):  # OverflowError: an integer beyond 64 bits
            return False

    for column in rows[0]:
        if column in _CONVERSATIONS or fits(column, len(rows)):
            continue
        good, bad = 0, len(rows)  # the shortest prefix that fails ends at the culprit
        while bad - good > 1:
            middle = (good + bad) // 2
            good, bad = (middle, bad) if fits(column, middle) else (good, middle)
        raise PosttrainError(f"{wheres[bad - 1]}: {column!r} has another type than in the records before it "
                             "(a column holds one type)")
