"""HumanEval through `posttrain eval bench --tasks humaneval --data-dir DIR`: lm-eval's prompt and
generation settings, every completion scored in posttrain's bubblewrap sandbox (the real one, no
mocks). Four problems written for these tests in fixtures/humaneval/; the original 164 when
../shared holds them."""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from posttrain import sandbox
from posttrain.errors import PosttrainError
from posttrain.evaluate import bench
from posttrain.evaluate.bench import run_bench
from posttrain.evaluate.tasks.utils import humaneval_verdicts, load_humaneval, pass_at_1, read_humaneval

FIXTURES = Path(__file__).parent / "fixtures"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
METRIC = ("humaneval", "pass@1,sandbox")


def _sandbox_missing() -> str | None:
    try:
        sandbox.require()
    except PosttrainError as exc:
        return f"bubblewrap cannot run here (`make sandbox` installs Debian's bubblewrap as root): {exc}"
    return None


pytestmark = pytest.mark.skipif(bool(_sandbox_missing()), reason=_sandbox_missing() or "")


def _records(data_dir: Path) -> list[dict]:
    path = next((data_dir / "humaneval").glob("HumanEval.jsonl*"))
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _score(docs: list[dict], completions: list[str]) -> list[float]:
    verdicts = humaneval_verdicts([[c] for c in completions], docs)
    return [pass_at_1(doc, [v])["pass@1"] for doc, v in zip(docs, verdicts)]


def test_the_scoring_passes_canonical_solutions_and_fails_wrong_ones():
    docs = list(load_humaneval(str(FIXTURES / "humaneval"))["test"])
    canonical = [r["canonical_solution"] for r in _records(FIXTURES)]
    assert _score(docs, canonical) == [1.0] * 4
    wrong = ["    return None\n", "    return values\n", "    return True\n", "    return {}\n"]
    assert _score(docs, wrong) == [0.0] * 4
    # Completions that try to claim a pass without one: the verdict never comes from them.
    forged = ["    print('passed')\n    import os\n    os._exit(0)\n", "    raise SystemExit(0)\n",
              "    import builtins\n    builtins.AssertionError = type('Nope', (Exception,), {})\n    return 0\n",
              "    while True:\n        pass\n"]
    assert _score(docs, forged) == [0.0] * 4


def test_humaneval_runs_in_process_with_every_completion_in_the_sandbox(registry, tiny, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)  # posttrain never needs it
    result = run_bench(tiny.name, ["humaneval"], data_dir=FIXTURES, max_gen_toks=16, registry=registry)
    [score] = result.scores
    assert (score.task, score.metric) == METRIC and score.n == 4
    assert score.value == 0.0  # a tiny random model writes no working code
    samples = [json.loads(line) for line in (result.samples_path / "humaneval.jsonl").open()]
    assert [s["doc"]["task_id"] for s in samples] == [f"Fixture/{i}" for i in range(4)]
    assert all(s["arguments"][0][0] == s["doc"]["prompt"] for s in samples)  # the prompt as is, zero-shot
    assert all(s["filtered_resps"][0][0]["passed"] is False and s["pass@1"] == 0.0 for s in samples)
    assert result.run.config["data_dir"] == str(FIXTURES)


def canonical_lm(solutions: dict[str, str]):
    """An lm-eval model that answers each HumanEval prompt with its canonical solution, to check
    that the whole path (task config, loader, sandbox, metric, store) scores a correct model 1."""
    bench.go_offline()
    from lm_eval.api.model import LM

    class CanonicalLM(LM):
        def generate_until(self, requests):
            return [solutions[request.args[0]] for request in requests]

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

    return CanonicalLM()


@pytest.mark.parametrize("data_dir", [FIXTURES, SHARED], ids=["fixture", "shared-164"])
def test_canonical_solutions_score_1_through_the_whole_eval_path(registry, tiny, monkeypatch, data_dir):
    if not (data_dir / "humaneval").is_dir():
        pytest.skip(f"no {data_dir / 'humaneval'} (HumanEval's original file, test data only)")
    solutions = {r["prompt"]: r["canonical_solution"] for r in _records(data_dir)}
    monkeypatch.setattr(bench, "_in_process_lm", lambda *args: canonical_lm(solutions))
    result = run_bench(tiny.name, ["humaneval"], data_dir=data_dir, registry=registry)
    [score] = result.scores
    assert (score.task, score.metric, score.value, score.n) == (*METRIC, 1.0, len(solutions))


def test_bad_data_fails_in_one_line_naming_the_file_and_line(registry, tiny, tmp_path):
    def error(data_dir: Path | None) -> str:
        with pytest.raises(PosttrainError) as caught:
            run_bench(tiny.name, ["humaneval"], data_dir=data_dir, registry=registry)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    assert error(None).startswith("humaneval reads a local copy of its data: pass --data-dir DIR")
    assert error(tmp_path).startswith(f"--data-dir {tmp_path}: no local copy of humaneval")
    folder = tmp_path / "humaneval"
    folder.mkdir()
    assert error(tmp_path).startswith(f"{folder}: no HumanEval.jsonl.gz or HumanEval.jsonl in it")
    good = (FIXTURES / "humaneval" / "HumanEval.jsonl").read_text().splitlines()
    path = folder / "HumanEval.jsonl"
    for lines, message in [
        ([good[0], '{"task_id": "x",'], f"{path}:2: not JSON: "),
        ([good[0], "", "[1, 2]"], f"{path}:3: a HumanEval problem is a JSON object, not list"),
        ([json.dumps({**json.loads(good[0]), "test": None})], f"{path}:1: not a HumanEval problem: test missing"),
        ([json.dumps({**json.loads(good[0]), "entry_point": "count vowels"})], f"{path}:1: entry_point 'count vowels'"),
        ([], f"{path}: no problems in it"),
    ]:
        path.write_text("\n".join(lines))
        assert error(tmp_path).startswith(message)
    (folder / "HumanEval.jsonl.gz").write_bytes(b"not gzip")  # preferred over the plain file
    assert error(tmp_path).startswith(f"{folder / 'HumanEval.jsonl.gz'}: cannot read it: ")


def test_cli_reports_a_malformed_record_in_one_line(tiny, tmp_path):
    (tmp_path / "humaneval").mkdir()
    (tmp_path / "humaneval" / "HumanEval.jsonl").write_text("{oops\n")
    result = subprocess.run([sys.executable, "-m", "posttrain", "eval", "bench", "--model", tiny.name,
                             "--tasks", "humaneval", "--data-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"posttrain: error: {tmp_path}/humaneval/HumanEval.jsonl:1: not JSON: "
                                     f"Expecting property name enclosed in double quotes (column 2)")


def test_lm_evals_own_code_tasks_never_run(monkeypatch):
    # lm-eval's full index takes seconds to minutes to build; build it once here.
    monkeypatch.setattr(bench, "_task_manager", functools.cache(bench._task_manager))
    with ExitStack() as stack:
        manager, names = bench.resolve_tasks(["humaneval", "gsm8k"], None, stack)
    assert names == ["humaneval", "gsm8k"]
    assert manager.task_index["humaneval"].yaml_path == bench.TASKS_DIR / "humaneval.yaml"
    with pytest.raises(PosttrainError, match=r"^humaneval_plus, mbpp: lm-eval would run the model's code in this "
                                             r"process; posttrain runs model code only in its sandbox"):
        bench.resolve_tasks(["humaneval", "humaneval_plus", "mbpp"], None, ExitStack())


def test_read_humaneval_reads_gzip_like_the_original_release(tmp_path):
    plain = FIXTURES / "humaneval" / "HumanEval.jsonl"
    packed = tmp_path / "HumanEval.jsonl.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_humaneval(packed) == read_humaneval(plain)
    assert set(read_humaneval(plain)[0]) == {"task_id", "prompt", "test", "entry_point"}
