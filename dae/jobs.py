"""Job records, progress events and attempt leases in Redis; shared by the gateway and the worker.

TensorFlow-free and synchronous (redis-py). Layout under the key prefix (default ``dae:``):

- ``{p}job:{id}``             hash: ``record`` (JobRecord JSON), ``cancel`` ("1" once a cancel was requested),
                              ``idempotency_key``, ``dispatched`` (when a message last reached the broker),
                              ``attempt`` (the attempt number that may hold the lease), ``exit`` (how the last
                              lost process died, e.g. "signal SIGKILL").
- ``{p}job:{id}:events``      stream of progress/state events (``data`` = JSON), trimmed to ~EVENTS_MAXLEN.
- ``{p}job:{id}:lease``       the running attempt's lease, "attempt|host:pid|token" with a PX TTL.
- ``{p}jobs:all``             sorted set of every job id, score = creation time (epoch seconds).
- ``{p}jobs:state:{state}``   one sorted set per state, same score: listing and counting never scan keys.
- ``{p}idempotency:{key}``    JSON ``{"job_id", "spec_sha256"}`` with a TTL.

Every change of a record is a read-modify-write under WATCH/MULTI on the job hash, so the gateway's cancel
and the worker's transitions cannot overwrite each other: one of two racing writers retries on fresh data.
The state indexes and the "state" event are written in the same MULTI as the record, so a reader never sees
a record whose index or event stream disagrees with it. A worker's writes are fenced by its lease (the attempt
number is the fencing token): a stale attempt's write raises LeaseLost instead of changing the job. Finished jobs'
hash and events expire after the retention period; the reaper prunes their index entries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import redis

from dae.errors import Conflict, DaeError, JobNotFound
from dae.spec import MAX_RUNTIME_S, EpochMetrics, JobRecord, JobState, TrainingSpec

logger = logging.getLogger(__name__)

#: Celery task name and queue; the gateway enqueues by name (it never imports the worker).
TRAIN_TASK_NAME = "dae.train"
TRAIN_QUEUE = "dae.train"

DEFAULT_PREFIX = "dae:"
JOB_ID_PATTERN = re.compile(r"^j_[0-9a-f]{16}$")
EVENT_ID_PATTERN = re.compile(r"^\d{1,20}(-\d{1,20})?$")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")
#: How long an idempotency key maps to its job (a retried POST within a day gets the same job).
IDEMPOTENCY_TTL_S = 24 * 3600
#: Approximate bound of each job's event stream: one event per epoch (MAX_EPOCHS = 1000) plus state events.
EVENTS_MAXLEN = 2000

#: Time a task needs beyond the training budget: TF import, dataset load, ONNX export + check,
#: evaluation on the test split, plots. The soft limit fires only if all that overruns this margin.
TASK_OVERHEAD_S = 600.0
#: Between the soft limit (SoftTimeLimitExceeded, recorded as a failure) and the hard kill of the child.
HARD_LIMIT_GRACE_S = 120.0

#: Lease of a running attempt: its lifetime and how often the holder renews it. A lost attempt's job is picked up
#: once its lease has expired (by the workers' reaper, worker/reaper.py).
DEFAULT_LEASE_TTL_S = 30.0
DEFAULT_LEASE_RENEW_S = 5.0
#: Finished jobs' records and event streams expire after this many days.
DEFAULT_RETENTION_DAYS = 30.0
#: Hash field naming the attempt number that may hold the lease (the fencing token's reference).
ATTEMPT_FIELD = "attempt"

#: Outcomes of JobStore.start_attempt.
ATTEMPT_STARTED, ATTEMPT_BUSY, ATTEMPT_SKIPPED = "started", "busy", "skipped"
ATTEMPT_CANCELLED, ATTEMPT_FAILED = "cancelled", "failed"

#: Allowed state changes. A transition to the same state is a no-op handled before this table.
ALLOWED_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.queued: frozenset({JobState.running, JobState.cancelled, JobState.failed}),
    JobState.running: frozenset(
        {JobState.cancelling, JobState.retrying, JobState.succeeded, JobState.failed, JobState.cancelled}
    ),
    JobState.retrying: frozenset(
        {JobState.running, JobState.cancelling, JobState.succeeded, JobState.failed, JobState.cancelled}
    ),
    JobState.cancelling: frozenset({JobState.cancelled, JobState.succeeded, JobState.failed}),
    JobState.succeeded: frozenset(),
    JobState.failed: frozenset(),
    JobState.cancelled: frozenset(),
}

_T = TypeVar("_T")


#: Replies of a Redis that refuses writes that redis-py has no class for; inside a pipeline after "caused error: ".
_REFUSAL_REPLY = re.compile(r"(?:^|caused error: )(MISCONF|NOREPLICAS|MASTERDOWN) ")


def is_redis_outage(error: BaseException) -> bool:
    """True when Redis is unreachable, still loading, timed out or refusing writes (retry later), False for a bug."""
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):  # includes BusyLoadingError
        return True
    if isinstance(error, redis.OutOfMemoryError | redis.ReadOnlyError):
        return True
    return isinstance(error, redis.ResponseError) and _REFUSAL_REPLY.search(str(error)) is not None


class LeaseLost(Exception):
    """This attempt no longer holds its job's lease: another attempt owns the job, so it must write nothing more."""


def task_time_limits(spec: TrainingSpec) -> tuple[float, float]:
    """Celery (soft, hard) time limits in seconds for a job.

    Training stops itself at ``spec.max_runtime_s`` (stop_reason "timeout", keeping the best model); the
    soft limit is the backstop for everything around it, the hard limit kills a child that ignores it.
    """
    soft = float(spec.max_runtime_s) + TASK_OVERHEAD_S
    return soft, soft + HARD_LIMIT_GRACE_S


#: The longest any task may run (hard limit of the largest allowed max_runtime_s). The broker's
#: visibility timeout must exceed it, or a healthy long job is redelivered while it runs.
MAX_TASK_TIME_S = MAX_RUNTIME_S + TASK_OVERHEAD_S + HARD_LIMIT_GRACE_S


def enqueue_training(producer: Any, record: JobRecord) -> None:
    """Send `dae.train(job_id)` by name with the job's time limits (`producer` is any Celery app; JSON only).

    Sending is safe to repeat: a duplicate message finds the job leased or finished and is dropped.
    """
    soft_limit, hard_limit = task_time_limits(record.spec)
    producer.send_task(TRAIN_TASK_NAME, args=[record.id], queue=TRAIN_QUEUE, soft_time_limit=soft_limit,
                       time_limit=hard_limit)


def new_job_id() -> str:
    """A fresh job id: "j_" + 16 hex characters."""
    return "j_" + secrets.token_hex(8)


def check_job_id(job_id: str) -> str:
    """Return the id if well-formed; raise JobNotFound otherwise (malformed ids never reach Redis keys)."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise JobNotFound(f"No job with this id. Expected an id like 'j_' + 16 hex digits. Received: job_id={job_id!r}")
    return job_id


def spec_fingerprint(spec: TrainingSpec) -> str:
    """sha256 of the spec's canonical JSON (defaults filled in), to compare bodies under an idempotency key."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _now() -> datetime:
    return datetime.now(UTC)


def _text(value: bytes | str | None) -> str | None:
    """Redis replies are bytes unless the client decodes; accept both."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    """Job records, state indexes, idempotency keys, progress events and locks in one Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 retention_s: float = DEFAULT_RETENTION_DAYS * 86400) -> None:
        if retention_s < 1:
            raise ValueError(f"Expected a retention of at least a second. Received: retention_s={retention_s}")
        self.client = client
        self.prefix = prefix
        self.retention_s = retention_s
        self._renew_lease = client.register_script(_RENEW_LEASE_LUA)
        self._release_lease = client.register_script(_RELEASE_LEASE_LUA)
        self._free_lost_lease = client.register_script(_FREE_LOST_LEASE_LUA)
        self._take_turn = client.register_script(_TAKE_TURN_LUA)

    # -- key names -------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        """Hash holding the record of one job."""
        return f"{self.prefix}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        """Stream of one job's events."""
        return f"{self.prefix}job:{job_id}:events"

    def lease_key(self, job_id: str) -> str:
        """The lease of the attempt that owns the job."""
        return f"{self.prefix}job:{job_id}:lease"

    def index_key(self, state: JobState | None = None) -> str:
        """Sorted set of all jobs (state None) or of the jobs in one state."""
        return f"{self.prefix}jobs:all" if state is None else f"{self.prefix}jobs:state:{state.value}"

    def idempotency_key(self, key: str) -> str:
        """Where an idempotency key maps to its job."""
        return f"{self.prefix}idempotency:{key}"

    # -- gateway side ----------------------------------------------------------------------------

    def create(self, spec: TrainingSpec, *, idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
        """Create a queued job; return (record, created).

        With an idempotency key already used for the same spec, returns that job and created=False;
        for a different spec raises Conflict naming the key.
        """
        if idempotency_key is not None and not IDEMPOTENCY_KEY_PATTERN.match(idempotency_key):
            raise DaeError(
                "Idempotency-Key must be 1-200 printable ASCII characters without spaces. "
                f"Received: idempotency_key={idempotency_key[:64]!r}"
            )
        fingerprint = spec_fingerprint(spec)
        now = _now()
        record = JobRecord(id=new_job_id(), state=JobState.queued, spec=spec, created_at=now)
        score = now.timestamp()
        idem_key = self.idempotency_key(idempotency_key) if idempotency_key is not None else None

        def attempt(pipe: redis.client.Pipeline) -> tuple[JobRecord, bool]:
            if idem_key is not None:
                existing = _text(pipe.get(idem_key))
                if existing is not None:
                    mapping = json.loads(existing)
                    if mapping["spec_sha256"] != fingerprint:
                        raise Conflict(
                            f"Idempotency-Key {idempotency_key!r} was already used for a different job spec "
                            f"(job {mapping['job_id']}). Expected the same body as that request, or a new key. "
                            f"Received: a spec with sha256 {fingerprint[:12]}…"
                        )
                    raw = _text(pipe.hget(self.job_key(mapping["job_id"]), "record"))
                    if raw is not None:
                        return JobRecord.model_validate_json(raw), False
                    # The job it named is gone: the key is free again.
            pipe.multi()
            fields = {"record": record.model_dump_json()}
            if idempotency_key is not None:
                fields["idempotency_key"] = idempotency_key
            pipe.hset(self.job_key(record.id), mapping=fields)
            pipe.zadd(self.index_key(), {record.id: score})
            pipe.zadd(self.index_key(JobState.queued), {record.id: score})
            if idem_key is not None:
                pipe.set(idem_key, json.dumps({"job_id": record.id, "spec_sha256": fingerprint}), ex=IDEMPOTENCY_TTL_S)
            self._add_event(pipe, record.id, state_event(record))
            return record, True

        watched = [idem_key] if idem_key is not None else []
        return self._transaction(attempt, *watched)

    def get(self, job_id: str) -> JobRecord:
        """The record of one job; JobNotFound for unknown or malformed ids."""
        raw = _text(self.client.hget(self.job_key(check_job_id(job_id)), "record"))
        if raw is None:
            raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
        return JobRecord.model_validate_json(raw)

    def list(self, state: JobState | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobRecord], int]:
        """Jobs newest first (all, or in one state), paginated; returns (page, total)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0. Received: limit={limit}, offset={offset}")
        index = self.index_key(JobState(state) if state is not None else None)
        if limit == 0:
            return [], int(self.client.zcard(index))
        pipe = self.client.pipeline(transaction=False)
        pipe.zcard(index)
        pipe.zrange(index, offset, offset + limit - 1, desc=True)  # by rank: newest (highest score) first
        total, ids = pipe.execute()
        if not ids:
            return [], int(total)
        pipe = self.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(self.job_key(_text(job_id)), "record")
        records = [JobRecord.model_validate_json(_text(raw)) for raw in pipe.execute() if raw is not None]
        return records, int(total)

    def counts_by_state(self) -> dict[str, int]:
        """Number of jobs in each state (every state present, zeros included)."""
        pipe = self.client.pipeline(transaction=False)
        for state in JobState:
            pipe.zcard(self.index_key(state))
        return {state.value: int(count) for state, count in zip(JobState, pipe.execute(), strict=True)}

    def request_cancel(self, job_id: str) -> JobRecord:
        """Ask a job to stop. Idempotent.

        queued → cancelled at once (the worker skips it); running/retrying → cancelling (the training loop
        stops at the next batch boundary); cancelling/cancelled → unchanged. Conflict for succeeded/failed.
        """
        check_job_id(job_id)

        def change(record: JobRecord) -> JobRecord | None:
            if record.state in (JobState.succeeded, JobState.failed):
                raise Conflict(
                    f"Job {job_id} already finished. Expected a queued or running job to cancel. "
                    f"Received: state={record.state.value}"
                )
            if record.state in (JobState.cancelling, JobState.cancelled):
                return None
            if record.state == JobState.queued:
                return record.model_copy(update={"state": JobState.cancelled, "finished_at": _now(),
                                                 "stop_reason": "cancelled"})
            return record.model_copy(update={"state": JobState.cancelling})

        return self._update(job_id, change, cancel=True)

    def mark_dispatched(self, job_id: str) -> None:
        """Note that a message for this job reached the broker (the reaper then leaves a fresh queued job alone)."""
        self.client.hset(self.job_key(check_job_id(job_id)), "dispatched", str(_now().timestamp()))

    def needs_dispatch(self, job_id: str) -> bool:
        """True for a queued job whose message never reached the broker (a send that failed)."""
        raw, dispatched = self.client.hmget(self.job_key(check_job_id(job_id)), ["record", "dispatched"])
        if raw is None:
            raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
        return dispatched is None and JobRecord.model_validate_json(_text(raw)).state == JobState.queued

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested (one HGET; the worker polls it from a background thread)."""
        return _text(self.client.hget(self.job_key(check_job_id(job_id)), "cancel")) == "1"

    def read_events(self, job_id: str, last_event_id: str | None, block_ms: int) -> list[tuple[str, dict[str, Any]]]:
        """Events after `last_event_id` (None: from the first), waiting up to `block_ms` for new ones.

        block_ms <= 0 does not wait (Redis would read BLOCK 0 as "forever"). Returns [(event id, payload)],
        payload {"type": "epoch", ...EpochMetrics} or {"type": "state", "state": ..., ...}.
        """
        self.get(job_id)  # JobNotFound for unknown ids rather than an empty stream forever
        start = "0-0" if last_event_id is None else last_event_id
        if not EVENT_ID_PATTERN.match(start):
            raise DaeError(f"Last-Event-ID must look like '1712345678901-0'. Received: last_event_id={start[:64]!r}")
        reply = self.client.xread({self.events_key(job_id): start}, count=EVENTS_MAXLEN,
                                  block=block_ms if block_ms > 0 else None)
        events: list[tuple[str, dict[str, Any]]] = []
        for _stream, entries in reply or []:
            for event_id, fields in entries:
                data = fields.get(b"data", fields.get("data"))
                events.append((_text(event_id), json.loads(_text(data))))
        return events

    # -- worker side -----------------------------------------------------------------------------

    def mark_retrying(self, job_id: str) -> JobRecord:
        """A previous attempt was lost (worker killed while running): running → retrying."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.state != JobState.running:
                return None
            return record.model_copy(update={"state": JobState.retrying})

        return self._update(job_id, change)

    def mark_running(self, job_id: str, *, worker: str) -> JobRecord:
        """queued/retrying → running, attempts + 1, without a lease (tests and tools; workers use start_attempt)."""

        def change(record: JobRecord) -> JobRecord | None:
            if record.state not in (JobState.queued, JobState.retrying):
                return None
            return record.model_copy(update={
                "state": JobState.running,
                "attempts": record.attempts + 1,
                "started_at": record.started_at or _now(),
                "worker": worker,
            })

        return self._update(job_id, change)

    def start_attempt(self, job_id: str, lease: JobLease, *, max_lost_attempts: int) -> tuple[str, JobRecord]:
        """Take the job's lease and start an attempt, in one transaction; returns (outcome, record).

        Outcomes: ATTEMPT_STARTED (running, attempts + 1, the lease ours with the attempt number as its fencing
        token), ATTEMPT_BUSY (a live attempt holds the lease: leave the job to it), ATTEMPT_SKIPPED (finished),
        ATTEMPT_CANCELLED (a cancel was pending when its attempt was lost) or ATTEMPT_FAILED (the process died
        during `max_lost_attempts` attempts). A record still `running` without a lease means its attempt's process
        died: that counts as a lost attempt, and the record passes through `retrying`.
        """
        key, lease_key = self.job_key(check_job_id(job_id)), self.lease_key(job_id)

        def attempt(pipe: redis.client.Pipeline) -> tuple[str, JobRecord]:
            raw, exit_note = pipe.hmget(key, ["record", "exit"])
            if raw is None:
                raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
            current = JobRecord.model_validate_json(_text(raw))
            if current.state.is_terminal:
                return ATTEMPT_SKIPPED, current
            if pipe.exists(lease_key):
                return ATTEMPT_BUSY, current
            if current.state == JobState.cancelling:
                finished = _finished(current, JobState.cancelled, stop_reason="cancelled")
                self._stage(pipe, job_id, current, finished)
                return ATTEMPT_CANCELLED, finished
            lost = current.lost_attempts + (1 if current.state == JobState.running else 0)
            if lost >= max_lost_attempts:
                finished = _finished(current, JobState.failed, lost_attempts=lost,
                                     failure_reason=crash_loop_reason(lost, _text(exit_note)))
                self._stage(pipe, job_id, current, finished)
                return ATTEMPT_FAILED, finished
            lease.attempt = current.attempts + 1
            started = current.model_copy(update={
                "state": JobState.running,
                "attempts": lease.attempt,
                "lost_attempts": lost,
                "started_at": current.started_at or _now(),
                "worker": lease.owner,
            })
            via = current.model_copy(update={"state": JobState.retrying}) if current.state == JobState.running else None
            self._stage(pipe, job_id, current, started, via=via, fields={ATTEMPT_FIELD: str(lease.attempt)})
            pipe.set(lease_key, lease.value, px=lease.ttl_ms)
            return ATTEMPT_STARTED, started

        return self._transaction(attempt, key, lease_key)

    def hand_off(self, job_id: str, lease: JobLease, *, history: list[EpochMetrics] | None = None) -> JobRecord:
        """A graceful stop (the worker shuts down): running → retrying and the lease released, in one transaction.

        Not a lost attempt: the next attempt resumes from the checkpoint without counting a crash.
        """

        def change(record: JobRecord) -> JobRecord | None:
            update: dict[str, Any] = {"state": JobState.retrying}
            if history:
                update.update(history=history, progress=history[-1])
            return record.model_copy(update=update) if record.state == JobState.running else None

        return self._update(job_id, change, lease=lease, release=True)

    def record_epoch(self, job_id: str, metrics: EpochMetrics, *, lease: JobLease | None = None) -> JobRecord:
        """Store one finished epoch (progress + history) and append an "epoch" event (fenced by `lease` if given).

        An epoch number seen before (a resumed attempt repeating it) replaces the older entry and what follows.
        """

        if not all(math.isfinite(value) for value in (metrics.loss, metrics.val_loss or 0.0, metrics.learning_rate)):
            # JSON has no NaN; training reports a non-finite loss as a failure (mark_failed) instead.
            logger.warning("job %s: not recording epoch %d with non-finite metrics", job_id, metrics.epoch)
            return self.get(job_id)

        def change(record: JobRecord) -> JobRecord | None:
            history = [entry for entry in record.history if entry.epoch < metrics.epoch] + [metrics]
            return record.model_copy(update={"progress": metrics, "history": history})

        return self._update(job_id, change, event={"type": "epoch", **metrics.model_dump(mode="json")}, lease=lease)

    def mark_succeeded(self, job_id: str, *, model_id: str, history: list[EpochMetrics] | None = None,
                       stop_reason: str | None = None, resumed_from_epoch: int | None = None,
                       lease: JobLease | None = None) -> JobRecord:
        """Finish with a published model (from running, retrying or cancelling: the model exists)."""
        return self._finish(job_id, JobState.succeeded, lease, model_id=model_id, history=history,
                            stop_reason=stop_reason, resumed_from_epoch=resumed_from_epoch)

    def mark_failed(self, job_id: str, reason: str, *, resumed_from_epoch: int | None = None,
                    lease: JobLease | None = None) -> JobRecord:
        """Finish with a failure reason a user can act on."""
        return self._finish(job_id, JobState.failed, lease, failure_reason=reason, resumed_from_epoch=resumed_from_epoch)

    def mark_cancelled(self, job_id: str, *, history: list[EpochMetrics] | None = None,
                       resumed_from_epoch: int | None = None, lease: JobLease | None = None) -> JobRecord:
        """Finish after a cooperative cancel; progress keeps the epoch reached."""
        return self._finish(job_id, JobState.cancelled, lease, history=history, stop_reason="cancelled",
                            resumed_from_epoch=resumed_from_epoch)

    def set_resumed_from(self, job_id: str, epoch: int | None, *, lease: JobLease | None = None) -> JobRecord:
        """Note which checkpoint epoch the current attempt resumed from."""
        return self._update(job_id, lambda record: record.model_copy(update={"resumed_from_epoch": epoch}),
                            lease=lease)

    def lease(self, job_id: str, *, owner: str, ttl_s: float = DEFAULT_LEASE_TTL_S) -> JobLease:
        """A (not yet taken) lease for one attempt at a job; `owner` is "host:pid" of the process."""
        return JobLease(self, check_job_id(job_id), owner=owner, ttl_s=ttl_s)

    def lease_holder(self, job_id: str) -> str | None:
        """The value ("attempt|owner|token") of the current lease, if any."""
        return _text(self.client.get(self.lease_key(check_job_id(job_id))))

    def record_lost_process(self, job_id: str, *, owner: str, exit_note: str) -> bool:
        """The process `owner` ("host:pid") running this job died: note how, and free its lease at once.

        Called by the worker's main process when a pool child dies (WorkerLostError), so the requeued message can
        start the next attempt right away instead of waiting for the lease to expire. Returns whether a lease was
        freed; another attempt's lease is never touched.
        """
        key = self.job_key(check_job_id(job_id))
        return bool(self._free_lost_lease(keys=[key, self.lease_key(job_id)], args=[owner, exit_note]))

    def finish_abandoned_cancel(self, job_id: str) -> JobRecord | None:
        """cancelling → cancelled for a job that no attempt holds (its worker was lost while stopping).

        Returns the record, or None when an attempt holds the lease (it will finish the cancel itself).
        """
        key, lease_key = self.job_key(check_job_id(job_id)), self.lease_key(job_id)

        def attempt(pipe: redis.client.Pipeline) -> JobRecord | None:
            if pipe.exists(lease_key):
                return None
            current = self._read(pipe, job_id)
            if current.state != JobState.cancelling:
                return current
            finished = _finished(current, JobState.cancelled, stop_reason="cancelled")
            self._stage(pipe, job_id, current, finished)
            return finished

        return self._transaction(attempt, key, lease_key)

    def unfinished_job_ids(self) -> dict[JobState, list[str]]:
        """Ids of every job not yet finished, by state (the reaper's view)."""
        states = [state for state in JobState if not state.is_terminal]
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.zrange(self.index_key(state), 0, -1)
        return {state: [_text(job_id) for job_id in ids] for state, ids in zip(states, pipe.execute(), strict=True)}

    def liveness(self, job_ids: list[str]) -> list[tuple[JobRecord | None, float | None, bool]]:
        """For each id: (record or None, when its message was last dispatched (epoch s) or None, lease held?)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.job_key(job_id), ["record", "dispatched"])
            pipe.exists(self.lease_key(job_id))
        replies = pipe.execute()
        result = []
        for (raw, dispatched), leased in zip(replies[::2], replies[1::2], strict=True):
            record = JobRecord.model_validate_json(_text(raw)) if raw is not None else None
            result.append((record, float(_text(dispatched)) if dispatched is not None else None, bool(leased)))
        return result

    def take_turn(self, role: str, token: str, ttl_s: float) -> bool:
        """Hold the cluster-wide turn for `role` (e.g. "reaper"): True while `token` holds it, renewed by the call."""
        key = f"{self.prefix}{role}:turn"
        return bool(self._take_turn(keys=[key], args=[token, int(ttl_s * 1000)]))

    def prune_expired(self) -> int:
        """Drop index entries of finished jobs whose records expired (retention); returns how many."""
        cutoff = _now().timestamp() - self.retention_s
        removed = 0
        for state in (state for state in JobState if state.is_terminal):
            candidates = [_text(job_id) for job_id in self.client.zrangebyscore(self.index_key(state), "-inf", cutoff)]
            if not candidates:
                continue
            pipe = self.client.pipeline(transaction=False)
            for job_id in candidates:
                pipe.exists(self.job_key(job_id))
            gone = [job_id for job_id, exists in zip(candidates, pipe.execute(), strict=True) if not exists]
            if gone:
                pipe = self.client.pipeline(transaction=True)
                pipe.zrem(self.index_key(state), *gone)
                pipe.zrem(self.index_key(), *gone)
                pipe.execute()
                removed += len(gone)
        return removed

    # -- internals -------------------------------------------------------------------------------

    def _read(self, pipe: redis.client.Pipeline, job_id: str) -> JobRecord:
        raw = _text(pipe.hget(self.job_key(job_id), "record"))
        if raw is None:
            raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
        return JobRecord.model_validate_json(raw)

    def _finish(self, job_id: str, state: JobState, lease: JobLease | None, **fields: Any) -> JobRecord:
        def change(record: JobRecord) -> JobRecord | None:
            if record.state.is_terminal:
                if record.state == state:
                    return None
                raise Conflict(
                    f"Job {job_id} already finished. Expected a job that is still running. "
                    f"Received: state={record.state.value}, wanted {state.value}"
                )
            return _finished(record, state, **fields)

        return self._update(job_id, change, lease=lease, release=lease is not None)

    def _update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None], *,
                event: dict[str, Any] | None = None, cancel: bool = False, lease: JobLease | None = None,
                release: bool = False) -> JobRecord:
        """Atomically apply `change` to a record (WATCH/MULTI; retried if another writer got in between).

        `change` returns the new record, or None to leave it (and write nothing). State changes move the id
        between the state indexes and append a "state" event in the same transaction. With `lease`, the write
        happens only while that lease is the job's current one (LeaseLost otherwise): a stale attempt can never
        change a job another attempt owns. `release` also gives the lease back in the same transaction.
        """
        key = self.job_key(check_job_id(job_id))
        watched = [key] if lease is None else [key, self.lease_key(job_id)]

        def attempt(pipe: redis.client.Pipeline) -> JobRecord:
            if lease is not None and _text(pipe.get(self.lease_key(job_id))) != lease.value:
                raise LeaseLost(f"job {job_id}: attempt {lease.attempt} no longer holds the lease")
            current = self._read(pipe, job_id)
            updated = change(current)
            if updated is None and not cancel and not release:
                return current
            result = updated or current
            if result.state != current.state and result.state not in ALLOWED_TRANSITIONS[current.state]:
                raise Conflict(
                    f"Job {job_id} cannot go from {current.state.value} to {result.state.value}. Expected one of "
                    f"{sorted(s.value for s in ALLOWED_TRANSITIONS[current.state])}. Received: state={result.state.value}"
                )
            self._stage(pipe, job_id, current, result, event=event, fields={"cancel": "1"} if cancel else None)
            if release:
                pipe.delete(self.lease_key(job_id))
            return result

        return self._transaction(attempt, *watched)

    def _stage(self, pipe: redis.client.Pipeline, job_id: str, current: JobRecord, result: JobRecord, *,
               via: JobRecord | None = None, event: dict[str, Any] | None = None,
               fields: dict[str, str] | None = None) -> None:
        """Queue the writes of one record change on `pipe` (starting its MULTI): the record, the state indexes,
        the events (a "state" event per state passed, `via` first) and, once finished, the retention expiry."""
        pipe.multi()
        key = self.job_key(job_id)
        pipe.hset(key, mapping={"record": result.model_dump_json(), **(fields or {})})
        if event is not None:
            self._add_event(pipe, job_id, event)
        if result.state != current.state:
            score = current.created_at.timestamp()
            pipe.zrem(self.index_key(current.state), job_id)
            pipe.zadd(self.index_key(result.state), {job_id: score})
        if via is not None:
            self._add_event(pipe, job_id, state_event(via))
        if result.state != current.state or via is not None:
            self._add_event(pipe, job_id, state_event(result))
        if result.state.is_terminal:
            pipe.expire(key, int(self.retention_s))
            pipe.expire(self.events_key(job_id), int(self.retention_s))

    def _transaction(self, attempt: Callable[[redis.client.Pipeline], _T], *watched: str) -> _T:
        """Run `attempt` under WATCH on `watched` until its MULTI commits without interference."""
        with self.client.pipeline() as pipe:
            while True:
                try:
                    if watched:
                        pipe.watch(*watched)
                    result = attempt(pipe)
                    if pipe.explicit_transaction:
                        pipe.execute()
                    else:
                        pipe.reset()
                    return result
                except redis.WatchError:
                    continue

    def _add_event(self, pipe: redis.client.Pipeline, job_id: str, payload: dict[str, Any]) -> None:
        pipe.xadd(self.events_key(job_id), {"data": json.dumps(payload)}, maxlen=EVENTS_MAXLEN, approximate=True)


def state_event(record: JobRecord) -> dict[str, Any]:
    """The payload of a "state" event: what a live client needs without reading the record."""
    return {
        "type": "state",
        "state": record.state.value,
        "attempts": record.attempts,
        "epoch": record.progress.epoch if record.progress else 0,
        "model_id": record.model_id,
        "failure_reason": record.failure_reason,
        "stop_reason": record.stop_reason,
    }


def _finished(record: JobRecord, state: JobState, **fields: Any) -> JobRecord:
    """`record` in the final `state` with `fields` (None values ignored); the history's last epoch is the progress."""
    update = {key: value for key, value in fields.items() if value is not None}
    update["state"] = state
    update["finished_at"] = _now()
    if update.get("history"):
        update["progress"] = update["history"][-1]
    return record.model_copy(update=update)


def crash_loop_reason(lost_attempts: int, exit_note: str | None) -> str:
    """The failure reason of a job whose worker process died during `lost_attempts` attempts."""
    if exit_note:
        how = f"last {exit_note}"
        if "SIGKILL" in exit_note:
            how += ", possibly out of memory"
    else:
        how = "the whole worker was lost each time (host or container gone)"
    return (
        f"The worker process died during {lost_attempts} attempts; {how}. Expected the job to fit in a worker's "
        "memory: lower batch_size, max_train_images or the model's size, then submit it again."
    )


# Renew: our lease (compare-and-pexpire), or take it back after it expired during a Redis outage, but only while
# no newer attempt has started (the job's attempt field still names ours). 1 renewed, 0 lost.
_RENEW_LEASE_LUA = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not current and redis.call('hget', KEYS[2], ARGV[3]) == ARGV[4] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
_TAKE_TURN_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
_RELEASE_LEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: job hash, lease; ARGV: owner ("host:pid"), exit note. Frees the lease only if that process held it.
_FREE_LOST_LEASE_LUA = """
redis.call('hset', KEYS[1], 'exit', ARGV[2])
local current = redis.call('get', KEYS[2])
if current and string.find(current, '|' .. ARGV[1] .. '|', 1, true) then
    return redis.call('del', KEYS[2])
end
return 0
"""


class JobLease:
    """One attempt's lease on its job: "attempt|owner|token" under SET NX PX, taken by JobStore.start_attempt.

    The attempt number is the fencing token: writes fenced with this lease (JobStore._update) succeed only while
    it is the job's current lease. `renew()` extends it; the holder renews every few seconds (worker/attempt.py).
    """

    def __init__(self, jobs: JobStore, job_id: str, *, owner: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"Expected a positive lease lifetime. Received: ttl_s={ttl_s}")
        if "|" in owner:
            raise ValueError(f"Expected an owner without '|'. Received: owner={owner!r}")
        self.jobs = jobs
        self.job_id = job_id
        self.owner = owner
        self.key = jobs.lease_key(job_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.attempt = 0
        self.token = secrets.token_hex(8)

    @property
    def value(self) -> str:
        """What the lease key holds while this lease is current."""
        return f"{self.attempt}|{self.owner}|{self.token}"

    def renew(self) -> bool:
        """Extend the lease (or take it back after it expired, if no newer attempt started); False once lost."""
        keys = [self.key, self.jobs.job_key(self.job_id)]
        return bool(self.jobs._renew_lease(keys=keys, args=[self.value, self.ttl_ms, ATTEMPT_FIELD, self.attempt]))

    def release(self) -> bool:
        """Give the lease back if it is still ours (never deletes another attempt's lease)."""
        return bool(self.jobs._release_lease(keys=[self.key], args=[self.value]))
