"""The reaper: brings back every unfinished job that no live attempt owns and no message will start.

It runs inside the workers (a thread of each worker's main process), one at a time cluster-wide (a short Redis
"turn" key), every DAE_REAPER_INTERVAL_S seconds. Recovery never waits for the broker's visibility timeout:

- `running`/`retrying` without a lease (its worker was lost, or the graceful hand-off's message never arrived)
  and without a message waiting in the queue → a new message. The next attempt counts the loss and resumes
  from the furthest checkpoint (worker/tasks.py).
- `cancelling` without a lease (the worker was lost while stopping) → `cancelled`, its checkpoints removed.
- `queued` for longer than DAE_REQUEUE_QUEUED_AFTER_S since its last send, with no message in the queue and no
  delivery that recent (the send was refused, the gateway died between the record and the send, or Redis lost
  its last second of AOF) → a new message.

A job must look abandoned in two sweeps in a row before anything is done, so an attempt that is starting (its
message taken, its lease not yet written) or a lease taken back right after a Redis restart is never raced.
Duplicate messages stay harmless: the task drops a message whose job a live attempt holds.
The same sweep drops index entries of finished jobs whose records expired (DAE_JOB_RETENTION_DAYS).

Messages are found by reading the Redis transport's queue list and unacked index (kombu's documented
`unacked_key`/`unacked_index_key` options, set explicitly in worker/celery_app.py) and Celery's message
protocol 2 (the body is `[args, kwargs, embed]`).
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from core.attempts import AttemptStore
from core.checkpoints import CheckpointStore
from core.jobs import is_redis_outage
from core.queue import TRAIN_QUEUE, TRAIN_TASK_NAME, enqueue_training
from core.store import ModelStore
from dae.spec import JobState

logger = logging.getLogger(__name__)

#: kombu's Redis transport keys (its defaults, passed explicitly in worker/celery_app.py so both sides agree).
UNACKED_KEY, UNACKED_INDEX_KEY = "unacked", "unacked_index"
#: kombu's separator and default priority steps: a queue's messages live in "<queue>" and "<queue>\x06\x16<p>".
_PRIORITY_SEPARATOR, _PRIORITY_STEPS = "\x06\x16", (3, 6, 9)


@dataclass
class SweepReport:
    """What one sweep did (logged, and returned to tests)."""

    requeued: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    suspected: list[str] = field(default_factory=list)
    pruned: int = 0


def _job_id_of(raw_message: bytes | str | dict[str, Any]) -> str | None:
    """The job id of a `dae.train` message as the Redis transport stores it (None for anything else)."""
    try:
        message = raw_message if isinstance(raw_message, dict) else json.loads(raw_message)
        if message.get("headers", {}).get("task") != TRAIN_TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


class Reaper:
    """One sweep at a time over the unfinished jobs; `run()` loops until stopped."""

    def __init__(self, jobs: AttemptStore, producer: Any, store: ModelStore, *, interval_s: float,
                 requeue_queued_after_s: float, queue: str = TRAIN_QUEUE) -> None:
        self.jobs, self.producer, self.store = jobs, producer, store
        self.interval_s = interval_s
        self.requeue_queued_after_s = requeue_queued_after_s
        self.queue = queue
        self.token = secrets.token_hex(8)
        self._suspects: set[str] = set()

    def run(self, stop: threading.Event) -> None:
        """Sweep every interval until `stop` is set; Redis outages and bugs are logged, never fatal."""
        outage = False
        while not stop.wait(self.interval_s):
            try:
                report = self.sweep()
            except Exception as error:
                self._suspects.clear()  # what was seen before the outage may be stale
                if not is_redis_outage(error):
                    logger.exception("reaper: sweep failed")
                elif not outage:
                    logger.warning("reaper: Redis unavailable (%s); sweeping again every %.0f s", error, self.interval_s)
                outage = outage or is_redis_outage(error)
                continue
            if outage:
                logger.info("reaper: Redis is back")
                outage = False
            if report is not None and (report.requeued or report.cancelled or report.pruned):
                logger.warning("reaper: requeued %s, cancelled %s, pruned %d expired index entries",
                               report.requeued, report.cancelled, report.pruned)

    def sweep(self) -> SweepReport | None:
        """One pass; None when another worker's reaper has the turn."""
        if not self.jobs.take_turn("reaper", self.token, ttl_s=self.interval_s * 3):
            self._suspects.clear()
            return None
        report = SweepReport()
        now = time.time()
        waiting = self._waiting_job_ids()
        deliveries = self._delivery_times()
        by_state = self.jobs.unfinished_job_ids()
        ids = [job_id for state in by_state for job_id in by_state[state]]
        suspects: set[str] = set()
        for job_id, (record, dispatched, leased) in zip(ids, self.jobs.liveness(ids), strict=True):
            if record is None or record.state.is_terminal or leased:
                continue
            if record.state != JobState.cancelling:
                if job_id in waiting:
                    continue
                if record.state == JobState.queued:
                    last_send = dispatched or record.created_at.timestamp()
                    last_delivery = deliveries.get(job_id, 0.0)
                    if now - max(last_send, last_delivery) < self.requeue_queued_after_s:
                        continue
            if job_id not in self._suspects:
                suspects.add(job_id)  # acted on only if still abandoned at the next sweep
                continue
            self._recover(record, report)
        self._suspects = suspects
        report.suspected = sorted(suspects)
        report.pruned = self.jobs.prune_expired()
        return report

    def _recover(self, record: Any, report: SweepReport) -> None:
        if record.state == JobState.cancelling:
            finished = self.jobs.finish_abandoned_cancel(record.id)
            if finished is not None and finished.state == JobState.cancelled:
                CheckpointStore(self.store.root).delete(record.id)
                report.cancelled.append(record.id)
            return
        enqueue_training(self.producer, record)
        self.jobs.mark_dispatched(record.id)
        report.requeued.append(record.id)
        logger.warning("reaper: job %s was %s with no live attempt and no message; queued it again", record.id,
                       record.state.value)

    def _waiting_job_ids(self) -> set[str]:
        """Jobs with a message waiting in the queue (any priority)."""
        keys = [self.queue] + [f"{self.queue}{_PRIORITY_SEPARATOR}{step}" for step in _PRIORITY_STEPS]
        pipe = self.jobs.client.pipeline(transaction=False)
        for key in keys:
            pipe.lrange(key, 0, -1)
        return {job_id for messages in pipe.execute() for raw in messages if (job_id := _job_id_of(raw))}

    def _delivery_times(self) -> dict[str, float]:
        """Job id → when a worker last took its message (still unacknowledged)."""
        client = self.jobs.client
        tags = cast("list[tuple[bytes, float]]", client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True))
        if not tags:
            return {}
        entries = client.hmget(UNACKED_KEY, [tag for tag, _score in tags])
        times: dict[str, float] = {}
        for (_tag, delivered_at), entry in zip(tags, entries, strict=True):
            if entry is None:
                continue
            try:
                job_id = _job_id_of(json.loads(entry)[0])
            except (ValueError, IndexError, TypeError):
                continue
            if job_id is not None:
                times[job_id] = max(times.get(job_id, 0.0), float(delivered_at))
        return times


def start_reaper(jobs: AttemptStore, producer: Any, store: ModelStore, *, interval_s: float,
                 requeue_queued_after_s: float) -> threading.Event:
    """Start the reaper in a daemon thread; set the returned event to stop it."""
    stop = threading.Event()
    reaper = Reaper(jobs, producer, store, interval_s=interval_s, requeue_queued_after_s=requeue_queued_after_s)
    threading.Thread(target=reaper.run, args=(stop,), name="dae-reaper", daemon=True).start()
    return stop
