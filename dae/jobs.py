"""Job records, progress events and per-job locks in Redis; shared by the gateway and the worker.

TensorFlow-free and synchronous (redis-py). Layout under the key prefix (default ``dae:``):

- ``{p}job:{id}``             hash: ``record`` (JobRecord JSON), ``cancel`` ("1" once a cancel was requested),
                              ``idempotency_key``.
- ``{p}job:{id}:events``      stream of progress/state events (``data`` = JSON), trimmed to ~EVENTS_MAXLEN.
- ``{p}job:{id}:lock``        the per-job run lock (owner token, PX TTL).
- ``{p}jobs:all``             sorted set of every job id, score = creation time (epoch seconds).
- ``{p}jobs:state:{state}``   one sorted set per state, same score: listing and counting never scan keys.
- ``{p}idempotency:{key}``    JSON ``{"job_id", "spec_sha256"}`` with a TTL.

Every change of a record is a read-modify-write under WATCH/MULTI on the job hash, so the gateway's cancel
and the worker's transitions cannot overwrite each other: one of two racing writers retries on fresh data.
The state indexes and the "state" event are written in the same MULTI as the record, so a reader never sees
a record whose index or event stream disagrees with it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

#: Per-job lock: lifetime of one lease and how often the holder renews it.
DEFAULT_LOCK_TTL_S = 30.0
DEFAULT_LOCK_REFRESH_S = 10.0

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

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._refresh_lock = client.register_script(_REFRESH_LOCK_LUA)
        self._release_lock = client.register_script(_RELEASE_LOCK_LUA)

    # -- key names -------------------------------------------------------------------------------

    def job_key(self, job_id: str) -> str:
        """Hash holding the record of one job."""
        return f"{self.prefix}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        """Stream of one job's events."""
        return f"{self.prefix}job:{job_id}:events"

    def lock_key(self, job_id: str) -> str:
        """The per-job run lock."""
        return f"{self.prefix}job:{job_id}:lock"

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
        """Start an attempt: queued/retrying → running, attempts + 1. Returns the record unchanged otherwise.

        The caller holds the job lock; a record that is cancelled, cancelling or finished is returned as is.
        """

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

    def record_epoch(self, job_id: str, metrics: EpochMetrics) -> JobRecord:
        """Store one finished epoch (progress + history) and append an "epoch" event.

        An epoch number seen before (a resumed attempt repeating it) replaces the older entry and what follows.
        """

        if not all(math.isfinite(value) for value in (metrics.loss, metrics.val_loss or 0.0, metrics.learning_rate)):
            # JSON has no NaN; training reports a non-finite loss as a failure (mark_failed) instead.
            logger.warning("job %s: not recording epoch %d with non-finite metrics", job_id, metrics.epoch)
            return self.get(job_id)

        def change(record: JobRecord) -> JobRecord | None:
            history = [entry for entry in record.history if entry.epoch < metrics.epoch] + [metrics]
            return record.model_copy(update={"progress": metrics, "history": history})

        return self._update(job_id, change, event={"type": "epoch", **metrics.model_dump(mode="json")})

    def mark_succeeded(self, job_id: str, *, model_id: str, history: list[EpochMetrics] | None = None,
                       stop_reason: str | None = None, resumed_from_epoch: int | None = None) -> JobRecord:
        """Finish with a published model (from running, retrying or cancelling: the model exists)."""
        return self._finish(job_id, JobState.succeeded, model_id=model_id, history=history,
                            stop_reason=stop_reason, resumed_from_epoch=resumed_from_epoch)

    def mark_failed(self, job_id: str, reason: str, *, resumed_from_epoch: int | None = None) -> JobRecord:
        """Finish with a failure reason a user can act on."""
        return self._finish(job_id, JobState.failed, failure_reason=reason, resumed_from_epoch=resumed_from_epoch)

    def mark_cancelled(self, job_id: str, *, history: list[EpochMetrics] | None = None,
                       resumed_from_epoch: int | None = None) -> JobRecord:
        """Finish after a cooperative cancel; progress keeps the epoch reached (its checkpoint is kept)."""
        return self._finish(job_id, JobState.cancelled, history=history, stop_reason="cancelled",
                            resumed_from_epoch=resumed_from_epoch)

    def set_resumed_from(self, job_id: str, epoch: int | None) -> JobRecord:
        """Note which checkpoint epoch the current attempt resumed from."""
        return self._update(job_id, lambda record: record.model_copy(update={"resumed_from_epoch": epoch}))

    def lock(self, job_id: str, *, ttl_s: float = DEFAULT_LOCK_TTL_S,
             refresh_s: float = DEFAULT_LOCK_REFRESH_S) -> JobLock:
        """A (not yet acquired) run lock for one job."""
        return JobLock(self, check_job_id(job_id), ttl_s=ttl_s, refresh_s=refresh_s)

    def lock_owner(self, job_id: str) -> str | None:
        """The token of the current lock holder, if any."""
        return _text(self.client.get(self.lock_key(check_job_id(job_id))))

    # -- internals -------------------------------------------------------------------------------

    def _finish(self, job_id: str, state: JobState, **fields: Any) -> JobRecord:
        def change(record: JobRecord) -> JobRecord | None:
            if record.state.is_terminal:
                if record.state == state:
                    return None
                raise Conflict(
                    f"Job {job_id} already finished. Expected a job that is still running. "
                    f"Received: state={record.state.value}, wanted {state.value}"
                )
            update = {key: value for key, value in fields.items() if value is not None}
            update["state"] = state
            update["finished_at"] = _now()
            if "history" in update and update["history"]:
                update["progress"] = update["history"][-1]
            return record.model_copy(update=update)

        return self._update(job_id, change)

    def _update(self, job_id: str, change: Callable[[JobRecord], JobRecord | None], *,
                event: dict[str, Any] | None = None, cancel: bool = False) -> JobRecord:
        """Atomically apply `change` to a record (WATCH/MULTI; retried if another writer got in between).

        `change` returns the new record, or None to leave it (and write nothing). State changes move the id
        between the state indexes and append a "state" event in the same transaction.
        """
        key = self.job_key(check_job_id(job_id))

        def attempt(pipe: redis.client.Pipeline) -> JobRecord:
            raw = _text(pipe.hget(key, "record"))
            if raw is None:
                raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
            current = JobRecord.model_validate_json(raw)
            updated = change(current)
            if updated is None and not cancel:
                return current
            result = updated or current
            if result.state != current.state and result.state not in ALLOWED_TRANSITIONS[current.state]:
                raise Conflict(
                    f"Job {job_id} cannot go from {current.state.value} to {result.state.value}. Expected one of "
                    f"{sorted(s.value for s in ALLOWED_TRANSITIONS[current.state])}. Received: state={result.state.value}"
                )
            pipe.multi()
            fields = {"record": result.model_dump_json()}
            if cancel:
                fields["cancel"] = "1"
            pipe.hset(key, mapping=fields)
            if event is not None:
                self._add_event(pipe, job_id, event)
            if result.state != current.state:
                score = current.created_at.timestamp()
                pipe.zrem(self.index_key(current.state), job_id)
                pipe.zadd(self.index_key(result.state), {job_id: score})
                self._add_event(pipe, job_id, state_event(result))
            return result

        return self._transaction(attempt, key)

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


# Compare-and-renew / compare-and-delete: only the holder's token may extend or release the lock.
_REFRESH_LOCK_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE_LOCK_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


class JobLock:
    """A per-job lease: SET NX PX with an owner token, renewed by a background thread while held.

    If a renewal finds the lease gone or taken (the holder stalled longer than the TTL), `lost` is set so
    the training loop can stop: it must not publish a model another worker may be producing.
    """

    def __init__(self, jobs: JobStore, job_id: str, *, ttl_s: float, refresh_s: float) -> None:
        if not 0 < refresh_s < ttl_s:
            raise ValueError(f"The lock must be renewed before it expires. Expected 0 < refresh_s < ttl_s. "
                             f"Received: refresh_s={refresh_s}, ttl_s={ttl_s}")
        self.jobs = jobs
        self.job_id = job_id
        self.key = jobs.lock_key(job_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.refresh_s = refresh_s
        self.token = secrets.token_hex(16)
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; does not wait."""
        return bool(self.jobs.client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def refresh(self) -> bool:
        """Renew the lease; False if it is no longer ours."""
        return bool(self.jobs._refresh_lock(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lock back if it is still ours (never deletes another holder's lock)."""
        self.stop_refreshing()
        return bool(self.jobs._release_lock(keys=[self.key], args=[self.token]))

    def start_refreshing(self) -> None:
        """Renew every `refresh_s` seconds in a daemon thread."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"lock-{self.job_id}", daemon=True)
        self._thread.start()

    def stop_refreshing(self) -> None:
        """Stop the renewal thread (the lease stays until released or expired)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None

    @contextmanager
    def held(self) -> Iterator[JobLock]:
        """Renew while the block runs, release at the end. The lock must already be acquired."""
        self.start_refreshing()
        try:
            yield self
        finally:
            self.release()

    def _run(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                if not self.refresh():
                    logger.error("lost the lock of job %s (lease expired or taken over)", self.job_id)
                    self.lost.set()
                    return
            except redis.RedisError:
                # A blip: the next tick tries again; the lease survives until its TTL.
                logger.warning("could not renew the lock of job %s", self.job_id, exc_info=True)

