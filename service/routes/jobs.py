"""Training jobs: submit (enqueue `dae.train` by name), list, read, cancel and follow them (Server-Sent Events).

The gateway never waits on a task: POST answers 202 with a Location and the job's state is read from Redis.
While Redis is unreachable these routes answer 503 (service.main maps the errors); an open event stream waits for
Redis to come back instead of breaking.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
import redis
from celery import Celery
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import BeforeValidator

from core.datasets import DatasetStore
from core.jobs import IDEMPOTENCY_KEY_PATTERN, JobStore, is_redis_outage, state_event
from core.queue import enqueue_training
from dae.cost import check_job_cost
from dae.data import BUILTIN_DATASETS, dataset_info
from dae.errors import DaeError, DatasetNotFound, DatasetUnavailable, InvalidSpec, JobNotFound
from dae.spec import JobRecord, JobState, TrainingSpec
from service.config import Settings
from service.deps import (
    ApiKeyRequired,
    DatasetStoreDep,
    JobStoreDep,
    ProducerDep,
    SettingsDep,
    redis_reply,
)
from service.errors import BrokerUnavailable
from service.schemas import MAX_LIST_OFFSET, JobList, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[ApiKeyRequired])

#: How long one Redis read of the event stream waits for new events before checking the job again.
EVENTS_BLOCK_MS = 1000
#: Pauses of an event stream between reads while Redis is unreachable: the first, doubled up to the last.
EVENTS_OUTAGE_BACKOFF_S = (0.25, 2.0)
#: A Last-Event-ID the stream accepts: a Redis stream id, `<ms>[-<seq>]`. Redis refuses parts above 2^64 - 1 (an
#: error once the stream has started), so each part has at most 19 digits (< 10^19 < 2^64); documented as the
#: header's pattern, so the schema and the check agree.
LAST_EVENT_ID_PATTERN = r"^\d{1,19}(-\d{1,19})?$"
_LAST_EVENT_ID = re.compile(LAST_EVENT_ID_PATTERN, re.ASCII)


def _whole_numbers_as_int(value: Any) -> Any:
    """5.0 becomes 5 throughout a JSON document (JSON has one number type; JSON Schema calls 5.0 an integer)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _whole_numbers_as_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_numbers_as_int(item) for item in value]
    return value


def strict_spec(value: Any) -> Any:
    """Validate a submitted spec with JSON's types: `true` or `"3"` is not a number, `1` is not `true`.

    Pydantic's default (lax) mode would train `"kernel_size": true` as a kernel of 1 (found by schemathesis'
    negative_data_rejection). Strict mode applies to the whole spec; whole floats still count as integers.
    """
    if isinstance(value, dict):
        return TrainingSpec.model_validate(_whole_numbers_as_int(value), strict=True)
    return value


#: The body of POST /jobs: a TrainingSpec, validated strictly (its schema is TrainingSpec's).
SubmittedSpec = Annotated[TrainingSpec, BeforeValidator(strict_spec)]


def check_submittable(spec: TrainingSpec, settings: Settings, store: DatasetStore) -> None:
    """Reject specs that cannot run here: too many epochs, unknown or unavailable dataset, too deep for its images,
    a model or training memory above the limits."""
    if spec.epochs > settings.max_epochs:
        raise InvalidSpec(
            f"epochs is above this service's limit. Expected at most {settings.max_epochs} (DAE_MAX_EPOCHS). "
            f"Received: epochs={spec.epochs}"
        )
    try:
        info = dataset_info(spec.dataset, store)
    except DatasetNotFound:
        raise InvalidSpec(
            f"Unknown dataset. Expected a built-in dataset ({', '.join(BUILTIN_DATASETS)}) or the id of an uploaded "
            f"dataset (see GET /datasets). Received: dataset={spec.dataset!r}"
        ) from None
    if not info.available:
        raise DatasetUnavailable(
            f"Dataset {spec.dataset!r} needs a download and this deployment has no cached copy. Expected an "
            f"available dataset (see GET /datasets). Received: dataset={spec.dataset!r}"
        )
    # Too deep for the images, or what no worker could hold: refused here, before it is queued and kills pool children.
    height, width, channels = info.shape
    check_job_cost(spec, (height, width, channels), max_params=settings.max_model_params,
                   max_training_memory_mib=settings.max_training_memory_mib, train_images=info.count)


@router.post(
    "",
    status_code=202,
    response_model=JobRecord,
    summary="Submit a training job",
    responses={
        202: {"description": "Queued; `Location` points at the job", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(400, 401, 403, 409, 413, 422, 503),
    },
)
def create_job(
    spec: SubmittedSpec,
    response: Response,
    settings: SettingsDep,
    jobs: JobStoreDep,
    store: DatasetStoreDep,
    producer: ProducerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="Same key + same body → the same job (no second run); same key + another body → 409.",
            json_schema_extra={"pattern": IDEMPOTENCY_KEY_PATTERN.pattern},  # checked by JobStore.create (400)
        ),
    ] = None,
) -> JobRecord:
    """Validate the spec against its dataset, record the job and queue it; answers 202 with a Location."""
    check_submittable(spec, settings, store)
    record, created = jobs.create(spec, idempotency_key=idempotency_key)
    # A replayed key whose first send failed is sent again: the retry the 503 asked for.
    if created or jobs.needs_dispatch(record.id):
        dispatch(record, jobs, producer, idempotency_key=idempotency_key)
        logger.info("queued job %s (dataset %s, %d epochs)", record.id, spec.dataset, spec.epochs)
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{record.id}"
    return record


def dispatch(record: JobRecord, jobs: JobStore, producer: Celery, *, idempotency_key: str | None) -> None:
    """Send the job's message and note it; BrokerUnavailable (503) if the broker refused it.

    With an Idempotency-Key the job stays queued, so the client's retry (or the workers' reaper) sends it again;
    without one the client cannot reach this job again, so it is failed rather than left to run unseen.
    """
    try:
        enqueue_training(producer, record)
    except Exception as error:  # kombu/redis raise many types; every one means "not queued"
        logger.warning("could not enqueue job %s: %s: %s", record.id, type(error).__name__, error)
        if idempotency_key is None:
            jobs.mark_failed(record.id, f"The job could not be queued ({type(error).__name__}); submit it again.")
            outcome, advice = "was marked failed", "submit it again"
        else:
            outcome = "is recorded as queued"
            advice = ("retry with the same Idempotency-Key to queue it (the workers also queue it within about a "
                      "minute once the broker is back)")
        raise BrokerUnavailable(
            f"Job {record.id} {outcome} but the training queue did not accept it. Expected the broker at "
            f"DAE_REDIS_URL to accept the job; {advice}. Received: {type(error).__name__}: {error}"
        ) from None
    try:
        jobs.mark_dispatched(record.id)
    except redis.RedisError as error:  # the message is out: the reaper finds it in the queue, so still a 202
        logger.warning("job %s queued but not noted as dispatched: %s: %s", record.id, type(error).__name__, error)


@router.get("", response_model=JobList, summary="List jobs", responses=error_responses(401, 403, 422, 503))
def list_jobs(
    jobs: JobStoreDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET, description="Jobs to skip (newest first).")] = 0,
) -> JobList:
    """Jobs newest first, optionally only those in one state; paginated with limit/offset and the total."""
    items, total = jobs.list(state, limit=limit, offset=offset)
    return JobList(items=items, total=total, limit=limit, offset=offset)


@router.get(
    "/{job_id}", response_model=JobRecord, summary="Read a job", responses=error_responses(401, 403, 404, 503)
)
def read_job(job_id: str, jobs: JobStoreDep) -> JobRecord:
    """The full record: state, progress, per-epoch history, model id, failure reason."""
    return jobs.get(job_id)


@router.delete(
    "/{job_id}", response_model=JobRecord, summary="Cancel a job", responses=error_responses(401, 403, 404, 409, 503)
)
def cancel_job(job_id: str, jobs: JobStoreDep) -> JobRecord:
    """Ask a job to stop (idempotent): queued → cancelled at once, running → cancelling; 409 if it already finished."""
    return jobs.request_cancel(job_id)


def existing_job(job_id: str, jobs: JobStoreDep) -> JobRecord:
    """The job's record, or 404 before any event stream starts."""
    return jobs.get(job_id)


async def checked_last_event_id(
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            description="Resume after this event id (browsers send it on reconnect).",
            # Checked below (400 with our own sentence), documented here.
            json_schema_extra={"pattern": LAST_EVENT_ID_PATTERN},
        ),
    ] = None,
) -> str | None:
    """The Last-Event-ID header, validated before the stream starts (a 400, not a broken stream)."""
    if last_event_id is not None and not _LAST_EVENT_ID.fullmatch(last_event_id):
        raise DaeError(
            f"Last-Event-ID is not an event id of this stream. Expected an id like '1712345678901-0'. "
            f"Received: {last_event_id[:64]!r}"
        )
    return last_event_id


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (Server-Sent Events)",
    responses=error_responses(400, 401, 403, 404, 503),
)
async def stream_job_events(
    request: Request,
    job: Annotated[JobRecord, Depends(existing_job)],
    jobs: JobStoreDep,
    last_event_id: Annotated[str | None, Depends(checked_last_event_id)],
) -> AsyncIterator[ServerSentEvent]:
    """Replays the job's events (from the start or after Last-Event-ID): `epoch` per epoch, `state` on each change; closes after the final state, stays open through a Redis outage."""
    limiter: anyio.CapacityLimiter = request.app.state.sse_limiter
    cursor = last_event_id
    failures = 0
    while not await request.is_disconnected():
        try:
            events, final = await next_events(jobs, job.id, cursor, limiter)
        except JobNotFound:  # the record vanished (expired, or lost with Redis's last unsaved second)
            return
        except redis.RedisError as error:
            if not is_redis_outage(error):
                raise
            if failures == 0:
                logger.warning("job store unreachable while following job %s; retrying: %s", job.id, redis_reply(error))
                yield ServerSentEvent(comment="job store unreachable; retrying")
            await anyio.sleep(outage_pause_s(failures))
            failures += 1
            continue
        if failures:
            logger.info("job store reachable again; following job %s", job.id)
            failures = 0
        if final is not None:
            # Everything up to the end was sent before Last-Event-ID (or the stream was trimmed): close with the
            # final state instead of waiting for events that will never come.
            yield ServerSentEvent(event="state", data=state_event(final))
            return
        for event_id, payload in events:
            cursor = event_id
            yield ServerSentEvent(id=event_id, event=str(payload.get("type", "message")), data=payload)
            if payload.get("type") == "state" and JobState(payload["state"]).is_terminal:
                return


async def next_events(
    jobs: JobStore, job_id: str, cursor: str | None, limiter: anyio.CapacityLimiter
) -> tuple[list[tuple[str, dict[str, Any]]], JobRecord | None]:
    """The events after `cursor` (waiting up to EVENTS_BLOCK_MS), or none and the record once the job has finished."""
    events = await anyio.to_thread.run_sync(jobs.read_events, job_id, cursor, 0, limiter=limiter)
    if events:
        return events, None
    record = await anyio.to_thread.run_sync(jobs.get, job_id, limiter=limiter)
    if record.state.is_terminal:
        return [], record
    events = await anyio.to_thread.run_sync(jobs.read_events, job_id, cursor, EVENTS_BLOCK_MS, limiter=limiter)
    return events, None


def outage_pause_s(failures: int) -> float:
    """How long an event stream waits before its next read after `failures` failed ones (doubling, capped)."""
    first, most = EVENTS_OUTAGE_BACKOFF_S
    return float(min(most, first * 2 ** min(failures, 16)))
