"""Errors mapped to HTTP once: each DaeError class to its status, request validation as 422, a Redis outage as
503 with Retry-After, framework HTTP errors reworded, anything else a 500; every body is JSON `{"detail": ...}`."""

from __future__ import annotations

import functools
import logging
import re
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from core.jobs import is_redis_outage
from dae.errors import (
    Conflict,
    DaeError,
    DatasetUnavailable,
    ExportFailed,
    InvalidDataset,
    InvalidImage,
    InvalidSpec,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    TrainingFailed,
)
from service.auth import Forbidden
from service.deps import job_store_unavailable_message, redis_reply
from service.responses import OrjsonResponse

logger = logging.getLogger(__name__)


class BrokerUnavailable(DaeError):
    """The job was recorded but could not be handed to the queue (the broker did not answer)."""


#: The HTTP status of each error class; a subclass not listed takes its nearest listed base's, DaeError's is 400.
STATUS_BY_ERROR: dict[type[DaeError], int] = {
    DaeError: 400,
    InvalidSpec: 422,
    InvalidImage: 422,
    InvalidDataset: 422,
    DatasetUnavailable: 422,
    PayloadTooLarge: 413,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TrainingFailed: 500,
    ExportFailed: 500,
    Overloaded: 503,
    BrokerUnavailable: 503,
}


def status_of(error: DaeError) -> int:
    """The HTTP status of a library error, by the first of its classes (MRO order) that STATUS_BY_ERROR lists."""
    for cls in type(error).__mro__:
        status = STATUS_BY_ERROR.get(cls)
        if status is not None:
            return status
    return 400


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_validation_errors(errors: list[dict[str, Any]]) -> str:
    """One sentence per invalid field (first five), saying what was expected and what was received."""
    sentences = []
    for error in errors[:5]:
        location = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", message)
            sentences.append(f"The body is not valid JSON ({reason}). Expected a JSON document. Received: invalid JSON")
        elif "Received:" in message:  # our own validators already say it
            sentences.append(f"{location}: {message.removeprefix('Value error, ')}")
        elif error.get("type") == "missing":
            sentences.append(f"{location}: Field required. Expected a value. Received: nothing")
        else:
            sentences.append(f"{location}: {message}. Received: {_short(error.get('input'))}")
    if len(errors) > 5:
        sentences.append(f"(and {len(errors) - 5} more)")
    return " | ".join(sentences)


def _error_entries(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Inputs can be huge (a pixel array) and ctx may hold exception objects: keep loc, msg and type.
    return [{"loc": list(error.get("loc", ())), "msg": str(error.get("msg", "")), "type": error.get("type")} for error in errors]


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_s)}


async def handle_dae_error(request: Request, error: Exception) -> Response:
    """Every library error: its class's status and its message; a 503 says when to retry."""
    if not isinstance(error, DaeError):
        return await handle_unexpected(request, error)
    status = status_of(error)
    headers = _retry_after(request) if status == 503 else None  # Overloaded, or a job the broker did not accept
    if status >= 500:
        logger.error("%s: %s", type(error).__name__, error.message)
    return OrjsonResponse({"detail": error.message}, status_code=status, headers=headers)


async def handle_redis_error(request: Request, error: Exception) -> Response:
    """Redis unreachable or refusing writes is an outage (503, retry later); any other Redis error is a bug."""
    if not isinstance(error, redis.RedisError) or not is_redis_outage(error):
        return await handle_unexpected(request, error)
    logger.warning(
        "job store unavailable on %s %s: %s: %s", request.method, request.url.path, type(error).__name__, redis_reply(error)
    )
    return OrjsonResponse(
        {"detail": job_store_unavailable_message(error)}, status_code=503, headers=_retry_after(request)
    )


async def handle_validation_error(request: Request, error: Exception) -> Response:
    """422 with a readable sentence plus the per-field list."""
    if not isinstance(error, RequestValidationError):
        return await handle_unexpected(request, error)
    errors = list(error.errors())
    return OrjsonResponse(
        {"detail": describe_validation_errors(errors), "errors": _error_entries(errors)}, status_code=422
    )


_UNPARSABLE_BODY_DETAILS = frozenset({
    "There was an error parsing the body", "Invalid multipart data.", "Missing boundary in multipart.",
})


async def handle_http_exception(request: Request, error: Exception) -> Response:
    """HTTP errors raised by the framework or routes (404 unknown path, 405, 413, 415, 406)."""
    if not isinstance(error, StarletteHTTPException):
        return await handle_unexpected(request, error)
    if error.status_code in (204, 304):
        return Response(status_code=error.status_code, headers=error.headers)
    detail = str(error.detail)
    if error.status_code == 404 and detail == "Not Found":  # no route matched
        detail = f"No such path. Expected an API path (see /docs). Received: {request.method} {_short(request.url.path, 200)}"
    elif error.status_code == 400 and detail in _UNPARSABLE_BODY_DETAILS:  # FastAPI's and Starlette's words
        detail = (
            f"The request body could not be parsed ({detail.rstrip('.')}). Expected a body in the format its "
            f"Content-Type declares. Received: Content-Type {_short(request.headers.get('content-type', ''))}"
        )
    elif error.status_code == 405 and detail == "Method Not Allowed":
        detail = f"This path does not take {request.method}. Expected a method listed in /docs. Received: {request.method}"
    headers = error.headers
    if error.status_code == 405 and (allow := allowed_methods(request)):
        headers = {**(headers or {}), "Allow": allow}
    return OrjsonResponse({"detail": detail}, status_code=error.status_code, headers=headers)


def allowed_methods(request: Request) -> str | None:
    """The methods the API documents for the request's path, for a 405's Allow header (None: not an API path).

    Starlette names only the methods of the first route matching the path; the OpenAPI document lists them all
    (GET and POST /datasets: found by schemathesis' allow_header_conformance).
    """
    path = request.scope.get("path", "")
    for template, operations in request.app.openapi().get("paths", {}).items():
        if _path_pattern(template).fullmatch(path):
            return ", ".join(sorted(method.upper() for method in operations if method.upper() in _HTTP_METHODS))
    return None


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE"})


@functools.lru_cache(maxsize=256)
def _path_pattern(template: str) -> re.Pattern[str]:
    """`/jobs/{job_id}` as a regex matching one path segment per parameter, as routing does."""
    parts = re.split(r"(\{[^}/]+\})", template)
    return re.compile("".join("[^/]+" if part.startswith("{") else re.escape(part) for part in parts))


async def handle_unexpected(request: Request, error: Exception) -> Response:
    """A bug: log it, answer 500 without internals."""
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
    return OrjsonResponse(
        {"detail": f"Internal error ({type(error).__name__}). Expected to handle this request. Received: a server fault"},
        status_code=500,
    )


def add_exception_handlers(app: FastAPI) -> None:
    """Register the handlers above on the app (the only place errors become HTTP answers)."""
    app.add_exception_handler(DaeError, handle_dae_error)
    app.add_exception_handler(redis.RedisError, handle_redis_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)
