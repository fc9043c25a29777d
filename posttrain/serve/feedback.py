"""Feedback on harvested answers: `POST /v1/feedback` on the front door, and `record_feedback`
for Python.

A body names one answer by the id the engine gave its response (`response.id` in the openai
client: chatcmpl-... or cmpl-...) and, when the request asked for n > 1, the choice's index:

    {"id": "chatcmpl-...", "rating": 1 | -1, "choice": 0, "correction": "a better answer", "comment": "..."}

A rating, a correction or both. Feedback is a record of what someone said, not a setting: one
per answer and API key (stored as the key's sha256, never the key), and a second one is a 409
`feedback_exists`. Callers that send no key (a front door without keys) count as one caller.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timezone
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from posttrain.errors import PosttrainError
from posttrain.serve.exchange import Harvest
from posttrain.serve.protocol import error
from posttrain.store import Feedback, RequestLog, Store

# A stream still running (or a row still being written) this long after the feedback arrives:
# the client is told to send it once the answer is complete.
SETTLE_SECONDS = 30.0


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str = Field(min_length=1, max_length=128, description="The response's id (chatcmpl-... or cmpl-...).")
    rating: int | None = Field(None, description="1: a good answer, -1: a bad one.")
    choice: int = Field(0, ge=0, description="Which of the n choices (0 when n was 1).")
    correction: str | None = Field(None, min_length=1, max_length=100_000, description="A better answer.")
    comment: str | None = Field(None, max_length=10_000)

    @field_validator("rating")
    @classmethod
    def _thumb(cls, rating: int | None) -> int | None:
        # An int field in strict mode already refuses true and 1.0, which Literal[1, -1] lets through.
        if rating not in (None, 1, -1):
            raise ValueError("must be 1 (good) or -1 (bad)")
        return rating

    @model_validator(mode="after")
    def _says_something(self) -> FeedbackBody:
        if self.rating is None and self.correction is None:
            raise ValueError("give a `rating` (1 or -1), a `correction`, or both")
        return self


class FeedbackError(PosttrainError):
    """Feedback that cannot be stored; `status` is the HTTP status the front door answers with."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.code, self.param = status, code, param


def key_hash(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def record_feedback(store: Store, feedback: FeedbackBody, api_key: str = "") -> Feedback:
    """Store `feedback` on the harvested answer it names; raises FeedbackError (404 unknown
    id, 400 choice out of range, 409 this key already gave feedback on that answer)."""
    with store.session() as s:
        rows = dict(s.execute(select(RequestLog.choice, RequestLog.id)
                              .where(RequestLog.response_id == feedback.id)).all())
        if not rows:
            raise FeedbackError(404, f"no harvested response has the id {feedback.id!r} (scoring requests with "
                                "`echo` and failed requests are not kept)", code="response_not_found", param="id")
        if feedback.choice not in rows:
            raise FeedbackError(400, f"choice {feedback.choice} is out of range: response {feedback.id} has "
                                f"{len(rows)} choice(s), 0 to {len(rows) - 1}", param="choice")
        row = Feedback(request_log_id=rows[feedback.choice], rating=feedback.rating, correction=feedback.correction,
                       comment=feedback.comment, key_hash=key_hash(api_key))
        s.add(row)
        try:
            s.flush()
        except IntegrityError:
            raise FeedbackError(409, f"this API key already gave feedback on choice {feedback.choice} of "
                                f"{feedback.id}; feedback is kept as given, not overwritten",
                                code="feedback_exists") from None
    return row


async def post_feedback(raw: bytes, harvest: Harvest | None, api_key: str) -> JSONResponse:
    """The `POST /v1/feedback` route, after the API key check."""
    if harvest is None:
        return error(404, "this front door does not harvest requests (it was started without --log-requests), "
                     "so there is no answer to attach feedback to", code="harvest_off")
    try:
        feedback = FeedbackBody.model_validate_json(raw)
    except ValidationError as exc:
        return _invalid(exc)
    if not await harvest.settled(feedback.id, SETTLE_SECONDS):
        return error(409, f"the response {feedback.id} is still being generated; send feedback once it is complete",
                     code="response_in_progress", param="id")
    try:
        row = await asyncio.to_thread(record_feedback, harvest.store, feedback, api_key)
    except FeedbackError as exc:
        return error(exc.status, str(exc), code=exc.code, param=exc.param)
    return JSONResponse({"object": "feedback", "id": f"feedback-{row.id}", "response_id": feedback.id,
                         "choice": feedback.choice, "rating": feedback.rating,
                         "created": int(row.created_at.replace(tzinfo=timezone.utc).timestamp())})


def _invalid(exc: ValidationError) -> JSONResponse:
    problem = exc.errors(include_url=False)[0]
    if problem["type"] == "json_invalid":
        return error(400, f"malformed JSON body: {problem['ctx']['error']}", code="invalid_json")
    where = ".".join(str(p) for p in problem["loc"])
    if problem["type"] == "model_type":
        return error(400, "the feedback body must be a JSON object with `id` and a `rating` and/or `correction`",
                     code="invalid_json")
    message = problem["msg"].removeprefix("Value error, ")
    return error(400, f"{where}: {message}" if where else message, param=where or None)
