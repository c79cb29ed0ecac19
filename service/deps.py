"""Request dependencies: the resources the lifespan opened, as `Annotated` types routes declare.

Resources (Redis client, job store, model store, Celery producer, inference engine) are created in
`service.main.lifespan` and kept on `app.state.resources`; nothing here opens a connection. The getters are
`async def` on purpose: they only read app.state, and FastAPI would run plain `def` dependencies in the
threadpool (a thread hop per dependency per request). Which Redis errors are an outage (503) rather than a bug is
decided here too, once, for the error handler and the event stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import redis
from celery import Celery
from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader

from core.datasets import DatasetStore
from core.jobs import JobStore
from core.store import ModelStore
from dae.spec import OWNER_PATTERN
from service.auth import OPEN_ACCESS, Principal
from service.config import Settings
from service.inference.engine import InferenceEngine

API_KEY_HEADER = "X-API-Key"

#: Errors of a Redis that cannot be reached, is still loading its data or did not answer in time.
REDIS_UNREACHABLE_ERRORS = (redis.ConnectionError, redis.TimeoutError)
#: Replies of a Redis that refuses writes: out of memory (noeviction), a failed RDB/AOF write (MISCONF), read-only.
REDIS_REFUSED_ERRORS = (redis.OutOfMemoryError, redis.ReadOnlyError)


@dataclass
class Resources:
    """Everything the lifespan opens for one app."""

    settings: Settings
    redis: redis.Redis
    jobs: JobStore
    store: ModelStore
    datasets: DatasetStore
    producer: Celery
    inference: InferenceEngine
    store_writable: Callable[[], str]  # "ok" or why the model store is not writable (cached: it writes a file)


#: Where the auth middleware leaves the caller (scope["state"], read back as request.state.principal).
PRINCIPAL_STATE_KEY = "principal"


def principal_of(request: Request) -> Principal:
    """The caller the auth middleware identified; everyone is OPEN_ACCESS when no keys are configured."""
    # Read from the scope, not request.state: without keys getattr's default costs an AttributeError per request.
    principal: Principal = request.scope.get("state", {}).get(PRINCIPAL_STATE_KEY, OPEN_ACCESS)
    return principal


async def get_principal(request: Request) -> Principal:
    """The caller of this request (service.auth.Principal: owner and role)."""
    return principal_of(request)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


async def get_resources(request: Request) -> Resources:
    """The resources of the app serving this request."""
    value: Resources = request.app.state.resources
    return value


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with (available before the lifespan ran, unlike the resources)."""
    value: Settings = request.app.state.settings
    return value


async def get_redis(request: Request) -> redis.Redis:
    """The Redis client of the app."""
    value: redis.Redis = request.app.state.resources.redis
    return value


#: `?owner=`: an admin acts on that owner's resources; anyone else may only name its own (service.auth).
OwnerQuery = Annotated[
    str | None,
    Query(
        pattern=OWNER_PATTERN, max_length=64,
        description="Admin keys only: act on this owner's resources (without it an admin sees every owner's and "
        "creates its own). Other keys may only name their own owner.",
    ),
]


async def get_job_store(request: Request, principal: PrincipalDep, owner: OwnerQuery = None) -> JobStore:
    """Job records and events in Redis, as the caller's owner sees them."""
    name, every_owner = principal.acting_as(owner)
    jobs: JobStore = request.app.state.resources.jobs
    return jobs.with_owner(name, every_owner=every_owner)


async def get_model_store(request: Request, principal: PrincipalDep, owner: OwnerQuery = None) -> ModelStore:
    """The model store (published models), as the caller's owner sees it."""
    name, every_owner = principal.acting_as(owner)
    store: ModelStore = request.app.state.resources.store
    return store.with_owner(name, every_owner=every_owner)


async def get_dataset_store(request: Request, principal: PrincipalDep, owner: OwnerQuery = None) -> DatasetStore:
    """Uploaded datasets (and the cache of fetched built-ins) in the store, as the caller's owner sees them."""
    name, every_owner = principal.acting_as(owner)
    datasets: DatasetStore = request.app.state.resources.datasets
    return datasets.with_owner(name, every_owner=every_owner)


async def get_producer(request: Request) -> Celery:
    """The Celery app used only to send tasks by name."""
    value: Celery = request.app.state.resources.producer
    return value


async def get_inference(request: Request) -> InferenceEngine:
    """The onnxruntime session cache and micro-batcher."""
    value: InferenceEngine = request.app.state.resources.inference
    return value


def redis_reply(error: BaseException, limit: int = 300) -> str:
    """The error as Redis or the socket said it, without the pipeline's echo of the command (it holds job data)."""
    text = str(error).rpartition("caused error: ")[2]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def job_store_unavailable_message(error: BaseException) -> str:
    """The 503 sentence for a Redis outage: which store, what was expected, what it answered (never the URL)."""
    if isinstance(error, REDIS_UNREACHABLE_ERRORS):
        what, expected = "unreachable", "Redis at DAE_REDIS_URL to answer"
    else:
        what, expected = "refusing writes", "Redis at DAE_REDIS_URL to accept writes"
    return (
        f"The job store is {what}; retry later. Expected {expected}. "
        f"Received: {type(error).__name__}: {redis_reply(error)}"
    )


ResourcesDep = Annotated[Resources, Depends(get_resources)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
JobStoreDep = Annotated[JobStore, Depends(get_job_store)]
ModelStoreDep = Annotated[ModelStore, Depends(get_model_store)]
DatasetStoreDep = Annotated[DatasetStore, Depends(get_dataset_store)]
ProducerDep = Annotated[Celery, Depends(get_producer)]
InferenceDep = Annotated[InferenceEngine, Depends(get_inference)]

# The API-key scheme as OpenAPI sees it (Swagger UI's "Authorize" button sends it with every call).
# The check itself is done by service.middleware.AuthMiddleware, before the body is read, so an
# unauthenticated client cannot make the gateway parse a large upload; this dependency only documents it.
api_key_scheme = APIKeyHeader(
    name=API_KEY_HEADER,
    scheme_name="ApiKey",
    auto_error=False,
    description="An API key (owner:role:secret configured in DAE_API_KEYS; send the secret). Required when the "
    "gateway runs with keys; the probes are always open, metrics and docs unless configured otherwise.",
)


async def document_api_key(api_key: Annotated[str | None, Security(api_key_scheme)] = None) -> None:
    """Declares the X-API-Key security scheme on a router (enforced by the middleware)."""


ApiKeyRequired = Security(document_api_key)
