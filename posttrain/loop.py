"""`posttrain loop`: the flywheel, one turn of it per call.

    1. export   new preference pairs (since the last turn): arena votes and/or feedback on the API's answers
    2. dpo      LoRA DPO from the champion on those pairs     -> candidate (adapter, stage dpo)
    3. merge    the candidate into a full checkpoint           -> the next turn's champion
    4. serve    champion and candidate from one vLLM engine behind the front door
    5. eval     lm-eval (+ MT-Bench with a judge) on both, through that front door
    6. report   the nightly report, the champion as baseline
    7. promote  the candidate (merged) joins the arena, unless a score regressed beyond the threshold

Every step prints what it did and is recorded in `$POSTTRAIN_HOME/runs/loop/turn-N/state.json`;
a re-run after a failure continues the unfinished turn where it stopped (DPO from its last
checkpoint). A turn with no new votes or feedback changes nothing.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from posttrain.appliance import TUNED_MODEL
from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.evaluate.report import BenchSuite, MTBenchSuite
from posttrain.files import write_atomically
from posttrain.registry import Registry
from posttrain.store import utcnow
from posttrain.train.dpo import DPORecipe


class LoopRecipe(Recipe):
    base: str = Field(TUNED_MODEL, description="The champion: the registered model the candidate is trained from "
                      "(default: the tuned model `posttrain up` serves).")
    sources: list[Literal["arena", "feedback"]] = Field(
        ["arena"], min_length=1, description="Where preference pairs come from: arena votes (`source` says which) "
        "and/or feedback on the API's harvested answers (chosen choices, corrections, thumbs up vs down).")
    source: str = Field("human", description="Which votes: arena, side-by-side, human (both), judge, all.")
    min_pairs: int = Field(1, gt=0, description="Fewer new preference pairs than this: no turn.")
    dpo: DPORecipe = Field(default_factory=DPORecipe, description="DPO settings (model, output and data are set).")
    benchmarks: list[BenchSuite] = Field(default_factory=lambda: [BenchSuite(name="loop", limit=50)])
    mt_bench: list[MTBenchSuite] = Field(default_factory=list, description="e.g. a judge behind another endpoint.")
    threshold: float = Field(2.0, gt=0, description="A drop beyond this many stderr units is a regression.")


class Turn:
    """One turn's folder and record of finished steps."""

    def __init__(self, root: Path, number: int):
        self.number = number
        self.dir = root / f"turn-{number}"
        self.path = self.dir / "state.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    @property
    def finished(self) -> bool:
        return "promote" in self.state

    def record(self, step: str, **facts: Any) -> None:
        self.state[step] = facts | {"at": utcnow().isoformat(timespec="seconds")}
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, json.dumps(self.state, indent=2, default=str))


def current_turn(root: Path) -> Turn:
    """The unfinished turn, or a new one after the last finished."""
    numbers = sorted(int(p.name.split("-", 1)[1]) for p in root.glob("turn-*") if (p / "state.json").exists())
    if numbers and not (last := Turn(root, numbers[-1])).finished:
        return last
    return Turn(root, (numbers[-1] + 1) if numbers else 1)


def votes_since(root: Path) -> datetime | None:
    """Where the last finished turn's export stopped: its votes are used up."""
    finished = [t for p in root.glob("turn-*") if (t := Turn(root, int(p.name.split("-", 1)[1]))).finished]
    cutoffs = [datetime.fromisoformat(t.state["export"]["until"]) for t in finished if "export" in t.state]
    return max(cutoffs, default=None)


def export_pairs(registry: Registry, recipe: LoopRecipe, out: Path, since: datetime | None, until: datetime):
    """The turn's DPO pairs from the recipe's sources, with feedback given (votes cast) in [since, until)."""
    from posttrain.harvest.export import FEEDBACK_SOURCES, export_dpo
    from posttrain.harvest.logs import Filters

    picked = [*(["arena"] if "arena" in recipe.sources else []),
              *(FEEDBACK_SOURCES if "feedback" in recipe.sources else [])]
    return export_dpo(registry.store, out, Filters(since=since, until=until), sources=picked,
                      arena_source=recipe.source)


def loop(recipe: LoopRecipe, registry: Registry | None = None, say: Callable[[str], None] = print) -> dict[str, Any]:
    """One turn of the flywheel; returns the turn's record (see the module docstring)."""
    from posttrain.evaluate.report import NightlyConfig, nightly
    from posttrain.serve.app import start_front_door
    from posttrain.train.base import last_checkpoint, start_checkpoint
    from posttrain.train.dpo import train_dpo
    from posttrain.train.merge import MERGED_SUFFIX, merge

    registry = registry or Registry()
    root = registry.settings.runs_dir / "loop"
    turn = current_turn(root)
    registry.get(recipe.base)
    prefs = turn.dir / "prefs.jsonl"

    if "export" not in turn.state:
        since, until = votes_since(root), utcnow()
        summary = export_pairs(registry, recipe, prefs, since, until)
        if summary.kept < recipe.min_pairs:
            prefs.unlink(missing_ok=True)
            say(f"turn {turn.number}: {summary.kept} new preference pairs from {' and '.join(recipe.sources)}"
                f"{f' since {since:%Y-%m-%d %H:%M}' if since else ''} (need {recipe.min_pairs}); nothing to do")
            return {"turn": turn.number, "skipped": "not enough new votes", "pairs": summary.kept}
        turn.record("export", file=str(prefs), pairs=summary.kept, since=since, until=until)
        say(f"turn {turn.number} [export]: {summary}")

    champion = start_checkpoint(registry, turn.state.get("dpo", {}).get("champion", recipe.base))
    if champion.name != recipe.base and "dpo" not in turn.state:
        say(f"the champion {recipe.base} is an adapter: its merged form {champion.name} stands in for it")
    # Named after the lineage's root, not the champion's merged name, so names stay short over turns:
    # sft -> sft-loop1 (-merged) -> sft-loop2 (-merged) ...
    root_name = re.sub(rf"(-loop\d+)?{MERGED_SUFFIX}$", "", recipe.base)
    candidate = turn.state.get("dpo", {}).get("candidate", f"{root_name}-loop{turn.number}")

    if "dpo" not in turn.state:
        dpo = recipe.dpo.model_copy(update={"model": champion.name, "output": candidate,
                                            "data": [recipe.dpo.data[0].model_copy(update={"path": str(prefs)})]})
        resume = last_checkpoint(registry.settings.runs_dir / candidate) is not None
        say(f"turn {turn.number} [dpo]: {'resuming' if resume else 'training'} {candidate} from {champion.name} "
            f"on {turn.state['export']['pairs']} pairs")
        if registry.find(candidate) is None:
            train_dpo(dpo, registry, resume=resume)
        turn.record("dpo", champion=champion.name, candidate=candidate)

    merged = f"{candidate}{MERGED_SUFFIX}"
    if "merge" not in turn.state:
        if registry.find(merged) is None:
            merge(candidate, merged, registry)
        turn.record("merge", merged=merged)
        say(f"turn {turn.number} [merge]: {merged} (full checkpoint, the next turn's champion if promoted)")

    if "evaluate" not in turn.state:
        # A registered judge with no endpoint of its own is served beside them.
        judges = [s.judge_model for s in recipe.mt_bench if s.judge_base_url is None and registry.find(s.judge_model)]
        served = list(dict.fromkeys([champion.name, candidate, *judges]))
        say(f"turn {turn.number} [serve]: {', '.join(served)}")
        with start_front_door(served, registry=registry) as door:
            config = NightlyConfig(models=[candidate], baseline=champion.name, base_url=door.base_url,
                                   threshold=recipe.threshold, benchmarks=recipe.benchmarks, mt_bench=recipe.mt_bench,
                                   out=str(turn.dir / "report.html"))
            say(f"turn {turn.number} [evaluate]: {', '.join(s.name for s in config.suites)} on both")
            report = nightly(config, registry=registry)
        regressions = [str(r) for r in report.regressions if r.model == candidate and r.against.startswith("baseline")]
        turn.record("evaluate", report=str(report.html_path), regressions=regressions, failures=report.failures)
        say(f"turn {turn.number} [report]: {report.html_path}")
        say(report.markdown)

    if "promote" not in turn.state:
        evaluated = turn.state["evaluate"]
        blockers = evaluated["regressions"] + evaluated["failures"]
        if blockers:
            say(f"turn {turn.number} [promote]: {candidate} stays out of the arena:\n  " + "\n  ".join(blockers))
        else:
            registry.enter_arena(merged)
            say(f"turn {turn.number} [promote]: no regression against {champion.name}; {merged} joins the arena "
                f"(served by the next `posttrain up`); build on it with `posttrain loop --base {merged}`")
        turn.record("promote", promoted=not blockers, model=merged)
    return {"turn": turn.number, **turn.state}
