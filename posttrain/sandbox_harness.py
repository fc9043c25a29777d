"""The program that runs inside the sandbox: the judge and the candidate (see posttrain/sandbox.py).

posttrain never imports this file: `posttrain.sandbox` compiles it once and writes the code
object, then the job in two parts (JSON: the candidate's, then the judge's with the tests
already cut into units), to the stdin of the base interpreter's `python -I -S -B -c BOOT`
(standard library only). The judge forks the candidate,
which runs the completion and then answers the judge's calls over two pipes; the judge runs the
tests and writes `{"passed", "error"}` to the fd that was its stdout. Imports are few and cheap
because every run pays for them (a GRPO step scores every completion).
"""

import builtins
import os
import resource
import select
import struct
import time
from _json import encode_basestring_ascii as quote, make_scanner  # json's C half: `import json` costs re, enum...

JUDGE = 65533  # the judge's: not the candidate's (a uid of its own per job), so the candidate cannot signal or trace it
MAX_MESSAGE = 8 << 20
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, SIGKILL = 1, 4, 9


class Timeout(BaseException):
    """The job's wall-clock budget ran out (a BaseException so that no test can catch it)."""


class CandidateError(Exception):
    """The completion failed in a way no builtin exception describes (it died, answered nonsense,
    or raised something of its own)."""


# --- plain data across the pipes: JSON with one-key tags for what JSON lacks ------------------

TAGS = {list: "l", tuple: "t", set: "s", frozenset: "f"}
FLOATS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def encode(value):
    """`value` as JSON text; a TypeError unless it is plain data."""
    kind = type(value)
    if value is None or kind is bool:
        return {None: "null", True: "true", False: "false"}[value]
    if kind is int:
        return int.__repr__(value)
    if kind is float:
        return FLOATS.get(float.__repr__(value), float.__repr__(value))
    if kind is str:
        return quote(value)
    if kind in TAGS:
        return f'{{"{TAGS[kind]}":{message(*map(encode, value))}}}'
    if kind is dict:
        return f'{{"d":{message(*(message(encode(k), encode(v)) for k, v in value.items()))}}}'
    if kind is bytes:
        return f'{{"b":"{value.hex()}"}}'
    if kind is complex:
        return f'{{"c":[{encode(value.real)},{encode(value.imag)}]}}'
    if kind is Remote:
        return f'{{"r":{quote(value.name)}}}'
    raise TypeError(f"{kind.__name__} is not plain data (None, bool, int, float, complex, str, bytes, "
                    f"or lists, tuples, dicts, sets of them)")


def message(*parts):
    return "[" + ",".join(parts) + "]"


class Grammar:
    """What json's C scanner reads from its context. Tagged objects become builtin data only;
    `names` (the candidate's globals) resolves references to the completion's functions, which
    the judge (no names) never accepts. Untagged, objects stay dicts (the host's job)."""
    strict, object_pairs_hook, parse_float, parse_int = True, None, float, int
    parse_constant = {"NaN": float("nan"), "Infinity": float("inf"), "-Infinity": float("-inf")}.__getitem__
    builders = {"l": list, "t": tuple, "s": set, "f": frozenset, "d": dict, "b": bytes.fromhex,
                "c": lambda parts: complex(*parts)}

    def __init__(self, names=None, tagged=True):
        self.names = names
        self.object_hook = self.build if tagged else None
        self.scan = make_scanner(self)

    def build(self, obj):
        (tag, value), = obj.items()
        if tag == "r" and self.names is not None:
            return self.names[value]
        return self.builders[tag](value)

    def decode(self, data):
        text = data.decode()
        try:
            value, end = self.scan(text, 0)
        except StopIteration:
            raise ValueError("not JSON") from None
        if end != len(text):
            raise ValueError("data after the JSON value")
        return value


def send(fd, text, deadline=None):
    data = text.encode()
    data = memoryview(struct.pack(">I", len(data)) + data)
    while data:
        if deadline is not None and not select.select([], [fd], [], max(0, deadline - time.monotonic()))[1]:
            raise Timeout()
        try:
            data = data[os.write(fd, data):]
        except BlockingIOError:  # the judge's end is non-blocking: a stalled candidate cannot hang it
            pass


def receive(fd, grammar, deadline=None):
    """The next message, or None when the other side has gone."""
    header = _read(fd, 4, deadline)
    if header is None:
        return None
    size, = struct.unpack(">I", header)
    if size > MAX_MESSAGE:
        raise CandidateError(f"a message of {size} bytes (at most {MAX_MESSAGE})")
    data = _read(fd, size, deadline)
    return None if data is None else grammar.decode(data)


def _read(fd, size, deadline):
    chunks = []
    while size:
        if deadline is not None and not select.select([fd], [], [], max(0, deadline - time.monotonic()))[0]:
            raise Timeout()
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def prctl(option, value):
    import ctypes  # only where needed: it costs milliseconds on every run
    ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)


def drop_to(uid):
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


# --- the candidate: untrusted from the moment the completion's first line runs -----------------

def candidate(job, requests, replies):
    """Confine this process, run the completion, then serve the judge's calls. Never returns."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # no way back to the judge's verdict pipe or the host's stderr
        os.dup2(null, fd)
    os.dup2(requests, 3)  # over the judge's dup of its stdout
    os.dup2(replies, 4)
    os.closerange(5, 1 << 16)
    for which, value in ((resource.RLIMIT_AS, job["memory_mb"] << 20), (resource.RLIMIT_CPU, job["cpu_s"]),
                         (resource.RLIMIT_FSIZE, job["file_mb"] << 20), (resource.RLIMIT_CORE, 0),
                         (resource.RLIMIT_NPROC, job["processes"])):
        if value is not None:
            resource.setrlimit(which, (value, value))
    if job["drop_uid"]:
        drop_to(job["uid"])  # in the sandbox, the PID namespace ends with the judge: no parent-death signal needed
    else:
        prctl(PR_SET_PDEATHSIG, SIGKILL)
    os.nice(19)  # a busy completion (a fork bomb: dozens of them) must not starve the judge or the host
    names = {"__name__": "__candidate__"}
    me = os.getpid()
    try:
        exec(compile(job["code"], "<completion>", "exec"), names)
        ready = message(quote("ready"))
    except BaseException as exc:  # noqa: BLE001 - whatever the completion raises, the job fails
        ready = None
        failure = message(quote("failed"), quote(describe(exc)))
    if os.getpid() != me:  # a child the completion forked: only the first process answers
        os._exit(0)
    send(4, ready or failure)
    if ready:
        serve(names)
    os._exit(0)


def serve(names):
    grammar = Grammar(names)
    while True:
        try:
            request = receive(3, grammar)
        except BaseException:  # noqa: BLE001 - a request it cannot read ends the session
            request = None
        if request is None:
            return
        send(4, answer(names, request))


def answer(names, request):
    try:
        if request[0] == "names":
            return message(quote("ok"), exported(names, request[1]))
        args, kwargs = request[2], request[3]
        result = names[request[1]](*args, **kwargs)
        return message(quote("ok"), encode(result), encode(args))
    except BaseException as exc:  # noqa: BLE001 - reported to the judge, which fails the test
        return message(quote("raise"), quote(type(exc).__name__), quote(str(exc)[:500]))


def exported(names, wanted):
    """The completion's globals that the tests name: functions by reference, data by value."""
    found = []
    for name in wanted:
        if name in names and callable(names[name]):
            found.append(message(quote(name), '"function"', "null"))
        elif name in names:
            try:
                found.append(message(quote(name), '"data"', encode(names[name])))
            except (TypeError, ValueError, RecursionError):
                pass
    return message(*found)


def describe(exc):
    return f"{type(exc).__name__}: {exc}"[:500]


# --- the judge: runs the tests; never runs a line of the completion ---------------------------

class Remote:
    """One of the completion's functions, called in the candidate's process: arguments go as
    data, the result comes back as data (never as an object with behaviour of its own)."""

    def __init__(self, link, name):
        self.link, self.name = link, name

    def __call__(self, *args, **kwargs):
        result, after = self.link.call(self.name, list(args), kwargs)
        for before, now in zip(args, after):  # a function may change a list/dict/set argument in place
            if type(before) is type(now) and type(now) in (list, dict, set):
                before.clear()
                (before.extend if type(now) is list else before.update)(now)
        return result

    def __repr__(self):
        return f"<the completion's {self.name}>"


class Link:
    """The judge's ends of the pipes. Whatever the candidate sends that is not a well-formed
    answer becomes a CandidateError, so a test can only fail on it."""

    def __init__(self, requests, replies, deadline):
        self.requests, self.replies, self.deadline, self.grammar = requests, replies, deadline, Grammar()

    def next(self):
        try:
            reply = receive(self.replies, self.grammar, self.deadline)
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise CandidateError(describe(exc)) from None
        if type(reply) is not list or not reply:
            raise CandidateError("the completion's process exited" if reply is None else "a malformed answer")
        return reply

    def ask(self, request):
        try:
            send(self.requests, request, self.deadline)
        except OSError as exc:
            raise CandidateError(describe(exc)) from None
        return self.next()

    def call(self, name, args, kwargs):
        reply = self.ask(message(quote("call"), quote(name), encode(args), encode(kwargs)))
        if reply[0] == "raise" and len(reply) == 3:
            raise exception(reply[1], reply[2])
        if reply[0] != "ok" or len(reply) != 3 or type(reply[2]) is not list:
            raise CandidateError("a malformed answer")
        return reply[1], reply[2]


def exception(name, message):
    """The builtin exception the completion raised (so `except ValueError` in a test works);
    a SystemExit, KeyboardInterrupt or a class of its own arrives as CandidateError."""
    kind = getattr(builtins, str(name), None)
    if isinstance(kind, type) and issubclass(kind, Exception):
        return kind(str(message)[:500])
    return CandidateError(f"{name}: {message}"[:500])


def run_tests(job, link, score):
    """Counts passes into `score` as it goes, so that a timeout keeps what passed. A unit marked
    as counted is a test; the others (imports, helpers) run as setup. A HumanEval job has one
    unit, its test code, and passes when `check(entry_point)` returns."""
    try:
        started = link.next()
    except CandidateError as exc:
        started = ["failed", str(exc)]
    if started[0] != "ready":
        score["error"] = f"the completion failed: {started[-1]}"[:500]
        return
    names = prepare(job["names"], link)
    entry = job["entry_point"]
    if job["humaneval"] and entry not in names:
        score["error"] = f"the completion defines no {entry}"
        return
    for source, counted in job["units"]:
        passed = run_unit(source, names)
        score["passed"] += passed and counted and not job["humaneval"]
    if job["humaneval"]:
        score["passed"] = int(passed and run_unit("check(__entry_point__)", names | {"__entry_point__": names[entry]}))


def prepare(wanted, link):
    """The tests' globals: the completion's names they use (the host leaves out builtins')."""
    names = {"__name__": "__tests__", "__builtins__": builtins}
    try:
        for name, kind, value in link.ask(message(quote("names"), message(*map(quote, wanted))))[1]:
            if name in wanted:
                names[name] = Remote(link, name) if kind == "function" else value
    except (CandidateError, IndexError, TypeError, ValueError):
        pass  # then the tests find none of the completion's names and fail
    return names


def run_unit(source, names):
    try:
        exec(compile(source, "<tests>", "exec"), names)
        return True
    except Timeout:
        raise
    except BaseException:  # noqa: BLE001 - a test that raises anything fails
        return False


def judge():
    verdict = os.dup(1)
    os.dup2(os.open(os.devnull, os.O_RDWR), 1)  # a print in a test must not land in the verdict
    job = receive(0, Grammar(tagged=False))  # the candidate's part; the tests stay in the pipe for now
    if not job["drop_uid"]:  # same uid as the candidate: only this keeps it from tracing the judge
        prctl(PR_SET_DUMPABLE, 0)  # (before the fork, so there is no window)
    requests, replies = os.pipe(), os.pipe()
    if os.fork() == 0:
        os.close(requests[1])
        os.close(replies[0])
        candidate(job, requests[0], replies[1])
    os.close(requests[0])
    os.close(replies[1])
    os.set_blocking(requests[1], False)
    job |= receive(0, Grammar(tagged=False))
    if job["drop_uid"]:
        drop_to(JUDGE)
    resource.setrlimit(resource.RLIMIT_AS, (max(job["memory_mb"], 256) << 20,) * 2)
    score = {"passed": 0, "error": None}
    try:
        run_tests(job, Link(requests[1], replies[0], time.monotonic() + job["timeout_s"]), score)
    except Timeout:
        score["error"] = f"timed out after {job['timeout_s']}s"
    os.write(verdict, f'{{"passed":{score["passed"]},"error":{quote(score["error"] or "")}}}'.encode())
    os._exit(0)


if __name__ == "__main__":
    judge()
