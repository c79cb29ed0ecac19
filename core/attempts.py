"""What workers and their reaper do to job records: start an attempt under a lease, record its epochs, finish
it, hand it off, and find and settle attempts whose process was lost. The gateway needs none of it (core.jobs)."""

from __future__ import annotations

import logging
import math
from typing import Any, cast

import redis

from core.jobs import JobStore, check_job_id, decoded, finished_record, utc_now
from core.leases import ATTEMPT_FIELD, DEFAULT_LEASE_TTL_S, JobLease
from dae.errors import JobNotFound
from dae.spec import EpochMetrics, JobRecord, JobState

logger = logging.getLogger(__name__)

#: Outcomes of AttemptStore.start_attempt.
ATTEMPT_STARTED, ATTEMPT_BUSY, ATTEMPT_SKIPPED = "started", "busy", "skipped"
ATTEMPT_CANCELLED, ATTEMPT_FAILED = "cancelled", "failed"


class AttemptStore(JobStore):
    """A JobStore with the transitions only workers make (every one fenced by the attempt's lease when given)."""

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
                "started_at": record.started_at or utc_now(),
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
            current = JobRecord.model_validate_json(decoded(raw))
            if current.state.is_terminal:
                return ATTEMPT_SKIPPED, current
            if pipe.exists(lease_key):
                return ATTEMPT_BUSY, current
            if current.state == JobState.cancelling:
                finished = finished_record(current, JobState.cancelled, stop_reason="cancelled")
                self._stage(pipe, job_id, current, finished)
                return ATTEMPT_CANCELLED, finished
            lost = current.lost_attempts + (1 if current.state == JobState.running else 0)
            if lost >= max_lost_attempts:
                finished = finished_record(current, JobState.failed, lost_attempts=lost,
                                     failure_reason=crash_loop_reason(lost, decoded(exit_note)))
                self._stage(pipe, job_id, current, finished)
                return ATTEMPT_FAILED, finished
            lease.attempt = current.attempts + 1
            started = current.model_copy(update={
                "state": JobState.running,
                "attempts": lease.attempt,
                "lost_attempts": lost,
                "started_at": current.started_at or utc_now(),
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
        return decoded(self.client.get(self.lease_key(check_job_id(job_id))))

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
            finished = finished_record(current, JobState.cancelled, stop_reason="cancelled")
            self._stage(pipe, job_id, current, finished)
            return finished

        return self._transaction(attempt, key, lease_key)

    def unfinished_job_ids(self) -> dict[JobState, list[str]]:
        """Ids of every job not yet finished, by state (the reaper's view)."""
        states = [state for state in JobState if not state.is_terminal]
        pipe = self.client.pipeline(transaction=False)
        for state in states:
            pipe.zrange(self.index_key(state), 0, -1)
        return {state: [decoded(job_id) for job_id in ids] for state, ids in zip(states, pipe.execute(), strict=True)}

    def liveness(self, job_ids: list[str]) -> list[tuple[JobRecord | None, float | None, bool]]:
        """For each id: (record or None, when its message was last dispatched (epoch s) or None, lease held?)."""
        pipe = self.client.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(self.job_key(job_id), ["record", "dispatched"])
            pipe.exists(self.lease_key(job_id))
        replies = pipe.execute()
        result = []
        for (raw, dispatched), leased in zip(replies[::2], replies[1::2], strict=True):
            record = JobRecord.model_validate_json(decoded(raw)) if raw is not None else None
            result.append((record, float(decoded(dispatched)) if dispatched is not None else None, bool(leased)))
        return result

    def take_turn(self, role: str, token: str, ttl_s: float) -> bool:
        """Hold the cluster-wide turn for `role` (e.g. "reaper"): True while `token` holds it, renewed by the call."""
        key = f"{self.prefix}{role}:turn"
        return bool(self._take_turn(keys=[key], args=[token, int(ttl_s * 1000)]))

    def prune_expired(self) -> int:
        """Drop index entries of finished jobs whose records expired (retention), from the indexes of every owner
        and of each owner; returns how many jobs went."""
        cutoff = utc_now().timestamp() - self.retention_s
        owners: list[str | None] = [None, *sorted(decoded(owner) for owner in self.client.smembers(self.owners_key()))]
        removed = 0
        for owner in owners:
            for state in (state for state in JobState if state.is_terminal):
                gone = self._expired_ids(self.index_key(state, owner), cutoff)
                if gone:
                    pipe = self.client.pipeline(transaction=True)
                    pipe.zrem(self.index_key(state, owner), *gone)
                    pipe.zrem(self.index_key(owner=owner), *gone)
                    pipe.execute()
                    removed += len(gone) if owner is None else 0
        return removed

    def _expired_ids(self, index: str, cutoff: float) -> list[str]:
        """Ids in `index` created before `cutoff` whose record no longer exists."""
        # redis-py types replies as "Any or an awaitable": this client is synchronous.
        expired = cast("list[bytes | str]", self.client.zrangebyscore(index, "-inf", cutoff))
        candidates = [decoded(job_id) for job_id in expired]
        if not candidates:
            return []
        pipe = self.client.pipeline(transaction=False)
        for job_id in candidates:
            pipe.exists(self.job_key(job_id))
        return [job_id for job_id, exists in zip(candidates, pipe.execute(), strict=True) if not exists]

    # -- internals -------------------------------------------------------------------------------


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


