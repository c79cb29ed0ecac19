"""Training jobs: submit (enqueue `dae.train` by name), list, read, cancel and follow them (Server-Sent Events).

The gateway never waits on a task: POST answers 202 with a Location and the job's state is read from Redis.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.sse import EventSourceResponse, ServerSentEvent

from dae.data import BUILTIN_DATASETS, dataset_info
from dae.errors import DaeError, DatasetNotFound, DatasetUnavailable, InvalidSpec
from dae.jobs import EVENT_ID_PATTERN, TRAIN_QUEUE, TRAIN_TASK_NAME, state_event, task_time_limits
from dae.spec import JobRecord, JobState, TrainingSpec, check_spec_for_images
from dae.store import ModelStore
from service.config import Settings
from service.deps import ApiKeyRequired, JobStoreDep, ModelStoreDep, ProducerDep, SettingsDep
from service.schemas import JobList, error_responses

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/jobs", tags=["jobs"], dependencies=[ApiKeyRequired])

#: How long one Redis read of the event stream waits for new events before checking the job again.
EVENTS_BLOCK_MS = 1000


class BrokerUnavailable(DaeError):
    """The job was recorded but could not be handed to the queue (the broker did not answer)."""

    status_code = 503


def check_submittable(spec: TrainingSpec, settings: Settings, store: ModelStore) -> None:
    """Reject specs that cannot run here: too many epochs, unknown or unavailable dataset, too deep for its images."""
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
    check_spec_for_images(spec, tuple(info.shape))


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
    spec: TrainingSpec,
    response: Response,
    settings: SettingsDep,
    jobs: JobStoreDep,
    store: ModelStoreDep,
    producer: ProducerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="Same key + same body → the same job (no second run); same key + another body → 409.",
        ),
    ] = None,
) -> JobRecord:
    """Validate the spec against its dataset, record the job and queue it; answers 202 with a Location."""
    check_submittable(spec, settings, store)
    record, created = jobs.create(spec, idempotency_key=idempotency_key)
    if created:
        soft_limit, hard_limit = task_time_limits(spec)
        try:
            producer.send_task(
                TRAIN_TASK_NAME,
                args=[record.id],
                queue=TRAIN_QUEUE,
                soft_time_limit=soft_limit,
                time_limit=hard_limit,
            )
        except Exception as error:  # kombu/redis raise many types; the job must not stay queued forever
            logger.exception("could not enqueue job %s", record.id)
            jobs.mark_failed(record.id, f"The job could not be queued ({type(error).__name__}); submit it again.")
            raise BrokerUnavailable(
                f"The training queue is unreachable. Expected the broker at DAE_REDIS_URL to accept the job. "
                f"Received: {type(error).__name__}: {error}"
            ) from None
        logger.info("queued job %s (dataset %s, %d epochs)", record.id, spec.dataset, spec.epochs)
    else:
        response.headers["Idempotent-Replayed"] = "true"
    response.headers["Location"] = f"/jobs/{record.id}"
    return record


@router.get("", response_model=JobList, summary="List jobs", responses=error_responses(401, 403, 422))
def list_jobs(
    jobs: JobStoreDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, description="Jobs to skip (newest first).")] = 0,
) -> JobList:
    """Jobs newest first, optionally only those in one state; paginated with limit/offset and the total."""
    items, total = jobs.list(state, limit=limit, offset=offset)
    return JobList(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobRecord, summary="Read a job", responses=error_responses(401, 403, 404))
def read_job(job_id: str, jobs: JobStoreDep) -> JobRecord:
    """The full record: state, progress, per-epoch history, model id, failure reason."""
    return jobs.get(job_id)


@router.delete(
    "/{job_id}", response_model=JobRecord, summary="Cancel a job", responses=error_responses(401, 403, 404, 409)
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
        Header(alias="Last-Event-ID", description="Resume after this event id (browsers send it on reconnect)."),
    ] = None,
) -> str | None:
    """The Last-Event-ID header, validated before the stream starts."""
    if last_event_id is not None and not EVENT_ID_PATTERN.fullmatch(last_event_id):
        raise DaeError(
            f"Last-Event-ID is not an event id of this stream. Expected an id like '1712345678901-0'. "
            f"Received: {last_event_id[:64]!r}"
        )
    return last_event_id


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (Server-Sent Events)",
    responses=error_responses(400, 401, 403, 404),
)
async def stream_job_events(
    request: Request,
    job: Annotated[JobRecord, Depends(existing_job)],
    jobs: JobStoreDep,
    last_event_id: Annotated[str | None, Depends(checked_last_event_id)],
) -> AsyncIterator[ServerSentEvent]:
    """Replays the job's events (from the start or after Last-Event-ID): `epoch` per epoch, `state` on each change; closes after the final state."""
    limiter: anyio.CapacityLimiter = request.app.state.sse_limiter
    cursor = last_event_id
    while not await request.is_disconnected():
        events = await anyio.to_thread.run_sync(jobs.read_events, job.id, cursor, 0, limiter=limiter)
        if not events:
            record = await anyio.to_thread.run_sync(jobs.get, job.id, limiter=limiter)
            if record.state.is_terminal:
                # Everything up to the end was sent before Last-Event-ID (or the stream was trimmed): close
                # with the final state instead of waiting for events that will never come.
                yield ServerSentEvent(event="state", data=state_event(record))
                return
            events = await anyio.to_thread.run_sync(jobs.read_events, job.id, cursor, EVENTS_BLOCK_MS, limiter=limiter)
        for event_id, payload in events:
            cursor = event_id
            yield ServerSentEvent(id=event_id, event=str(payload.get("type", "message")), data=payload)
            if payload.get("type") == "state" and JobState(payload["state"]).is_terminal:
                return
