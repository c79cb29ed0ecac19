"""The training task `dae.train(job_id)`: a thin shell around dae.training and dae.publish.

One attempt, in order:
1. `AttemptStore.start_attempt` takes the job's lease and marks it running in one transaction (attempt number =
   fencing token). A finished job, or one whose lease a live attempt holds (a duplicate message), is left alone
   and the message acknowledged: a job without a live attempt is the reaper's to re-enqueue (worker/reaper.py),
   so no message has to be kept around. A record still `running` without a lease means the previous attempt's
   process died: it counts as a lost attempt, and after DAE_MAX_ATTEMPTS of them the job fails.
2. An earlier attempt may have published the model before dying (one id per job: core.store.model_id_for_job);
   then the job is marked succeeded with it instead of training again.
3. fit_autoencoder writes this attempt's checkpoints into its own directory and resumes from the furthest
   checkpoint any earlier attempt left. The training loop never touches Redis: worker/attempt.py's monitor
   renews the lease, polls the cancel flag and writes each epoch (fenced), retrying through Redis outages.
4. The end, every write fenced by the lease: publish (only after checking the lease) and mark succeeded; or
   cancelled; or, when the worker is shutting down (SIGTERM), hand the job off: back to `retrying`, lease
   released and a new message sent at once, so another worker resumes it from the checkpoint within seconds.
   Only errors of the job itself fail it, with a reason a user can act on; Redis being away only delays the
   writes. Checkpoints are deleted once the final state is recorded, never on an error path.

TensorFlow is imported inside the task body (in the pool child), never at module import.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, TypeVar, cast

import redis
from billiard.einfo import ExceptionWithTraceback  # type: ignore[attr-defined]  # present, missing from the stubs
from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.worker.request import Request
from typing_extensions import override

from core.attempts import ATTEMPT_BUSY, ATTEMPT_CANCELLED, ATTEMPT_FAILED, ATTEMPT_SKIPPED, AttemptStore
from core.checkpoints import CheckpointStore
from core.datasets import DatasetStore
from core.jobs import is_redis_outage
from core.leases import JobLease, LeaseLost
from core.queue import TASK_OVERHEAD_S, TRAIN_TASK_NAME, enqueue_training, task_time_limits
from core.store import ModelStore, model_id_for_job
from dae.errors import (
    Conflict,
    DaeError,
    DatasetNotFound,
    DatasetUnavailable,
    ExportFailed,
    InvalidDataset,
    InvalidSpec,
    JobNotFound,
    ModelNotFound,
    TrainingFailed,
)
from dae.spec import JobRecord, TrainingSpec
from worker.attempt import AttemptMonitor, retry_through_outages
from worker.celery_app import app
from worker.config import WorkerSettings, get_settings

logger = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Outcomes `run_job` returns (also the task's return value, visible in the worker log).
SUCCEEDED, FAILED, CANCELLED, SKIPPED, BUSY = "succeeded", "failed", "cancelled", "skipped", "busy"
LOCK_LOST, HANDED_OFF, ABANDONED = "lease_lost", "handed_off", "abandoned"
#: How long an attempt waits for Redis at its start and for its final writes before it gives up; the job is then
#: the reaper's to re-enqueue once Redis is back.
REDIS_WAIT_S = 600.0

#: Set in a pool child when its worker shuts down (SIGTERM relayed by the main process): stop at the next batch.
shutdown_requested = threading.Event()

def worker_identity(pid: int | None = None) -> str:
    """Host name and pid of a process of this host (default: this one), as leases and job records hold it."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def exit_note(error: BaseException) -> str:
    """How a pool child died, from Celery's WorkerLostError or SystemExit: "signal SIGKILL", "exit code 1"."""
    if isinstance(error, SystemExit):
        return f"exit code {error.code}"
    text = str(error)
    if found := re.search(r"signal \d+ \((SIG\w+)\)", text):
        return f"signal {found[1]}"
    if found := re.search(r"exitcode (-?\d+)", text):
        return f"exit code {found[1]}"
    return text[:120]


class TrainRequest(Request):
    """The main process's view of one delivery: when the pool child running it dies, note how and free its lease.

    Celery then requeues the message (task_reject_on_worker_lost) and the next attempt starts at once, counting
    the death (AttemptStore.start_attempt), instead of waiting for the lease to expire.
    """

    @override
    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        """Record a lost pool child before Celery's own handling (requeue)."""
        error = exc_info.exception
        error = error.exc if isinstance(error, ExceptionWithTraceback) else error
        if isinstance(error, WorkerLostError | SystemExit) and self.args and self.worker_pid:
            job_id = self.args[0]
            try:
                freed = cast(TrainTask, self.task).jobs.record_lost_process(
                    job_id, owner=worker_identity(int(self.worker_pid)), exit_note=exit_note(error)
                )
                logger.warning("job %s: pool child %s died (%s); lease %s", job_id, self.worker_pid,
                               exit_note(error), "freed" if freed else "not held by it")
            except (DaeError, redis.RedisError):
                logger.exception("could not record the lost pool child of job %s", job_id)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class TrainTask(Task):  # type: ignore[type-arg]  # Celery's Task is not subscriptable at run time
    """Task base (Celery's task guide): holds this process's job store and records a hard time-limit kill, which
    happens after the child is gone (in the main process)."""

    Request = TrainRequest  # type: ignore[assignment]  # the stubs say str (a dotted path); Celery takes the class too
    _jobs: tuple[int, AttemptStore] | None = None

    @property
    def jobs(self) -> AttemptStore:
        """This process's job store; made after the fork (a Redis connection is never shared across processes)."""
        if self._jobs is None or self._jobs[0] != os.getpid():
            settings = get_settings()
            client = redis.Redis.from_url(str(settings.redis_url), socket_connect_timeout=2, socket_timeout=10)
            self._jobs = (os.getpid(), AttemptStore(client, retention_s=settings.job_retention_days * 86400,
                                                    every_owner=True))  # workers serve every owner's jobs
        return self._jobs[1]

    @override
    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Mark the job failed when the child was killed at the hard time limit (nothing else can)."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        job_id = args[0]
        try:
            jobs = self.jobs
            record = jobs.get(job_id)
            if not record.state.is_terminal:
                jobs.mark_failed(job_id, time_limit_reason(record.spec, hard=True))
        except (DaeError, redis.RedisError):
            logger.exception("could not record the hard time limit of job %s", job_id)


@app.task(bind=True, base=TrainTask, name=TRAIN_TASK_NAME, max_retries=None, acks_late=True,
          reject_on_worker_lost=True, ignore_result=True)
def train(self: TrainTask, job_id: str) -> str:
    """Train the model of job `job_id` and publish it; the job record holds the outcome."""
    settings = get_settings()
    return run_job(job_id, settings=settings, jobs=self.jobs, store=ModelStore(settings.store_dir), producer=self.app)


def run_job(job_id: str, *, settings: WorkerSettings, jobs: AttemptStore, store: ModelStore, producer: Any = None,
            shutdown: threading.Event = shutdown_requested) -> str:
    """One attempt at a job (see the module docstring); returns one of the outcome constants."""
    lease = jobs.lease(job_id, owner=worker_identity(), ttl_s=settings.lease_ttl_s)
    try:
        outcome, record = retry_through_outages(
            lambda: jobs.start_attempt(job_id, lease, max_lost_attempts=settings.max_attempts),
            what=f"start job {job_id}", deadline_s=REDIS_WAIT_S,
        )
    except JobNotFound:
        logger.error("job %s has no record; dropping its message", job_id)
        return SKIPPED
    if outcome == ATTEMPT_SKIPPED:
        logger.info("job %s is already %s; nothing to do", job_id, record.state.value)
        return SKIPPED
    if outcome == ATTEMPT_BUSY:
        logger.info("job %s is held by a live attempt; dropping this duplicate message", job_id)
        return BUSY
    if outcome in (ATTEMPT_CANCELLED, ATTEMPT_FAILED):
        logger.warning("job %s: %s when taken over (%s)", job_id, record.state.value, record.failure_reason or "")
        CheckpointStore(store.root).delete(job_id)  # its final state is recorded
        return CANCELLED if outcome == ATTEMPT_CANCELLED else FAILED
    logger.info("job %s: attempt %d on %s", job_id, record.attempts, record.worker)
    monitor = AttemptMonitor(jobs, lease, renew_s=settings.lease_renew_s, shutdown=shutdown).start()
    try:
        with sigterm_hands_off() if threading.current_thread() is threading.main_thread() else nullcontext():
            return _run_attempt(record, jobs=jobs, store=store, lease=lease, monitor=monitor, producer=producer)
    except LeaseLost:
        logger.error("job %s: attempt %d lost its lease; another attempt owns the job", job_id, lease.attempt)
        return LOCK_LOST
    except Exception as error:
        if is_redis_outage(error):
            logger.error("job %s: Redis stayed unreachable for %.0f s; leaving the job to the reaper", job_id,
                         REDIS_WAIT_S)
            return ABANDONED
        raise
    finally:
        monitor.close()


def _finish(call: Callable[[], _T], what: str) -> _T:
    """A final write, retried through Redis outages (LeaseLost and other errors propagate)."""
    return retry_through_outages(call, what=what, deadline_s=REDIS_WAIT_S)


def _run_attempt(record: JobRecord, *, jobs: AttemptStore, store: ModelStore, lease: JobLease, monitor: AttemptMonitor,
                 producer: Any) -> str:
    job_id, spec = record.id, record.spec
    store = store.with_owner(record.owner)  # the job's model and dataset are its owner's
    checkpoints = CheckpointStore(store.root)
    published = _published_card(store, job_id)
    if published is not None:
        logger.warning("job %s had already published model %s; not training again", job_id, published.id)
        _finish(lambda: jobs.mark_succeeded(job_id, model_id=published.id, history=published.history,
                                            stop_reason=published.stop_reason, lease=lease), "record the success")
        checkpoints.delete(job_id)
        return SUCCEEDED

    resumed_from: int | None = None
    try:
        from dae.training import TrainingHooks, fit_autoencoder, furthest_checkpoint  # TensorFlow loads here

        earlier = [checkpoints.job_dir(job_id)] + [
            checkpoints.job_dir(job_id) / str(attempt) for attempt in range(1, lease.attempt)
        ]
        hooks = TrainingHooks(
            on_epoch=monitor.report_epoch,
            should_cancel=monitor.should_stop,
            cancel_poll_s=0.0,  # should_stop reads an Event the monitor sets: cheap enough for every batch
            checkpoint_dir=checkpoints.attempt_dir(job_id, lease.attempt),
            resume_dir=furthest_checkpoint(earlier),
        )
        result = fit_autoencoder(spec, store=DatasetStore(store.root, record.owner), hooks=hooks)
        resumed_from = result.resumed_from_epoch
        if not monitor.flush(REDIS_WAIT_S) or monitor.lost.is_set():
            raise LeaseLost(f"job {job_id}: the epochs could not be written under this attempt's lease")
        if result.stop_reason == "cancelled":
            cancelled = monitor.cancel_requested.is_set() or _finish(
                lambda: jobs.is_cancel_requested(job_id), "read the cancel flag")
            if not cancelled:
                return _hand_off(record, jobs=jobs, lease=lease, producer=producer, history=result.history)
            _finish(lambda: jobs.mark_cancelled(job_id, history=result.history, resumed_from_epoch=resumed_from,
                                                lease=lease), "record the cancel")
            checkpoints.delete(job_id)
            logger.info("job %s cancelled after epoch %d", job_id, result.epochs_completed)
            return CANCELLED

        from dae.publish import publish_training_result

        def still_ours() -> None:
            # Fenced: a stale attempt raises LeaseLost here and publishes nothing.
            _finish(lambda: jobs.set_resumed_from(job_id, resumed_from, lease=lease), "check the lease")

        card = publish_training_result(result, spec, store, model_id=model_id_for_job(job_id), job_id=job_id, before_publish=still_ours)
        _finish(lambda: jobs.mark_succeeded(job_id, model_id=card.id, history=result.history,
                                            stop_reason=result.stop_reason, resumed_from_epoch=resumed_from,
                                            lease=lease), "record the success")
        checkpoints.delete(job_id)
        logger.info("job %s succeeded: model %s (%s v%d)", job_id, card.id, card.name, card.version)
        return SUCCEEDED
    except (LeaseLost, Conflict) as error:  # Conflict: another attempt published or finished the job meanwhile
        raise LeaseLost(str(error)) from error
    except Exception as error:  # the job's own failure: recorded with a reason, logged with its traceback
        if is_redis_outage(error) or monitor.lost.is_set():
            raise
        reason = failure_reason(error, spec)
        logger.error("job %s failed: %s", job_id, reason, exc_info=True)
        try:
            _finish(lambda: jobs.mark_failed(job_id, reason, resumed_from_epoch=resumed_from, lease=lease),
                    "record the failure")
        except Conflict:  # finished meanwhile (e.g. the failure came after the model was recorded)
            logger.warning("job %s already finished; not recording this failure", job_id)
            return FAILED
        checkpoints.delete(job_id)  # a failed job never resumes; its final state is recorded
        return FAILED


def _hand_off(record: JobRecord, *, jobs: AttemptStore, lease: JobLease, producer: Any, history: list[Any]) -> str:
    """The worker is stopping: give the job back (retrying, lease released) and queue it again at once."""
    _finish(lambda: jobs.hand_off(record.id, lease, history=history), "hand the job off")
    try:
        if producer is None:
            raise RuntimeError("no producer to send the job with")
        enqueue_training(producer, record)
        jobs.mark_dispatched(record.id)
        logger.warning("job %s: worker shutting down; handed off after epoch %d and queued again", record.id,
                       history[-1].epoch if history else 0)
    except Exception:  # the reaper queues a retrying job that has no message
        logger.exception("job %s: handed off but could not be queued again; the reaper will", record.id)
    return HANDED_OFF


def _published_card(store: ModelStore, job_id: str) -> Any:
    """The model an earlier attempt of this job published, if any."""
    try:
        return store.read_card(model_id_for_job(job_id))
    except ModelNotFound:
        return None


@contextmanager
def sigterm_hands_off() -> Iterator[None]:
    """While an attempt runs: SIGTERM (relayed by the stopping worker) asks it to hand the job off at the next
    batch; a second one falls through to billiard's handler (exit). Outside an attempt the process exits as usual.
    Installed per attempt, as billiard sets its own handlers after the pool child's initializer."""

    def on_sigterm(signum: int, frame: Any) -> None:
        if not shutdown_requested.is_set():
            shutdown_requested.set()
        elif callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def time_limit_reason(spec: TrainingSpec, *, hard: bool) -> str:
    """The failure reason for a job stopped by a Celery time limit."""
    soft, hard_limit = task_time_limits(spec)
    limit = hard_limit if hard else soft
    return (
        f"The job ran past its time limit of {limit:.0f} s (max_runtime_s={spec.max_runtime_s:g} plus "
        f"{TASK_OVERHEAD_S:.0f} s for loading, export and evaluation) and was stopped. Training itself stops at "
        "max_runtime_s, so the overrun came from loading the dataset or exporting/evaluating the model: "
        "lower max_train_images or use a smaller model."
    )


def failure_reason(error: BaseException, spec: TrainingSpec) -> str:
    """A reason a user can act on, for any exception an attempt can end with."""
    if isinstance(error, SoftTimeLimitExceeded):
        return time_limit_reason(spec, hard=False)
    if isinstance(error, TrainingFailed):
        return error.message
    if isinstance(error, DatasetNotFound | DatasetUnavailable):
        return f"Dataset {spec.dataset!r} could not be loaded: {error.message} Upload it again or pick another dataset."
    if isinstance(error, InvalidSpec | InvalidDataset):
        return f"The job cannot run on dataset {spec.dataset!r}: {error.message}"
    if isinstance(error, ExportFailed):
        return f"The trained model could not be exported to ONNX faithfully, so nothing was published: {error.message}"
    if isinstance(error, DaeError):
        return error.message
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"The model store ran out of disk space ({os.strerror(error.errno)}: {error.filename or 'store'}). "
            "Free space under DAE_STORE_DIR (delete old models or checkpoints) and submit the job again."
        )
    if isinstance(error, ValueError):
        return f"Invalid values found while running the job: {error}"
    if isinstance(error, MemoryError):
        return "The worker ran out of memory; use a smaller batch_size, model or max_train_images."
    return f"Unexpected {type(error).__name__} in the worker: {error}. See the worker log for the traceback."

