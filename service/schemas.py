"""Response models of the gateway that are not library contracts (those live in dae/spec.py).

Pages, health reports and the error body. Request/response models of /reconstruct live next to their
route (service/routes/reconstruct.py).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from dae.spec import JobRecord, ModelCard

#: Most items a listing may skip (GET /jobs, GET /models): Redis ranks are 64-bit integers (a larger offset was a
#: Redis error, a 500), and no deployment keeps a billion records.
MAX_LIST_OFFSET = 1_000_000_000


class ErrorBody(BaseModel):
    """Every error answer: a sentence saying what was expected and what was received."""

    detail: str = Field(description="What went wrong: what was expected and what was received.")
    errors: list[dict[str, Any]] | None = Field(
        None, description="Request validation only: one entry per invalid field (loc, msg, type)."
    )

    model_config = {
        "json_schema_extra": {
            "examples": [{"detail": "No job with this id. Received: job_id='j_0000000000000000'"}]
        }
    }


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobRecord]
    total: int = Field(description="Jobs matching the filter, all pages.")
    limit: int
    offset: int


class ModelList(BaseModel):
    """One page of model cards, newest first."""

    items: list[ModelCard]
    total: int = Field(description="Models matching the filter, all pages.")
    limit: int
    offset: int


class Liveness(BaseModel):
    """The process is up."""

    status: str = Field("ok", examples=["ok"])


class Readiness(BaseModel):
    """Whether the gateway can serve: Redis reachable and accepting writes, the model store writable."""

    status: str = Field(description="`ready` or `unavailable`.", examples=["ready"])
    checks: dict[str, str] = Field(
        description="Per dependency: `ok` or the reason it failed.", examples=[{"redis": "ok", "store": "ok"}]
    )
    auth: Literal["api_keys", "open"] = Field(
        description="`api_keys`: every resource route needs a key; `open`: no keys are configured, anyone may call "
        "everything as the `default` owner.", examples=["api_keys"],
    )


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries documenting the JSON error body for these status codes."""
    descriptions = {
        400: "Bad request",
        401: "Missing or unknown API key",
        403: "The key's role does not allow this route, or it names another owner (admins only)",
        404: "Not found",
        406: "Only one image can be returned as image/png",
        409: "Conflict with the current state",
        413: "Request, image or upload too large",
        415: "Unsupported request content type",
        422: "Invalid input (says what was expected and what was received)",
        503: "Temporarily unavailable (retry after the Retry-After seconds)",
    }
    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorBody, "description": descriptions.get(code, "Error")} for code in codes
    }
    if 503 in responses:  # service.main sends it with every 503 of these routes
        responses[503]["headers"] = {"Retry-After": RETRY_AFTER_HEADER}
    return responses


#: The Retry-After header of a 503 (DAE_RETRY_AFTER_S).
RETRY_AFTER_HEADER = {
    "description": "Seconds to wait before retrying (DAE_RETRY_AFTER_S).",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
