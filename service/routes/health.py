"""Probes and metrics: /healthz (live), /readyz (Redis + store), /metrics (Prometheus). No API key needed."""

from __future__ import annotations

import logging
import os
import tempfile

import redis
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import RedisDep, SettingsDep
from service.responses import OrjsonResponse
from service.schemas import Liveness, Readiness

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness probe", response_model=Liveness)
def read_liveness() -> Liveness:
    """Answers 200 while the process runs; checks nothing else."""
    return Liveness(status="ok")


@router.get(
    "/readyz",
    summary="Readiness probe",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "Redis unreachable or the store not writable"}},
)
def read_readiness(settings: SettingsDep, redis_client: RedisDep) -> Response:
    """200 when Redis answers PING and the model store is writable; 503 with the failing check otherwise."""
    checks = {"redis": _check_redis(redis_client), "store": _check_store_writable(settings.store_dir)}
    ready = all(result == "ok" for result in checks.values())
    body = Readiness(status="ready" if ready else "unavailable", checks=checks)
    return OrjsonResponse(body.model_dump(), status_code=200 if ready else 503)


def _check_redis(redis_client: redis.Redis) -> str:
    try:
        redis_client.ping()
    except (redis.RedisError, OSError) as error:
        return f"unreachable: {error}"
    return "ok"


def _check_store_writable(store_dir: os.PathLike) -> str:
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
