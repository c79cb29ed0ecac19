"""The gateway app: `create_app(settings)` builds it (service.main holds the `app` uvicorn serves).

Nothing connects at import time: the Redis client, the Celery producer, the model store and the inference
engine are opened in `lifespan` and reach routes through service.deps. The middleware list is defined once
(`middleware`), errors are mapped to HTTP once (service.errors).
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import redis
from celery import Celery
from fastapi import FastAPI
from fastapi.routing import APIRoute
from redis.backoff import ExponentialBackoff
from redis.retry import Retry
from starlette.middleware import Middleware

import dae
from core.datasets import DatasetStore
from core.jobs import JobStore, is_redis_outage
from core.migrations import migrate_job_indexes, migrate_store_names
from core.store import ModelStore
from dae.spec import DEFAULT_OWNER
from service.config import Settings, get_settings
from service.deps import Resources
from service.docs import install_docs
from service.errors import add_exception_handlers
from service.fast_lane import ReconstructLane
from service.inference.engine import InferenceEngine
from service.inference.memory import use_one_malloc_arena
from service.metrics import GatewayMetrics
from service.middleware import AuthMiddleware, BodySizeLimitMiddleware, MetricsMiddleware
from service.openapi import build_openapi
from service.routes import ROUTERS
from service.routes.health import STORE_CHECK_TTL_S, CachedCheck, check_store_writable
from service.routes.jobs import EVENTS_BLOCK_MS

logger = logging.getLogger(__name__)

#: Event streams that may wait on Redis at once (each holds a thread while it waits; kept apart from the
#: threadpool the synchronous routes use, so followers cannot starve the API).
SSE_STREAMS_LIMIT = 64

DESCRIPTION = """\
Trains and serves **denoising autoencoders**.

1. `POST /jobs` with a training spec (the example trains a small blind U-Net denoiser on the 8x8 `digits` dataset in seconds)
   → 202 and a job id; follow it with `GET /jobs/{job_id}` or the event stream `GET /jobs/{job_id}/events`.
2. The finished job names its model; `GET /models/{ref}` shows its card (evaluation against classical denoisers).
3. `POST /reconstruct` denoises images (JSON or a file upload) and returns the error map |input − denoised|.

When the service runs with `DAE_API_KEYS`, press **Authorize** and enter a key (sent as `X-API-Key`): each key
has an owner and a role (`infer` < `train` < `admin`), and sees only its owner's jobs, models and datasets.
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
#: Pause between tries of the job-index migration while Redis is unreachable at start.
JOB_MIGRATION_RETRY_S = 5.0


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

    Modules, the app, its routes and models live as long as the process; left to the collector, every full
    collection walks them all and stalls the requests in flight (p99 figures: bench/README.md, 2026-12-02).
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
    use_one_malloc_arena()  # so that the trim after a large answer reaches every thread's frees
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
        settings=settings, redis=redis_client, jobs=jobs, store=store, datasets=DatasetStore(settings.store_dir),
        producer=producer, inference=inference,
        store_writable=store_writable,
    )
    app.state.sse_limiter = anyio.CapacityLimiter(SSE_STREAMS_LIMIT)
    metrics.scrape_time.job_counts = jobs.counts_by_state
    metrics.scrape_time.inference_state = lambda: {
        "sessions": len(inference.cache),
        "session_bytes": inference.cache.total_bytes,
        "queued": inference.queued_images,
    }
    migrate_store_names(store)
    migration = asyncio.create_task(migrate_jobs_when_redis_answers(jobs))
    freeze_startup_objects()
    if settings.auth_enabled:
        logger.info("API keys on: %d owner(s) have keys", len(settings.key_ring().owners))
    else:
        logger.warning("no API keys configured (DAE_API_KEYS): the service is OPEN; every caller is the %r owner's "
                       "admin", DEFAULT_OWNER)
    logger.info("gateway ready (store %s, redis %s)", store.root, settings.redis_url)
    try:
        yield
    finally:
        migration.cancel()
        metrics.scrape_time.job_counts = None
        metrics.scrape_time.inference_state = None
        inference.close()
        producer.close()
        redis_client.close()


async def migrate_jobs_when_redis_answers(jobs: JobStore, retry_s: float = JOB_MIGRATION_RETRY_S) -> None:
    """Index jobs recorded before owners existed (core.migrations), retrying while Redis is unreachable."""
    while True:
        try:
            indexed = await anyio.to_thread.run_sync(migrate_job_indexes, jobs)
        except Exception as error:
            if not is_redis_outage(error):
                logger.exception("could not index the jobs recorded before owners existed")
                return
            await asyncio.sleep(retry_s)
            continue
        if indexed:
            logger.warning("indexed %d job(s) recorded before owners existed under their owners", indexed)
        return


def middleware(settings: Settings, metrics: GatewayMetrics) -> list[Middleware]:
    """The gateway's middleware, outermost first: metrics sees every answer, auth runs before any body is read."""
    return [
        Middleware(MetricsMiddleware, metrics=metrics),
        Middleware(AuthMiddleware, keys=settings.key_ring(), protect_metrics=settings.metrics_require_key,
                   protect_docs=settings.docs_require_key),
        Middleware(BodySizeLimitMiddleware, max_bytes=settings.max_upload_bytes),
        Middleware(ReconstructLane),  # innermost: POST /reconstruct without routing (service.fast_lane)
    ]


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the gateway for `settings` (default: from the environment). Connects to nothing until started."""
    settings = settings or get_settings()
    metrics = GatewayMetrics()
    app = FastAPI(
        title="DAE service",
        version=dae.__version__,
        description=DESCRIPTION,
        openapi_tags=TAGS,
        lifespan=lifespan,
        middleware=middleware(settings, metrics),
        generate_unique_id_function=operation_id,
        swagger_ui_parameters={"persistAuthorization": True, "displayRequestDuration": True},
        telemetry=None if settings.opentelemetry else {"tracing": False, "metrics": False, "logs": False},
        docs_url=None, redoc_url=None,  # install_docs serves them with local assets (no CDN)
    )
    app.state.settings = settings
    app.state.metrics = metrics
    add_exception_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    install_docs(app)
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app
