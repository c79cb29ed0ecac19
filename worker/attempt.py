"""What keeps one running attempt honest while it trains: its lease, its cancel flag and its progress writes.

The training loop never talks to Redis. A background thread (AttemptMonitor) renews the attempt's lease every
few seconds, polls the job's cancel flag, and writes the epochs the loop reports, in order and fenced by the
lease. A Redis outage is only a delay: every call is retried with backoff, nothing raises into training, and the
epochs that could not be written wait in memory until Redis is back, so the record's history stays complete. When
the lease turns out to belong to another attempt, `lost` is set and the attempt stops without writing anything.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from core.attempts import AttemptStore
from core.jobs import is_redis_outage
from core.leases import JobLease, LeaseLost
from dae.spec import EpochMetrics

logger = logging.getLogger(__name__)

#: How often the cancel flag is read; the training loop reads the result every 0.5 s too, so a cancel takes effect
#: within ~0.75 s (one HGET per 0.25 s per running job).
CANCEL_POLL_S = 0.25
#: Backoff between tries while Redis does not answer: doubling from the first to the last.
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.2, 1.0

_T = TypeVar("_T")


def retry_through_outages(call: Callable[[], _T], *, what: str, deadline_s: float,
                          stop: threading.Event | None = None) -> _T:
    """`call()`, retried with backoff while Redis is unavailable, for at most `deadline_s` seconds.

    Re-raises the outage after the deadline (or once `stop` is set); any other error is raised at once.
    """
    deadline = time.monotonic() + deadline_s
    pause = BACKOFF_FIRST_S
    warned = False
    while True:
        try:
            result = call()
        except Exception as error:
            if not is_redis_outage(error) or time.monotonic() + pause > deadline or (stop and stop.is_set()):
                raise
            if not warned:
                logger.warning("Redis unavailable while trying to %s (%s); retrying", what, error)
                warned = True
            time.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)
            continue
        if warned:
            logger.info("Redis is back: %s done", what)
        return result


class AttemptMonitor:
    """The background thread of one attempt: lease renewal, cancel polling and fenced, ordered epoch writes."""

    def __init__(self, jobs: AttemptStore, lease: JobLease, *, renew_s: float, shutdown: threading.Event,
                 cancel_poll_s: float = CANCEL_POLL_S) -> None:
        if not 0 < renew_s < lease.ttl_ms / 1000:
            raise ValueError(f"The lease must be renewed before it expires. Expected 0 < renew_s < ttl_s. "
                             f"Received: renew_s={renew_s}, ttl_s={lease.ttl_ms / 1000}")
        self.jobs, self.lease = jobs, lease
        self.renew_s, self.cancel_poll_s = renew_s, cancel_poll_s
        self.shutdown = shutdown
        self.cancel_requested = threading.Event()
        self.lost = threading.Event()
        self._pending: deque[EpochMetrics] = deque()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._flushed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"attempt-{lease.job_id}", daemon=True)
        self._outage_since: float | None = None

    # -- the training thread's side ------------------------------------------------------------

    def start(self) -> AttemptMonitor:
        """Start the background thread."""
        self._thread.start()
        return self

    def should_stop(self) -> bool:
        """Whether training should stop at the next batch: cancelled, lease lost, or the worker shutting down."""
        return self.cancel_requested.is_set() or self.lost.is_set() or self.shutdown.is_set()

    def report_epoch(self, metrics: EpochMetrics) -> None:
        """Queue one finished epoch for writing (never blocks, never raises)."""
        self._pending.append(metrics)
        self._wake.set()

    def flush(self, deadline_s: float) -> bool:
        """Wait until every reported epoch is written; False when the lease was lost or the deadline passed."""
        deadline = time.monotonic() + deadline_s
        self._wake.set()
        with self._flushed:
            while self._pending and not self.lost.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._flushed.wait(min(remaining, 0.5))
        return not self.lost.is_set()

    def close(self) -> None:
        """Stop the background thread (the lease stays until released or expired)."""
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # -- the background thread -----------------------------------------------------------------

    def _run(self) -> None:
        next_renewal = time.monotonic() + self.renew_s
        while not self._closed.is_set() and not self.lost.is_set():
            pause = BACKOFF_FIRST_S if self._outage_since is not None else self.cancel_poll_s
            self._wake.wait(pause)
            self._wake.clear()
            try:
                if time.monotonic() >= next_renewal or self._outage_since is not None:
                    if not self.lease.renew():
                        self._lose("its lease was taken by another attempt")
                        return
                    next_renewal = time.monotonic() + self.renew_s
                if self.jobs.is_cancel_requested(self.lease.job_id):
                    self.cancel_requested.set()
                self._write_pending()
                self._redis_answered()
            except LeaseLost:
                self._lose("a write found its lease taken by another attempt")
                return
            except Exception as error:
                if not is_redis_outage(error):
                    logger.exception("job %s: unexpected error in the attempt monitor", self.lease.job_id)
                self._redis_failed(error)
        with self._flushed:
            self._flushed.notify_all()

    def _write_pending(self) -> None:
        while self._pending:
            self.jobs.record_epoch(self.lease.job_id, self._pending[0], lease=self.lease)
            self._pending.popleft()
        with self._flushed:
            self._flushed.notify_all()

    def _lose(self, why: str) -> None:
        logger.error("job %s: attempt %d stops: %s", self.lease.job_id, self.lease.attempt, why)
        self.lost.set()
        with self._flushed:
            self._flushed.notify_all()

    def _redis_failed(self, error: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            logger.warning("job %s: Redis unavailable (%s); training goes on, %d epoch(s) wait to be written",
                           self.lease.job_id, error, len(self._pending))

    def _redis_answered(self) -> None:
        if self._outage_since is not None:
            logger.info("job %s: Redis is back after %.1f s; progress written", self.lease.job_id,
                        time.monotonic() - self._outage_since)
            self._outage_since = None
