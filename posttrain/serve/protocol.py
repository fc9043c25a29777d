"""The OpenAI wire shapes the front door itself produces (errors, the model list). Everything
else (completions, chunks, usage) is vLLM's and passes through untouched."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import BaseModel


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "posttrain"
    root: str  # the checkpoint folder (a remote model: its server's URL)
    parent: str | None = None  # the base model an adapter loads on
    max_model_len: int | None = None  # unknown for a remote that does not say
    # What posttrain found the model's server can do, e.g. {"prompt_logprobs": False} for a
    # remote engine without prompt log-probs (lm-eval's log-likelihood tasks need them).
    capabilities: dict[str, bool] = {}
    # How it reasons before answering: "qwen3" (switchable), "deepseek_r1" (always) or None.
    thinking: str | None = None
    # False while its engine starts or restarts, or its remote server is down: a request gets a 503.
    ready: bool = True


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


# HTTP status -> OpenAI error type, as the official client and SDKs expect them.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def error(status: int, message: str, code: str | None = None, param: str | None = None,
          headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# The roles the OpenAI chat API defines; vLLM's chat templates accept anything, and a role a
# template never saw renders as garbage (or is harvested as if it were a conversation).
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


def check_body(endpoint: str, body: dict) -> JSONResponse | None:
    """The front door's own checks on a request body (vLLM validates the rest): an error to
    answer with, or None."""
    if endpoint != "chat":
        return None
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return error(400, "`messages` must be a non-empty list of messages", param="messages")
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            return error(400, f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {repr(role)[:60]}",
                         param=f"messages.[{i}].role")
    return None
