"""posttrain.sandbox with the real bubblewrap sandbox (no mocks): test formats, the red-team list
(each attempt scores 0 and leaves the host untouched), refusal without bubblewrap, the code
sample, and HumanEval's canonical solutions when ../shared holds the data."""

from __future__ import annotations

import gc
import gzip
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from posttrain import sandbox
from posttrain.errors import PosttrainError
from posttrain.sandbox import Job
from posttrain.train import rewards

HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval" / "HumanEval.jsonl.gz"
ADD = "def add(a, b):\n    return a + b\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\nassert add(2, 2) == 4"
CHECK = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"


def _bwrap_missing() -> str | None:
    try:
        sandbox.require()
    except PosttrainError as exc:
        return f"bubblewrap cannot run here (`make sandbox` installs Debian's bubblewrap as root): {exc}"
    return None


pytestmark = pytest.mark.skipif(bool(_bwrap_missing()), reason=_bwrap_missing() or "")


def score(code: str, tests: str = TESTS, entry_point: str | None = None, **limits) -> float:
    return sandbox.run(Job(code, tests, entry_point), **{"timeout_s": 3.0, **limits}).score


def test_plain_asserts_score_the_fraction_that_passes():
    assert score(ADD) == 1.0
    assert score("def add(a, b):\n    return a * b\n") == pytest.approx(1 / 3)  # only 2 + 2 == 2 * 2
    assert score("def add(a, b) return") == 0.0
    setup = "import math\nassert math.isclose(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 2"
    verdict = sandbox.run(Job(ADD, setup))
    assert (verdict.passed, verdict.total) == (2, 2)  # the import runs as setup and is no test
    assert sandbox.run(Job(ADD, "x = 1")).error.startswith("the tests have no assert")


def test_humaneval_check_with_entry_point_is_one_test():
    assert score(ADD, CHECK, "add") == 1.0
    assert score("def add(a, b):\n    return a - b\n", CHECK, "add") == 0.0
    assert "defines no plus" in sandbox.run(Job(ADD, CHECK, "plus")).error
    tricky = ("def helper(xs):\n    return sorted(xs)\n\ndef sort_in_place(xs):\n    xs.sort()\n\n"
              "def parse(s):\n    if not s:\n        raise ValueError('empty')\n    return tuple(s.split(','))\n")
    check = ("def check(candidate):\n    xs = [3, 1, 2]\n    sort_in_place(xs)\n    assert xs == helper([2, 3, 1])\n"
             "    assert candidate('a,b') == ('a', 'b')\n    try:\n        candidate('')\n    except ValueError:\n"
             "        pass\n    else:\n        assert False\n")
    assert score(tricky, check, "parse") == 1.0  # helpers, in-place changes and builtin exceptions cross


FORGERIES = {
    "prints the old result line": "print('PASSED 3/3')\nprint('{\"passed\": 3, \"error\": null}')",
    "exits 0 early (os._exit)": "import os, sys\nprint('PASSED 3/3'); sys.stdout.flush(); os._exit(0)",
    "exits 0 early (sys.exit)": "import sys\nsys.exit(0)",
    "raises SystemExit": "raise SystemExit(0)",
    "raises KeyboardInterrupt": "raise KeyboardInterrupt",
    "sys.exit inside the tested function": "def add(a, b):\n    import sys\n    sys.exit(0)\n",
    "os._exit inside the tested function": "def add(a, b):\n    import os\n    os._exit(0)\n",
    "KeyboardInterrupt inside the tested function": "def add(a, b):\n    raise KeyboardInterrupt\n",
    "patches AssertionError": "AssertionError = type('X', (BaseException,), {})\nimport builtins\n"
                              "builtins.AssertionError = AssertionError\ndef add(a, b):\n    return 7\n",
    "patches builtins": "import builtins\nbuiltins.__build_class__ = None\nbuiltins.all = builtins.any = "
                        "lambda *a: True\nbuiltins.isinstance = lambda *a: True\ndef add(a, b):\n    return 7\n",
    "an object equal to everything": "class Yes:\n    def __eq__(self, other):\n        return True\n"
                                     "    __ne__ = lambda self, other: False\ndef add(a, b):\n    return Yes()\n",
    "an int subclass equal to everything": "class I(int):\n    def __eq__(self, other):\n        return True\n"
                                           "def add(a, b):\n    return I(0)\n",
    "patches the harness in its own process": "import __main__\n__main__.answer = lambda names, request: "
                                              "['ok', [['add', 'data', 3]] if request[0] == 'names' else True, []]\n",
    "writes a verdict to every descriptor": "import os\nfor fd in range(64):\n    try:\n        os.write(fd, "
                                            "b'{\"passed\": 3, \"error\": null}\\n')\n"
                                            "    except OSError:\n        pass\n",
    "kills or stops the judge": "import os, signal\nfor pid in (os.getppid(), -1):\n    for sig in (signal.SIGSTOP, "
                                "signal.SIGKILL):\n        try:\n            os.kill(pid, sig)\n"
                                "        except OSError:\n            pass\ndef add(a, b):\n    return 7\n",
    "loops forever": "while True:\n    pass",
    "loops forever when called": "def add(a, b):\n    while True:\n        pass\n",
    "floods its output": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
    "exhausts memory": "x = bytearray(3 * 1024**3)\n" + ADD.replace("a + b", "7"),
}


@pytest.mark.parametrize("code", FORGERIES.values(), ids=FORGERIES.keys())
def test_a_completion_cannot_forge_its_score(code):
    assert score(code, timeout_s=1.5) == 0.0
    assert score(code, CHECK, "add", timeout_s=1.5) == 0.0


def test_the_tests_use_their_own_builtins_and_modules():
    shadows = ("import math\nmath.isclose = lambda *a, **k: True\nabs = lambda x: 0\nlen = lambda x: 3\n"
               "def add(a, b):\n    return 7\n")
    tests = ("import math\nassert math.isclose(add(1, 2), 3)\nassert abs(add(1, 2) - 3) < 1e-9\n"
             "assert len(str(add(1, 2))) == 3")
    assert score(shadows, tests) == 0.0


def test_the_completion_never_holds_the_tests():
    # Were the tests in its memory, this completion would find the expected value there.
    snoop = ("import gc\ndef add(a, b):\n    wanted = str(a + b)  # not in this source, only in the tests\n"
             "    for obj in gc.get_objects():\n        if wanted in repr(obj)[:100000]:\n            return a + b\n"
             "    return 0\n")
    assert score(snoop, "assert add(987654321, 1) == 987654322") == 0.0
    check = "def check(candidate):\n    assert candidate(987654321, 1) == 987654322\n"
    assert score(snoop, check, "add") == 0.0
    assert score(ADD, check, "add") == 1.0


def test_a_timeout_keeps_the_tests_passed_before_it():
    code = ADD + "def hang():\n    while True:\n        pass\n"
    verdict = sandbox.run(Job(code, "assert add(1, 2) == 3\nassert hang()\nassert add(2, 2) == 4"), timeout_s=1.5)
    assert (verdict.passed, verdict.total) == (1, 3) and "timed out" in verdict.error


def test_a_fork_bomb_is_capped_dies_with_the_sandbox_and_spares_the_jobs_beside_it(monkeypatch):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    uid, drawn = sandbox.CANDIDATE_UIDS[12345], sandbox.candidate_uid
    first = iter([uid])
    monkeypatch.setattr(sandbox, "candidate_uid", lambda: next(first, None) or drawn())  # the bomb's uid, known
    before = time.monotonic()
    with ThreadPoolExecutor(1) as pool:
        bombing = pool.submit(score, bomb, timeout_s=3.0)
        time.sleep(1.0)
        if os.geteuid() == 0:  # each job's completion has a uid of its own, and so its own process limit
            assert score("import os\nos.fork()\n" + ADD) == 1.0  # (with one uid for all this fork failed)
        assert bombing.result() == 0.0
    assert time.monotonic() - before < 3.0 + sandbox.GRACE_S
    if os.geteuid() == 0:  # then the completion ran as that uid on the host too
        deadline = time.monotonic() + 10  # the kernel kills the namespace's processes: a while on a busy host
        while _processes_of(uid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_of(uid), "processes of the sandbox's uid survived it"


def _processes_of(uid: int) -> list[Path]:
    found = []
    for process in Path("/proc").iterdir():
        try:
            if process.name.isdigit() and process.stat().st_uid == uid:
                found.append(process)
        except FileNotFoundError:  # it exited meanwhile
            pass
    return found


def test_the_completion_sees_no_environment_files_or_network(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CANARY", "hunter2")
    decoys = [tmp_path / "decoy.txt", Path(__file__).parent / ".sandbox-decoy",
              Path.home() / ".posttrain-sandbox-decoy"]
    listener = socket.create_server(("127.0.0.1", 0))
    try:
        for decoy in decoys:
            decoy.write_text("secret")
        probe = f"""
import os, socket
def env():
    return os.environ.get("POSTTRAIN_CANARY")
def read(path):
    try:
        return open(path).read()
    except OSError as exc:
        return type(exc).__name__
def write(path):
    try:
        open(path, "w").write("pwned")
        return "written"
    except OSError as exc:
        return type(exc).__name__
def trace_judge():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    return [libc.ptrace(16, os.getppid(), 0, 0), ctypes.get_errno(), os.path.exists("/proc/1")]
def connect():
    try:
        socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=1)
        return "connected"
    except OSError as exc:
        return type(exc).__name__
"""
        targets = [str(tmp_path / "pwned"), "/usr/pwned", str(Path(__file__).parent / "pwned"), "/tmp/ok"]
        tests = ["assert env() is None", "assert connect() != 'connected'", "assert trace_judge() == [-1, 1, False]"]
        tests += [f"assert read({str(d)!r}) == 'FileNotFoundError'" for d in decoys]
        tests += [f"assert write({t!r}) != 'written'" for t in targets[:3]]
        tests += [f"assert write({targets[3]!r}) == 'written'"]  # its own /tmp is writable
        verdict = sandbox.run(Job(probe, "\n".join(tests)))
        assert (verdict.passed, verdict.total) == (len(tests), len(tests)), verdict
        assert not any(Path(t).exists() for t in targets[:3])
    finally:
        listener.close()
        for decoy in decoys:
            decoy.unlink(missing_ok=True)


def test_refuses_without_bubblewrap_unless_opted_in(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    sandbox._probe.cache_clear()
    try:
        with pytest.raises(PosttrainError, match="apt-get install bubblewrap"):
            sandbox.run(Job(ADD, TESTS))
        with pytest.raises(PosttrainError, match="unsafe_exec"):
            rewards.make("code_tests")
        with caplog.at_level(logging.WARNING, logger="posttrain.sandbox"):
            sandbox._warn_unsafe.cache_clear()
            reward = rewards.make("code_tests", unsafe_exec=True)
        assert "WITHOUT a sandbox" in caplog.text
        assert reward([ADD, "import os\nos._exit(0)"], [TESTS, TESTS]) == [1.0, 0.0]  # still unforgeable
    finally:
        sandbox._probe.cache_clear()


def test_code_reward_reads_both_formats_from_grpo_rows():
    completions = [f"```python\n{ADD}```", "def add(a, b):\n    return 7\n", ADD, ADD]
    scores = rewards.code_tests(completions, [TESTS, TESTS, CHECK, None], entry_point=["", "", "add", "add"])
    assert scores == [1.0, 0.0, 1.0, None]


def test_every_code_sample_solution_passes_and_a_stub_fails():
    rows = [json.loads(line) for line in (Path(sandbox.__file__).parent / "data/samples/code.jsonl").open()]
    assert any("def check(" in row["tests"] for row in rows)
    jobs = [Job(row["solution"], row["tests"], row["entry_point"]) for row in rows]
    stubs = [Job(f"def {row['entry_point']}(*args):\n    return None\n", row["tests"], row["entry_point"])
             for row in rows]
    verdicts = sandbox.run_many(jobs + stubs)
    assert [v.score for v in verdicts[:len(rows)]] == [1.0] * len(rows), verdicts
    assert all(v.score < 1.0 for v in verdicts[len(rows):])


@pytest.mark.skipif(not HUMANEVAL.exists(), reason=f"HumanEval is not at {HUMANEVAL} (../shared is absent)")
def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    problems = [json.loads(line) for line in gzip.open(HUMANEVAL, "rt")]
    canonical = [Job(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"]) for p in problems]
    verdicts = sandbox.run_many(canonical, timeout_s=10.0)
    failed = {p["task_id"]: v.error for p, v in zip(problems, verdicts) if v.score != 1.0}
    assert not failed
    wrong = [Job(p["prompt"] + "    return None\n", p["test"], p["entry_point"]) for p in problems[::4]]
    wrong += [Job(p["prompt"] + p["canonical_solution"], p["test"], p["entry_point"] + "_x") for p in problems[::16]]
    assert [v.score for v in sandbox.run_many(wrong)] == [0.0] * len(wrong)


class _Cycle:
    """Garbage whose finalizer runs Python code: the collector may then switch threads mid-parse."""
    def __init__(self):
        self.me = self

    def __del__(self):
        time.sleep(0)


def test_tests_parse_safely_from_many_threads():
    # Regression (CI, Python 3.11): run_many's threads parsing HumanEval tests at once raised
    # "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905).
    interval, threshold = sys.getswitchinterval(), gc.get_threshold()
    sys.setswitchinterval(1e-6)
    gc.set_threshold(10)
    tests = "def check(candidate):\n" + "".join(f"    assert candidate({list(range(k))}) == {k}\n" for k in range(60))

    def parse_often(_):
        for _ in range(40):
            [_Cycle() for _ in range(50)]
            sandbox._plan(Job("", tests, "f"))

    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(parse_often, range(8)))
    finally:
        sys.setswitchinterval(interval)
        gc.set_threshold(*threshold)


def test_host_environment_is_untouched_by_parallel_runs():
    # many sandboxes at once share nothing: each sees only its own /tmp (a name no one else uses,
    # so the host check below is about this test alone)
    mine = f"/tmp/posttrain-sandbox-{uuid.uuid4().hex}"
    code = f"open({mine!r}, 'a').write('x')\ndef count():\n    return len(open({mine!r}).read())\n"
    verdicts = sandbox.run_many([Job(code, "assert count() == 1")] * 8, workers=4)
    assert [v.score for v in verdicts] == [1.0] * 8
    assert not os.path.exists(mine)


NON_ROOT = """
import json, os
from posttrain import sandbox
from posttrain.errors import PosttrainError
try:
    sandbox.require()
except PosttrainError as exc:
    print(json.dumps({"refused": str(exc)}))
    raise SystemExit
add = "def add(a, b):\\n    return a + b\\n"
kill = "import os, signal\\nos.kill(os.getppid(), signal.SIGSTOP)\\n" + add
jobs = [sandbox.Job(add, "assert add(1, 2) == 3"), sandbox.Job("import os\\nos._exit(0)", "assert add(1, 2) == 3"),
        sandbox.Job(kill, "assert add(1, 2) == 3")]
print(json.dumps({"scores": [v.score for v in sandbox.run_many(jobs, timeout_s=10.0)], "uid": os.geteuid()}))
"""


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists("/usr/bin/python3"),
                    reason="needs root, setpriv and /usr/bin/python3 to run posttrain as another user")
def test_as_a_non_root_user_the_sandbox_uses_a_user_namespace():
    repo = Path(__file__).resolve().parents[1]
    run = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                          "/usr/bin/python3", "-c", NON_ROOT], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": "/tmp"}, cwd="/")
    result = json.loads(run.stdout or "{}")
    if "refused" in result:
        pytest.skip(f"this host refuses unprivileged user namespaces: {result['refused']}")
    assert result == {"scores": [1.0, 0.0, 0.0], "uid": 65534}, run.stderr


def test_data_generate_filters_code_samples_in_the_sandbox():
    from posttrain.train.data import DataSource, load
    from posttrain.train.distill import GenerateRecipe, _scores

    rows = load([DataSource(path="builtin:code")], "grpo").rows
    samples = [json.loads(line) for line in (Path(sandbox.__file__).parent / "data/samples/code.jsonl").open()]
    recipe = GenerateRecipe.load(None, ["teacher=t", "prompts.0.path=builtin:code", "rewards.0.name=code_tests"])
    for row, sample in [(rows[0], samples[0]), (rows[-1], samples[-1])]:  # a plain-assert row, a HumanEval row
        replies = [f"Here you go:\n```python\n{sample['solution']}\n```", "import sys\nsys.exit(0)"]
        assert _scores(recipe, row, replies) == [1.0, 0.0]


def test_unsafe_exec_flag_reaches_only_the_code_reward(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    import posttrain.train.distill
    from posttrain.cli import app

    seen = {}
    monkeypatch.setattr(posttrain.train.distill, "generate", lambda recipe, out: seen.update(recipe=recipe))
    args = ["data", "generate", "--teacher", "t", "--reward", "code_tests", "--reward", "length_penalty",
            "--out", str(tmp_path / "o.jsonl")]
    for flag, params in (([], {}), (["--unsafe-exec"], {"unsafe_exec": True})):
        result = CliRunner().invoke(app, args + flag)
        assert result.exit_code == 0, result.output
        assert [r.params for r in seen["recipe"].rewards] == [params, {}]
