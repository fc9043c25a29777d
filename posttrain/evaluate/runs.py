"""Evaluation runs in the store: every benchmark or MT-Bench run is one EvalRun row (model, suite,
config, lineage, harness version, status running -> done/failed) with one EvalScore row per
(task, metric); the per-sample logs go to `$POSTTRAIN_HOME/evals/<run id>/`.

This is the results history the nightly report and `posttrain models show` read.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from sqlalchemy import select

from posttrain.registry import Registry
from posttrain.store import EvalRun, EvalScore, Store, utcnow


@dataclass(frozen=True)
class Score:
    """One number an evaluation produced, as it is stored."""

    task: str
    metric: str
    value: float
    stderr: float | None = None
    n: int | None = None


def evals_dir(registry: Registry) -> Path:
    return registry.settings.home / "evals"


@contextmanager
def recorded_run(registry: Registry, model: str, suite: str, config: dict[str, Any],
                 harness_version: str) -> Iterator[EvalRun]:
    """An EvalRun row marked "running" for the duration of the block; if the block raises
    (Ctrl-C included) the row is marked "failed" with the reason, so a crashed run never
    looks finished and never feeds the report."""
    # A judge under evaluation may be a remote model, with no lineage here.
    lineage = [c.name for c in registry.lineage(model)] if registry.find(model) else []
    run = EvalRun(model=model, suite=suite, config=config, harness_version=harness_version, status="running",
                  lineage=lineage)
    registry.store.add(run)
    try:
        yield run
    except BaseException as exc:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _update(registry.store, run, status="failed", finished_at=utcnow(), config={**run.config, "error": reason})
        raise


def finish_run(store: Store, run: EvalRun, scores: Iterable[Score], samples_path: Path | None,
               config: dict[str, Any] | None = None) -> list[EvalScore]:
    """Store the scores and mark the run done, in one transaction."""
    rows = [EvalScore(run_id=run.id, model=run.model, task=s.task, metric=s.metric, value=s.value,
                      stderr=s.stderr, n=s.n) for s in scores if math.isfinite(s.value)]
    with store.session() as s:
        s.add_all(rows)
    _update(store, run, status="done", finished_at=utcnow(), samples_path=str(samples_path) if samples_path else None,
            config={**run.config, **(config or {})})
    return rows


def _update(store: Store, run: EvalRun, **values: Any) -> None:
    with store.session() as s:
        row = s.get(EvalRun, run.id)
        for key, value in values.items():
            setattr(row, key, value)
            setattr(run, key, value)


def write_samples(registry: Registry, run: EvalRun, files: dict[str, Iterable[dict[str, Any]]],
                  default=str) -> Path:
    """Write `{file name: records}` as JSONL into `evals/<run id>/`, all or nothing: the folder
    is filled under a temporary name and renamed into place."""
    root = evals_dir(registry)
    root.mkdir(parents=True, exist_ok=True)
    target = root / str(run.id)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.id}-", dir=root))
    try:
        for name, records in files.items():
            with (tmp / name).open("w") as fh:
                for record in records:
                    fh.write(json.dumps(record, default=default, ensure_ascii=False) + "\n")
        if target.exists():  # a database reset can reuse a run id; the old logs are stale
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def score_history(store: Store, models: Iterable[str] = (), suites: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Every score of finished runs (optionally of some models / suites), oldest first, with its
    run's suite, time and whether higher is better."""
    stmt = (select(EvalScore, EvalRun).join(EvalRun, EvalRun.id == EvalScore.run_id)
            .where(EvalRun.status == "done").order_by(EvalRun.finished_at, EvalRun.id, EvalScore.id))
    if models := list(models):
        stmt = stmt.where(EvalRun.model.in_(models))
    if suites := list(suites):
        stmt = stmt.where(EvalRun.suite.in_(suites))
    with store.session() as s:
        pairs = s.execute(stmt).all()
    return [{
        "run_id": run.id, "model": run.model, "suite": run.suite, "task": score.task, "metric": score.metric,
        "value": score.value, "stderr": score.stderr, "n": score.n, "finished_at": run.finished_at,
        "higher_is_better": run.config.get("higher_is_better", {}).get(score.task, {}).get(score.metric, True),
    } for score, run in pairs]
