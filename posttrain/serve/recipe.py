"""The serve recipe (`posttrain serve --recipe recipes/serve.yaml`): what to serve and how,
beyond one box included: replicas, vLLM's own parallelism, remote engines."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt

from posttrain.config import Recipe
from posttrain.errors import PosttrainError
from posttrain.serve.engine import engine_args
from posttrain.serve.upstream import Upstream


class UpstreamSpec(BaseModel):
    """A remote OpenAI-compatible server routed under `name`. Its key comes from the variable
    `api_key_env`: a recipe is copied and committed, a key must not be."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    url: str
    api_key_env: str | None = None
    model: str | None = None  # the remote's own name for it, when it differs

    def upstream(self) -> Upstream:
        from os import environ

        key = environ.get(self.api_key_env) if self.api_key_env else None
        if self.api_key_env and not key:
            raise PosttrainError(f"upstream {self.name}: the variable {self.api_key_env} is not set")
        return Upstream(self.name, self.url, api_key=key, model=self.model)


class ServeRecipe(Recipe):
    models: list[str] = []  # registered names; empty with no upstreams: the default model
    upstreams: list[UpstreamSpec] = []
    replicas: PositiveInt | dict[str, PositiveInt] = 1  # engines per base model: one number, or per name
    # vLLM's parallelism, per engine (a GPU host: tensor over its GPUs, pipeline over hosts with Ray).
    tensor_parallel_size: PositiveInt = 1
    pipeline_parallel_size: PositiveInt = 1
    data_parallel_size: PositiveInt = 1
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    engine_args: dict[str, str | int | float | bool] = {}  # any other vLLM argument, by its name
    max_model_len: PositiveInt = 2048
    dtype: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    log_requests: bool = False
    insecure_no_auth: bool = False
    # Thinking models, per name: the mode when a request names none (on/off), and the thinking
    # budget when a request gives no max_thinking_tokens.
    thinking: dict[str, bool] = {}
    max_thinking_tokens: dict[str, NonNegativeInt] = {}

    def vllm_args(self) -> list[str]:
        sizes = {"tensor_parallel_size": self.tensor_parallel_size, "pipeline_parallel_size": self.pipeline_parallel_size,
                 "data_parallel_size": self.data_parallel_size}
        options = {name: size for name, size in sizes.items() if size != 1}
        if self.gpu_memory_utilization is not None:
            options["gpu_memory_utilization"] = self.gpu_memory_utilization
        return engine_args({**options, **self.engine_args})
