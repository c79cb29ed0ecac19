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

import copy
import json
import logging
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Self, TypeVar, overload

import redis
from redis.typing import EncodableT

from core.leases import (
    FREE_LOST_LEASE_LUA,
    RELEASE_LEASE_LUA,
    RENEW_LEASE_LUA,
    TAKE_TURN_LUA,
    JobLease,
    LeaseLost,
)
from dae.errors import Conflict, DaeError, JobNotFound
from dae.fingerprints import spec_fingerprint
from dae.spec import DEFAULT_OWNER, JobRecord, JobState, TrainingSpec, check_owner

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "dae:"
JOB_ID_PATTERN = re.compile(r"^j_[0-9a-f]{16}$")
EVENT_ID_PATTERN = re.compile(r"^\d{1,20}(-\d{1,20})?$")
IDEMPOTENCY_KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,200}$")
#: How long an idempotency key maps to its job (a retried POST within a day gets the same job).
IDEMPOTENCY_TTL_S = 24 * 3600
#: Approximate bound of each job's event stream: one event per epoch (MAX_EPOCHS = 1000) plus state events.
EVENTS_MAXLEN = 2000

#: Finished jobs' records and event streams expire after this many days.
DEFAULT_RETENTION_DAYS = 30.0

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
#: (event id, payload) pairs of a job's event stream, oldest first.
Events = list[tuple[str, dict[str, Any]]]


#: Replies of a Redis that refuses writes that redis-py has no class for; inside a pipeline after "caused error: ".
_REFUSAL_REPLY = re.compile(r"(?:^|caused error: )(MISCONF|NOREPLICAS|MASTERDOWN) ")


def is_redis_outage(error: BaseException) -> bool:
    """True when Redis is unreachable, still loading, timed out or refusing writes (retry later), False for a bug."""
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):  # includes BusyLoadingError
        return True
    if isinstance(error, redis.OutOfMemoryError | redis.ReadOnlyError):
        return True
    return isinstance(error, redis.ResponseError) and _REFUSAL_REPLY.search(str(error)) is not None


def new_job_id() -> str:
    """A fresh job id: "j_" + 16 hex characters."""
    return "j_" + secrets.token_hex(8)


def check_job_id(job_id: str) -> str:
    """Return the id if well-formed; raise JobNotFound otherwise (malformed ids never reach Redis keys)."""
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise JobNotFound(f"No job with this id. Expected an id like 'j_' + 16 hex digits. Received: job_id={job_id!r}")
    return job_id


def utc_now() -> datetime:
    return datetime.now(UTC)


@overload
def decoded(value: bytes | str) -> str: ...
@overload
def decoded(value: None) -> None: ...
def decoded(value: bytes | str | None) -> str | None:
    """Redis replies are bytes unless the client decodes; accept both."""
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


class JobStore:
    """Job records, state indexes, idempotency keys, progress events and locks in one Redis."""

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX,
                 retention_s: float = DEFAULT_RETENTION_DAYS * 86400, owner: str = DEFAULT_OWNER,
                 every_owner: bool = False) -> None:
        if retention_s < 1:
            raise ValueError(f"Expected a retention of at least a second. Received: retention_s={retention_s}")
        self.client = client
        self.prefix = prefix
        self.retention_s = retention_s
        self.owner = check_owner(owner)
        self.every_owner = every_owner
        self._renew_lease = client.register_script(RENEW_LEASE_LUA)
        self._release_lease = client.register_script(RELEASE_LEASE_LUA)
        self._free_lost_lease = client.register_script(FREE_LOST_LEASE_LUA)
        self._take_turn = client.register_script(TAKE_TURN_LUA)

    def with_owner(self, owner: str, *, every_owner: bool = False) -> Self:
        """The same store as `owner` sees it: its jobs only (every owner's with `every_owner`), its idempotency keys.
        Shares the client and the scripts (cheap)."""
        view = copy.copy(self)
        view.owner, view.every_owner = check_owner(owner), every_owner
        return view

    def _visible(self, record: JobRecord) -> bool:
        return self.every_owner or record.owner == self.owner

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

    def index_key(self, state: JobState | None = None, owner: str | None = None) -> str:
        """Sorted set of all jobs (state None) or of the jobs in one state: of every owner, or of `owner`."""
        scope = f"{self.prefix}owner:{owner}:" if owner is not None else self.prefix
        return f"{scope}jobs:all" if state is None else f"{scope}jobs:state:{state.value}"

    def owners_key(self) -> str:
        """Set of every owner that ever created a job (to prune their indexes)."""
        return f"{self.prefix}owners"

    def idempotency_key(self, key: str) -> str:
        """Where this owner's idempotency key maps to its job (owners never contain ':', so keys cannot collide)."""
        return f"{self.prefix}idem:{self.owner}:{key}"

    def legacy_idempotency_key(self, key: str) -> str:
        """Where a key lived before owners existed (the default owner's; they expire within IDEMPOTENCY_TTL_S)."""
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
        now = utc_now()
        record = JobRecord(id=new_job_id(), owner=self.owner, state=JobState.queued, spec=spec, created_at=now)
        score = now.timestamp()
        idem_key = self.idempotency_key(idempotency_key) if idempotency_key is not None else None
        legacy_key = (self.legacy_idempotency_key(idempotency_key)
                      if idempotency_key is not None and self.owner == DEFAULT_OWNER else None)

        def attempt(pipe: redis.client.Pipeline) -> tuple[JobRecord, bool]:
            if idem_key is not None:
                existing = decoded(pipe.get(idem_key))
                if existing is None and legacy_key is not None:
                    existing = decoded(pipe.get(legacy_key))
                if existing is not None:
                    mapping = json.loads(existing)
                    if mapping["spec_sha256"] != fingerprint:
                        raise Conflict(
                            f"Idempotency-Key {idempotency_key!r} was already used for a different job spec "
                            f"(job {mapping['job_id']}). Expected the same body as that request, or a new key. "
                            f"Received: a spec with sha256 {fingerprint[:12]}…"
                        )
                    raw = decoded(pipe.hget(self.job_key(mapping["job_id"]), "record"))
                    if raw is not None and self._visible(previous := JobRecord.model_validate_json(raw)):
                        return previous, False
                    # The job it named is gone: the key is free again.
            pipe.multi()
            fields: dict[EncodableT, EncodableT] = {"record": record.model_dump_json()}
            if idempotency_key is not None:
                fields["idempotency_key"] = idempotency_key
            pipe.hset(self.job_key(record.id), mapping=fields)
            for owner in (None, record.owner):
                pipe.zadd(self.index_key(owner=owner), {record.id: score})
                pipe.zadd(self.index_key(JobState.queued, owner), {record.id: score})
            pipe.sadd(self.owners_key(), record.owner)
            if idem_key is not None:
                pipe.set(idem_key, json.dumps({"job_id": record.id, "spec_sha256": fingerprint}), ex=IDEMPOTENCY_TTL_S)
            self._add_event(pipe, record.id, state_event(record))
            return record, True

        watched = [key for key in (idem_key, legacy_key) if key is not None]
        return self._transaction(attempt, *watched)

    def get(self, job_id: str) -> JobRecord:
        """The record of one job; JobNotFound for unknown or malformed ids."""
        raw = decoded(self.client.hget(self.job_key(check_job_id(job_id)), "record"))
        record = JobRecord.model_validate_json(raw) if raw is not None else None
        if record is None or not self._visible(record):  # another owner's job does not exist for this view
            raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
        return record

    def list(self, state: JobState | None = None, limit: int = 50, offset: int = 0) -> tuple[list[JobRecord], int]:
        """Jobs newest first (all, or in one state), paginated; returns (page, total)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"limit and offset must be >= 0. Received: limit={limit}, offset={offset}")
        index = self.index_key(JobState(state) if state is not None else None,
                               None if self.every_owner else self.owner)
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
            pipe.hget(self.job_key(decoded(job_id)), "record")
        records = [JobRecord.model_validate_json(decoded(raw)) for raw in pipe.execute() if raw is not None]
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
        self.get(job_id)  # JobNotFound for another owner's job

        def change(record: JobRecord) -> JobRecord | None:
            if record.state in (JobState.succeeded, JobState.failed):
                raise Conflict(
                    f"Job {job_id} already finished. Expected a queued or running job to cancel. "
                    f"Received: state={record.state.value}"
                )
            if record.state in (JobState.cancelling, JobState.cancelled):
                return None
            if record.state == JobState.queued:
                return record.model_copy(update={"state": JobState.cancelled, "finished_at": utc_now(),
                                                 "stop_reason": "cancelled"})
            return record.model_copy(update={"state": JobState.cancelling})

        return self._update(job_id, change, cancel=True)

    def mark_dispatched(self, job_id: str) -> None:
        """Note that a message for this job reached the broker (the reaper then leaves a fresh queued job alone)."""
        self.client.hset(self.job_key(check_job_id(job_id)), "dispatched", str(utc_now().timestamp()))

    def needs_dispatch(self, job_id: str) -> bool:
        """True for a queued job whose message never reached the broker (a send that failed)."""
        raw, dispatched = self.client.hmget(self.job_key(check_job_id(job_id)), ["record", "dispatched"])
        if raw is None:
            raise JobNotFound(f"No job with this id. Received: job_id={job_id!r}")
        return dispatched is None and JobRecord.model_validate_json(decoded(raw)).state == JobState.queued

    def is_cancel_requested(self, job_id: str) -> bool:
        """Whether a cancel was requested (one HGET; the worker polls it from a background thread)."""
        return decoded(self.client.hget(self.job_key(check_job_id(job_id)), "cancel")) == "1"

    def read_events(self, job_id: str, last_event_id: str | None, block_ms: int) -> Events:
        """Events after `last_event_id` (None: from the first), waiting up to `block_ms` for new ones.

        block_ms <= 0 does not wait (Redis would read BLOCK 0 as "forever"). Returns [(event id, payload)],
        payload {"type": "epoch", ...EpochMetrics} or {"type": "state", "state": ..., ...}.
        """
        self.get(job_id)  # JobNotFound for unknown ids rather than an empty stream forever
        start = "0-0" if last_event_id is None else last_event_id
        if not EVENT_ID_PATTERN.match(start):
            raise DaeError(f"Last-Event-ID must look like '1712345678901-0'. Received: last_event_id={start[:64]!r}")
        reply: Any = self.client.xread({self.events_key(job_id): start}, count=EVENTS_MAXLEN,
                                       block=block_ms if block_ms > 0 else None)  # [[stream, [(id, fields)]]]
        events: Events = []
        for _stream, entries in reply or []:
            for event_id, fields in entries:
                data = fields.get(b"data", fields.get("data"))
                events.append((decoded(event_id), json.loads(decoded(data))))
        return events

    def mark_failed(self, job_id: str, reason: str, *, resumed_from_epoch: int | None = None,
                    lease: JobLease | None = None) -> JobRecord:
        """Finish with a failure reason a user can act on."""
        return self._finish(job_id, JobState.failed, lease, failure_reason=reason, resumed_from_epoch=resumed_from_epoch)

    def _read(self, pipe: redis.client.Pipeline, job_id: str) -> JobRecord:
        raw = decoded(pipe.hget(self.job_key(job_id), "record"))
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
            return finished_record(record, state, **fields)

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
            if lease is not None and decoded(pipe.get(self.lease_key(job_id))) != lease.value:
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
               fields: dict[EncodableT, EncodableT] | None = None) -> None:
        """Queue the writes of one record change on `pipe` (starting its MULTI): the record, the state indexes,
        the events (a "state" event per state passed, `via` first) and, once finished, the retention expiry."""
        pipe.multi()
        key = self.job_key(job_id)
        pipe.hset(key, mapping={"record": result.model_dump_json(), **(fields or {})})
        if event is not None:
            self._add_event(pipe, job_id, event)
        if result.state != current.state:
            score = current.created_at.timestamp()
            for owner in (None, result.owner):
                pipe.zrem(self.index_key(current.state, owner), job_id)
                pipe.zadd(self.index_key(result.state, owner), {job_id: score})
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
                        pipe.watch(*watched)  # type: ignore[no-untyped-call]  # redis-py leaves watch() unannotated
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


def finished_record(record: JobRecord, state: JobState, **fields: Any) -> JobRecord:
    """`record` in the final `state` with `fields` (None values ignored); the history's last epoch is the progress."""
    update = {key: value for key, value in fields.items() if value is not None}
    update["state"] = state
    update["finished_at"] = utc_now()
    if update.get("history"):
        update["progress"] = update["history"][-1]
    return record.model_copy(update=update)
