"""Run model-written code against tests: isolated by bubblewrap, with verdicts it cannot forge.

Every place that executes model output goes through `run` / `run_many`: GRPO's `code_tests`
reward, `posttrain data generate` (which filters with the same rewards), and code benchmarks.

Isolation (bubblewrap, `bwrap`). The sandbox sees /usr and the base interpreter's prefix,
read-only, a private 64 MiB tmpfs as /tmp (its working directory) and a minimal /dev; no /proc,
no home, no repository, no model store. It has its own network (loopback only, down), PID,
IPC, UTS and mount namespaces and a new session, an empty environment, and dies with its
parent. Started as root, bubblewrap keeps only CAP_SETUID/SETGID for the judge (below), which
drops the completion's process to a uid of its own for this job (drawn from CANDIDATE_UIDS, which
no account uses) and itself to 65533; started as another user, a user namespace maps that user
to 65534. The completion's process gets rlimits on address space, CPU seconds, processes (its
uid's count, machine-wide: this needs a non-root uid, hence the drop, and one per job, so that a
fork bomb in one job cannot fail the forks of the jobs beside it), file size and core dumps; the
whole run has a wall-clock budget, after which the judge reports and exits (taking the PID
namespace with it) and, failing that, the host kills bubblewrap.

Verdicts. Inside the sandbox two processes: the *judge* runs the tests, the *candidate* runs the
completion. The judge never executes a line of the completion: the tests call the
completion's functions through proxies that send the arguments to the candidate as data and
get the result back as data (JSON with tags for tuple, set, dict, bytes, complex), decoded into
builtin values only. The judge is non-dumpable and (as root) of another uid, so the candidate
cannot trace it, read its memory or reach its verdict pipe (the candidate holds only /dev/null
and the socket). Guarantee: a test passes exactly when the test's own code, running in the
judge, completes given the values the completion's functions return (or the builtin
exceptions they raise). Printing a result, exiting early, sys.exit, patching builtins,
AssertionError or `check`, objects whose `__eq__` always says yes: none reaches the judge.

Limits. A test that takes a helper from the completion (HumanEval's `poly`, `encode_cyclic`)
trusts that helper, as in the benchmark's own harness. Only data crosses: a function that
returns a generator, a class instance or a numpy array fails, and so do tests that pass a
callable in or inspect the completion's classes or stdout. The candidate may kill or stop the
judge (as a non-root user: same uid): that scores 0, never more. Kernel bugs reachable from a
process with no capabilities are out of scope; bubblewrap applies no seccomp filter here.
"""

from __future__ import annotations

import ast
import builtins
import functools
import json
import logging
import marshal
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import PosttrainError

log = logging.getLogger("posttrain.sandbox")

_HARNESS_FILE = Path(__file__).with_name("sandbox_harness.py")
# Compiled once here and sent ahead of the job on stdin: compiling it in every sandbox would
# cost more than starting the sandbox. Same interpreter version, so marshal's format agrees.
# Everything on stdin is framed (4-byte length), and read with exact reads: the judge must be
# able to leave the tests unread in the pipe until after it has forked the candidate.
_HARNESS = marshal.dumps(compile(_HARNESS_FILE.read_text(), str(_HARNESS_FILE), "exec"))
_BOOT = """import marshal, os
def read_exactly(size):
    data = b""
    while len(data) < size:
        chunk = os.read(0, size - len(data))
        if not chunk:
            raise SystemExit("posttrain sandbox: stdin ended early")
        data += chunk
    return data
exec(marshal.loads(read_exactly(int.from_bytes(read_exactly(4), "big"))))"""
_PYTHON_ARGS = ("-I", "-S", "-B", "-c", _BOOT)
INSTALL = ("install bubblewrap (apt-get install bubblewrap), or opt in to running model code unsandboxed "
           "(reward param unsafe_exec: true / --unsafe-exec)")
DOCKER = ("in Docker run the container with --cap-add SYS_ADMIN --security-opt apparmor=unconfined "
          "--security-opt seccomp=unconfined")
# Candidate uids (as root): 2^24 of them from 2^30 up, far above any account's; drawn at random per
# job, so that concurrent jobs, from this process or another, almost never share one.
CANDIDATE_UIDS = range(1 << 30, (1 << 30) + (1 << 24))
GRACE_S = 5.0  # bubblewrap and the interpreter start before the judge's own clock runs
TMPFS_MB = 64


@dataclass(frozen=True)
class Job:
    """Code to run and its tests: top-level `assert` statements (each one test), or HumanEval's
    `def check(candidate)` with `entry_point`, the function to pass to it (one test)."""
    code: str
    tests: str
    entry_point: str | None = None


@dataclass(frozen=True)
class Verdict:
    passed: int
    total: int
    error: str | None = None

    @property
    def score(self) -> float:
        return self.passed / self.total if self.total > 0 else 0.0


def run(job: Job, timeout_s: float = 5.0, memory_mb: int = 512, unsafe: bool = False) -> Verdict:
    """The job's verdict. Refuses (PosttrainError) where bubblewrap cannot run, unless `unsafe`."""
    require(unsafe)
    return _run(job, timeout_s, memory_mb, unsafe)


def run_many(jobs: list[Job], timeout_s: float = 5.0, memory_mb: int = 512, unsafe: bool = False,
             workers: int | None = None) -> list[Verdict]:
    """Verdicts in the order of `jobs`, several sandboxes at a time (default: one per core)."""
    if not jobs:
        return []
    require(unsafe)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda job: run(job, timeout_s, memory_mb, unsafe), jobs))


def require(unsafe: bool = False) -> None:
    """Fail early, in one line, where code cannot be run as asked."""
    if unsafe:
        _warn_unsafe()
    else:
        _probe()



def _run(job: Job, timeout_s: float, memory_mb: int, unsafe: bool) -> Verdict:
    try:
        plan = _plan(job)
    except SyntaxError as exc:
        return Verdict(0, 0, f"the tests do not parse: {exc}")
    total = 1 if plan["humaneval"] else sum(counted for _, counted in plan["units"])
    if not total:
        return Verdict(0, 0, "the tests have no assert statement (nor a check(candidate) function and an entry point)")
    # Two parts: the candidate's (read before the fork) and the judge's (read after it), so that
    # the tests never enter the memory of the process that runs the completion.
    candidate = {"code": job.code, "cpu_s": math.ceil(timeout_s) + 1, "memory_mb": memory_mb, "file_mb": 16,
                 "processes": None if unsafe else 64, "drop_uid": not unsafe and os.geteuid() == 0,
                 "uid": candidate_uid()}
    stdin = b"".join(_frame(part) for part in (_HARNESS, json.dumps(candidate).encode(),
                                                json.dumps(plan | {"timeout_s": timeout_s}).encode()))
    if unsafe:  # no process limit either: outside a sandbox it would count all of this user's processes
        with tempfile.TemporaryDirectory(prefix="posttrain-unsafe-") as cwd:
            passed, error = _execute([_interpreter(), *_PYTHON_ARGS], stdin, timeout_s, cwd)
    else:
        passed, error = _execute([*_bwrap(), _interpreter(), *_PYTHON_ARGS], stdin, timeout_s, "/")
    return Verdict(passed, total, error)


def candidate_uid() -> int:
    return secrets.choice(CANDIDATE_UIDS)


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data


# CPython 3.11 keeps the AST converter's recursion depth in shared state, so two threads parsing
# at once fail with "AST constructor recursion depth mismatch" (gh-106905, fixed in 3.12).
_PARSE_LOCK = threading.Lock()


def _plan(job: Job) -> dict:
    """The tests cut into units for the judge (parsed here, so the sandbox need not import ast):
    each top-level statement, counted if it is an assert; or, for HumanEval's format, the whole
    test code. `names` are those the tests use that the completion may define."""
    with _PARSE_LOCK:
        tree = ast.parse(job.tests)
    humaneval = bool(job.entry_point) and any(
        isinstance(s, ast.FunctionDef) and s.name == "check" for s in tree.body)
    units = [[job.tests, True]] if humaneval else [[ast.unparse(s), isinstance(s, ast.Assert)] for s in tree.body]
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {job.entry_point or ""}
    return {"units": units, "humaneval": humaneval, "entry_point": job.entry_point,
            "names": sorted(used - set(dir(builtins)) - {""})}


def _execute(argv: list[str], stdin: bytes, timeout_s: float, cwd: str) -> tuple[int, str | None]:
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               cwd=cwd, env={"LANG": "C.UTF-8"}, start_new_session=True)
    try:
        out, err = process.communicate(stdin, timeout=timeout_s + GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)  # bubblewrap's children die with it (--die-with-parent)
        process.communicate()
        return 0, f"the sandbox did not answer within {timeout_s + GRACE_S:.0f}s"
    try:
        score = json.loads(out)
        return int(score["passed"]), score["error"] or None
    except (ValueError, KeyError, TypeError):
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or [f"exit status {process.returncode}"]
        return 0, f"the sandbox failed: {tail[0][:300]}"


def _interpreter() -> str:
    """The base interpreter (not a venv's: its site-packages stay outside the sandbox)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.base_prefix) / "bin" / version, Path(sys.base_prefix) / "bin" / "python3"):
        if candidate.exists():
            return str(candidate)
    raise PosttrainError(f"no {version} under {sys.base_prefix}/bin to run sandboxed code with")


@functools.cache
def _bwrap() -> tuple[str, ...]:
    args = ["bwrap", "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--clearenv", "--setenv", "LANG", "C.UTF-8",
            "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    if os.geteuid() == 0:  # the judge needs these two to drop both processes to distinct uids
        args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-user", "--uid", "65534", "--gid", "65534", "--disable-userns"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = Path(sys.base_prefix).resolve()
    if not prefix.is_relative_to("/usr"):
        # bwrap would create the prefix's parents mode 0700, closed to the sandbox's uids
        for parent in reversed(prefix.parents[:-1]):
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", str(prefix), str(prefix)]
    return (*args, "--dev", "/dev", "--perms", "1777", "--size", str(TMPFS_MB << 20), "--tmpfs", "/tmp",
            "--chdir", "/tmp", "--remount-ro", "/")


@functools.cache
def _probe() -> None:
    if shutil.which("bwrap") is None:
        raise PosttrainError(f"running model-written code needs a sandbox and bubblewrap is missing: {INSTALL}")
    verdict = _run(Job("def f():\n    return 1\n", "assert f() == 1"), 10.0, 256, unsafe=False)
    if verdict.passed != 1:
        raise PosttrainError(f"bubblewrap cannot start the sandbox here ({verdict.error}); {DOCKER}; "
                             f"or opt in to running model code unsandboxed (unsafe_exec: true / --unsafe-exec)")


@functools.cache
def _warn_unsafe() -> None:
    log.warning("running model-written code WITHOUT a sandbox (unsafe_exec): it can read and change this "
                "machine's files and reach its network")
