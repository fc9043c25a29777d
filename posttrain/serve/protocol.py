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
    root: str  # the checkpoint folder
    parent: str | None = None  # the base model an adapter loads on
    max_model_len: int


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
