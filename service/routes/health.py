"""Probes and metrics: /healthz (live), /readyz (Redis + store), /metrics (Prometheus). No API key needed."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from core.jobs import JobStore
from service.deps import ResourcesDep, redis_reply
from service.responses import OrjsonResponse
from service.schemas import Liveness, Readiness

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

#: How long a store check's result is reused: each check writes a file, and probes call /readyz every few seconds.
STORE_CHECK_TTL_S = 5.0


class CachedCheck:
    """A readiness check whose result is reused for `ttl_s` seconds, so frequent probes do not repeat its work."""

    def __init__(self, check: Callable[[], str], *, ttl_s: float) -> None:
        if ttl_s < 0:
            raise ValueError(f"Expected a non-negative time to live. Received: ttl_s={ttl_s}")
        self._check = check
        self._ttl_s = ttl_s
        self._lock = threading.Lock()  # concurrent probes run the check once, not once each
        self._result: str | None = None
        self._expires_at = 0.0

    def __call__(self) -> str:
        """The cached result, or a fresh one once it is older than `ttl_s`."""
        with self._lock:
            now = time.monotonic()
            if self._result is None or now >= self._expires_at:
                self._result = self._check()
                self._expires_at = now + self._ttl_s
            return self._result


@router.get("/healthz", summary="Liveness probe", response_model=Liveness)
async def read_liveness() -> Liveness:
    """Answers 200 while the process runs; checks nothing else."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    summary="Readiness probe",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis unreachable or refusing writes, or the store not writable"}},
)
def read_readiness(resources: ResourcesDep) -> Response:
    """200 when Redis answers and accepts writes and the model store is writable; 503 with the failing check otherwise.
    `auth` says whether API keys are required (`open`: none configured)."""
    checks = {"redis": check_redis(resources.jobs), "store": resources.store_writable()}
    ready = all(result == "ok" for result in checks.values())
    auth = "api_keys" if resources.settings.auth_enabled else "open"
    body = Readiness(status="ready" if ready else "unavailable", checks=checks, auth=auth)
    return OrjsonResponse(body.model_dump(), status_code=200 if ready else 503)


def check_redis(jobs: JobStore) -> str:
    """"ok", "unreachable: ..." or "refusing writes: ..." (out of memory, MISCONF, read-only replica)."""
    try:
        jobs.client.ping()  # under MISCONF Redis refuses PING too: a ResponseError, not an unreachable server
        # LPUSHX on a key that never exists changes nothing, yet Redis applies its write admission checks first.
        jobs.client.lpushx(f"{jobs.prefix}readyz:write-probe", "1")
    except redis.ResponseError as error:
        return f"refusing writes: {type(error).__name__}: {redis_reply(error)}{_memory_note(jobs.client, error)}"
    except (redis.RedisError, OSError) as error:
        return f"unreachable: {type(error).__name__}: {redis_reply(error)}"
    return "ok"


def _memory_note(client: redis.Redis, error: redis.ResponseError) -> str:
    """For an out-of-memory refusal, the figures an operator needs (from INFO memory); empty otherwise."""
    if not isinstance(error, redis.OutOfMemoryError):
        return ""
    try:
        memory = client.info("memory")
    except (redis.RedisError, OSError):
        return ""
    return (
        f" (used_memory {memory.get('used_memory_human')}, maxmemory {memory.get('maxmemory_human')}, "
        f"maxmemory_policy {memory.get('maxmemory_policy')})"
    )


def check_store_writable(store_dir: str | os.PathLike[str]) -> str:
    """"ok" when a file can be created in the model store; "not writable: ..." otherwise."""
    try:
        os.makedirs(store_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store_dir, prefix=".readyz-", delete=True) as probe:
            probe.write(b"ok")
            probe.flush()
    except OSError as error:
        return f"not writable: {error}"
    return "ok"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
                     "description": "Prometheus text format"}},
)
def read_metrics(request: Request) -> Response:
    """Request counts and latencies per route, micro-batch sizes, jobs by state, loaded sessions."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
