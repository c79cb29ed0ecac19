"""The gateway app: `create_app(settings)` builds it, `app = create_app()` is what uvicorn serves.

Nothing connects at import time: the Redis client, the Celery producer, the model store and the inference
engine are opened in `lifespan` and reach routes through service.deps. Errors are mapped to HTTP once, here:
every DaeError by its status_code, request validation as 422, an unreachable or write-refusing Redis as 503 with
Retry-After, all as JSON `{"detail": "..."}`.
"""

from __future__ import annotations

import functools
import gc
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import redis
from celery import Celery
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

import dae
from dae.errors import DaeError
from dae.jobs import JobStore, is_redis_outage
from dae.store import ModelStore
from service.config import Settings, get_settings
from service.deps import Resources, job_store_unavailable_message, redis_reply
from service.direct_lane import GatewayApp
from service.inference import InferenceEngine
from service.metrics import GatewayMetrics
from service.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, MetricsMiddleware
from service.openapi import build_openapi
from service.responses import OrjsonResponse
from service.routes import ROUTERS
from service.routes.health import STORE_CHECK_TTL_S, CachedCheck, check_store_writable
from service.routes.jobs import EVENTS_BLOCK_MS
from service.routes.reconstruct import reconstruct_route

logger = logging.getLogger(__name__)

#: Event streams that may wait on Redis at once (each holds a thread while it waits; kept apart from the
#: threadpool the synchronous routes use, so followers cannot starve the API).
SSE_STREAMS_LIMIT = 64

DESCRIPTION = """\
Trains and serves **denoising autoencoders**.

1. `POST /jobs` with a training spec (the example trains a small dense DAE on the 8x8 `digits` dataset in seconds)
   → 202 and a job id; follow it with `GET /jobs/{job_id}` or the event stream `GET /jobs/{job_id}/events`.
2. The finished job names its model; `GET /models/{ref}` shows its card (evaluation against classical denoisers).
3. `POST /reconstruct` denoises images (JSON or a file upload) and returns the error map |input − denoised|.

When the service runs with `DAE_API_KEYS`, press **Authorize** and enter a key (sent as `X-API-Key`).
"""

TAGS = [
    {"name": "jobs", "description": "Training jobs: submit, follow, cancel."},
    {"name": "models", "description": "Trained models and their cards."},
    {"name": "datasets", "description": "Built-in and uploaded datasets."},
    {"name": "reconstruct", "description": "Denoise images with a trained model."},
    {"name": "health", "description": "Probes and Prometheus metrics (no API key needed)."},
]


#: Redis timeouts of the gateway: a dead, restarting or hung Redis fails a request within ~2 s (a 503), never hangs it.
REDIS_CONNECT_TIMEOUT_S = 0.5
#: Above the event stream's XREAD BLOCK, which would otherwise time out on a healthy Redis.
REDIS_SOCKET_TIMEOUT_S = EVENTS_BLOCK_MS / 1000 + 1.0
#: Retries of one Redis command after a connection error (a pooled connection that a restart closed is replaced).
#: redis-py's default is 10 retries with backoff up to 1 s, each reconnecting with the same policy: ~5 s per refusal.
REDIS_RETRIES = 1
#: The producer only pushes messages (it never blocks on a read), so its reads may time out sooner.
BROKER_SOCKET_TIMEOUT_S = 1.0


def operation_id(route: APIRoute) -> str:
    """Stable operationIds: `{tag}-{route function name}`, e.g. `jobs-create_job`."""
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def make_producer(settings: Settings) -> Celery:
    """A Celery app used only to send tasks by name (JSON, never pickle); it connects on the first send."""
    producer = Celery("dae-gateway", broker=str(settings.redis_url), set_as_current=False)
    producer.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Without socket timeouts a hung Redis (accepting connections, never answering) hangs POST /jobs.
            "socket_timeout": BROKER_SOCKET_TIMEOUT_S,
            "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
        },
        # A broker outage fails POST /jobs within about a second (a hung one within ~2 s) instead of hanging it.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5},
    )
    return producer


def make_redis_client(settings: Settings) -> redis.Redis:
    """The gateway's Redis client: short timeouts and one quick retry, so an outage is a fast 503, never a hang."""
    retry = Retry(ExponentialBackoff(cap=0.25, base=0.05), REDIS_RETRIES, supported_errors=(redis.ConnectionError,))
    return redis.Redis.from_url(
        str(settings.redis_url),
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=REDIS_SOCKET_TIMEOUT_S,
        retry=retry,
        # No health_check_interval: Redis refuses its PING under MISCONF, which would fail reads Redis still serves.
    )


_startup_objects_frozen = False


def freeze_startup_objects() -> None:
    """Move everything created so far out of the garbage collector's reach, once per process.

    Modules, the app, its routes and pydantic models (~100k objects) live as long as the process. Left in the
    collector's generations, each full collection walks all of them (~50 ms on 2 cores) and stalls every request
    in flight: measured with bench/serve.py, p99 at 32 concurrent /reconstruct calls went from ~125 ms to ~45 ms.
    Once per process, so test sessions that start many apps pay the collection once.
    """
    global _startup_objects_frozen
    if _startup_objects_frozen:
        return
    gc.collect()
    gc.freeze()
    _startup_objects_frozen = True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the app's resources (the only place that connects to anything) and close them at shutdown."""
    settings: Settings = app.state.settings
    metrics: GatewayMetrics = app.state.metrics
    redis_client = make_redis_client(settings)
    store = ModelStore(settings.store_dir)
    inference = InferenceEngine(
        store,
        cache_size=settings.inference_cache_size,
        memory_budget_mib=settings.inference_memory_budget_mib,
        batch_max_size=settings.inference_batch_max_size,
        batch_max_values=settings.inference_batch_max_values,
        batch_timeout_ms=settings.inference_batch_timeout_ms,
        queue_max_values=settings.inference_queue_max_values,
        intra_op_threads=settings.inference_intra_op_threads,
        workers=settings.inference_workers,
        retry_after_s=settings.retry_after_s,
        on_batch=metrics.observe_batch,
    )
    jobs = JobStore(redis_client, retention_s=settings.job_retention_days * 86400)
    producer = make_producer(settings)
    store_writable = CachedCheck(lambda: check_store_writable(settings.store_dir), ttl_s=STORE_CHECK_TTL_S)
    app.state.resources = Resources(
        settings=settings, redis=redis_client, jobs=jobs, store=store, producer=producer, inference=inference,
        store_writable=store_writable,
    )
    app.state.sse_limiter = anyio.CapacityLimiter(SSE_STREAMS_LIMIT)
    metrics.scrape_time.job_counts = jobs.counts_by_state
    metrics.scrape_time.inference_state = lambda: {
        "sessions": len(inference.cache),
        "session_bytes": inference.cache.total_bytes,
        "queued": inference.queued_images,
    }
    freeze_startup_objects()
    logger.info("gateway ready (store %s, redis %s)", store.root, settings.redis_url)
    try:
        yield
    finally:
        metrics.scrape_time.job_counts = None
        metrics.scrape_time.inference_state = None
        inference.close()
        producer.close()
        redis_client.close()


# ---------------------------------------------------------------------------------------------
# Errors, mapped once
# ---------------------------------------------------------------------------------------------


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


async def handle_dae_error(request: Request, error: DaeError) -> Response:
    """Every library error: its status_code and message; a 503 says when to retry."""
    headers = None
    if error.status_code == 503:  # Overloaded, or a job the broker did not accept
        headers = {"Retry-After": str(request.app.state.settings.retry_after_s)}
    if error.status_code >= 500:
        logger.error("%s: %s", type(error).__name__, error.message)
    return OrjsonResponse({"detail": error.message}, status_code=error.status_code, headers=headers)


async def handle_redis_error(request: Request, error: redis.RedisError) -> Response:
    """Redis unreachable or refusing writes is an outage (503, retry later); any other Redis error is a bug."""
    if not is_redis_outage(error):
        return await handle_unexpected(request, error)
    logger.warning(
        "job store unavailable on %s %s: %s: %s", request.method, request.url.path, type(error).__name__, redis_reply(error)
    )
    return OrjsonResponse(
        {"detail": job_store_unavailable_message(error)},
        status_code=503,
        headers={"Retry-After": str(request.app.state.settings.retry_after_s)},
    )


async def handle_validation_error(request: Request, error: RequestValidationError) -> Response:
    """422 with a readable sentence plus the per-field list."""
    errors = list(error.errors())
    return OrjsonResponse(
        {"detail": describe_validation_errors(errors), "errors": _error_entries(errors)}, status_code=422
    )


_UNPARSABLE_BODY_DETAILS = frozenset({
    "There was an error parsing the body", "Invalid multipart data.", "Missing boundary in multipart.",
})


async def handle_http_exception(request: Request, error: StarletteHTTPException) -> Response:
    """HTTP errors raised by the framework or routes (404 unknown path, 405, 413, 415, 406)."""
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

    Starlette names only the methods of the first route matching the path, so a path served by several routes
    (GET and POST /datasets) listed one of them (found by schemathesis' allow_header_conformance). The OpenAPI
    document lists them all, and is what clients read.
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
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return OrjsonResponse(
        {"detail": f"Internal error ({type(error).__name__}). Expected to handle this request. Received: a server fault"},
        status_code=500,
    )


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> GatewayApp:
    """Build the gateway for `settings` (default: from the environment). Connects to nothing until started."""
    settings = settings or get_settings()
    app = GatewayApp(
        title="DAE service",
        version=dae.__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
    )
    metrics = GatewayMetrics()
    app.state.settings = settings
    app.state.metrics = metrics

    app.add_exception_handler(DaeError, handle_dae_error)
    app.add_exception_handler(redis.RedisError, handle_redis_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_exception)
    app.add_exception_handler(Exception, handle_unexpected)

    for router in ROUTERS:
        app.include_router(router)

    # Added innermost first: metrics sees everything, auth runs before any body is read.
    api_keys = [key.get_secret_value() for key in settings.api_keys]
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(ApiKeyMiddleware, api_keys=api_keys)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # POST /reconstruct skips the framework's layers, behind the same three middlewares (service.direct_lane).
    app.enable_direct_lane(
        reconstruct_route(), metrics=metrics, api_keys=api_keys, max_body_bytes=settings.max_upload_bytes
    )

    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app


app = create_app()
