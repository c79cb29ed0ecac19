"""The training task `dae.train(job_id)`: a thin shell around dae.training and dae.publish.

One attempt, in order:
1. Read the job record; a finished or cancelled job is skipped (its message is simply acknowledged).
2. Take the per-job lock (dae.jobs.JobLock, renewed every few seconds while training). If someone else holds
   it — a live attempt (a duplicate delivery) or one that died less than a lock TTL ago — this message is
   re-sent with a countdown of one TTL (`self.retry`) and acknowledged: there is always exactly one message
   for an unfinished job, so it can neither be lost (the holder may still die) nor run twice at once.
3. Under the lock, a record still `running`/`retrying` means an earlier attempt was lost: the record passes
   through `retrying`. If that attempt had already published its model (it died between publishing and
   marking the job), the job is marked succeeded with that model instead of training again.
4. `running`, attempts + 1; fit_autoencoder with hooks: each epoch → record_epoch (progress, history, event);
   should_cancel → the job's cancel flag (or a lost lock); checkpoints in the store's checkpoint_dir(job_id),
   from which a redelivered job resumes automatically.
5. Publish (only while still holding the lock, and only if no cancel arrived), mark succeeded with the model id,
   drop the checkpoint. A cancel marks `cancelled` with the epoch reached and keeps the checkpoint.
   Every failure is recorded with a reason a user can act on, and logged with its traceback.

TensorFlow is imported inside the task body (in the pool child), never at module import.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Any

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from dae.errors import (
    Conflict,
    DaeError,
    DatasetNotFound,
    DatasetUnavailable,
    ExportFailed,
    InvalidDataset,
    InvalidSpec,
    JobNotFound,
    TrainingFailed,
)
from dae.jobs import TASK_OVERHEAD_S, TRAIN_TASK_NAME, JobLock, JobStore, task_time_limits
from dae.spec import JobState, ModelCard, TrainingSpec
from dae.store import ModelStore
from worker.celery_app import app
from worker.config import WorkerSettings, get_settings

logger = logging.getLogger(__name__)

#: Outcomes `run_job` returns (also the task's return value, visible in the worker log).
SUCCEEDED, FAILED, CANCELLED, SKIPPED, BUSY, LOCK_LOST = "succeeded", "failed", "cancelled", "skipped", "busy", "lock_lost"

_job_store: tuple[int, JobStore] | None = None


def job_store(settings: WorkerSettings) -> JobStore:
    """This process's JobStore; created after the fork (a Redis connection is never shared across processes)."""
    global _job_store
    if _job_store is None or _job_store[0] != os.getpid():
        _job_store = (os.getpid(), JobStore(redis.Redis.from_url(str(settings.redis_url))))
    return _job_store[1]


def worker_identity() -> str:
    """Host name and pid of this process, as stored in the job record."""
    return f"{socket.gethostname()}:{os.getpid()}"


class TrainTask(Task):
    """Task base: records a hard time-limit kill, which happens after the child is gone (in the main process)."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Mark the job failed when the child was killed at the hard time limit (nothing else can)."""
        if not isinstance(exc, TimeLimitExceeded) or not args:
            return
        job_id = args[0]
        try:
            jobs = job_store(get_settings())
            record = jobs.get(job_id)
            if not record.state.is_terminal:
                jobs.mark_failed(job_id, time_limit_reason(record.spec, hard=True))
        except (DaeError, redis.RedisError):
            logger.exception("could not record the hard time limit of job %s", job_id)


@app.task(bind=True, base=TrainTask, name=TRAIN_TASK_NAME, max_retries=None, acks_late=True,
          reject_on_worker_lost=True, ignore_result=True)
def train(self: Task, job_id: str) -> str:
    """Train the model of job `job_id` and publish it; the job record holds the outcome."""
    settings = get_settings()
    outcome = run_job(job_id, settings=settings, jobs=job_store(settings), store=ModelStore(settings.store_dir))
    if outcome == BUSY:
        logger.info("job %s is locked by another attempt; trying again in %.0f s", job_id, settings.lock_ttl_s)
        raise self.retry(countdown=settings.lock_ttl_s)
    return outcome


def run_job(job_id: str, *, settings: WorkerSettings, jobs: JobStore, store: ModelStore) -> str:
    """One attempt at a job (see the module docstring); returns one of the outcome constants."""
    try:
        record = jobs.get(job_id)
    except JobNotFound:
        logger.error("job %s has no record; dropping its message", job_id)
        return SKIPPED
    if record.state.is_terminal:
        logger.info("job %s is already %s; nothing to do", job_id, record.state.value)
        return SKIPPED

    lock = jobs.lock(job_id, ttl_s=settings.lock_ttl_s, refresh_s=settings.lock_refresh_s)
    if not lock.acquire():
        return BUSY
    with lock.held():
        return _run_locked(job_id, jobs=jobs, store=store, lock=lock)


def _run_locked(job_id: str, *, jobs: JobStore, store: ModelStore, lock: JobLock) -> str:
    record = jobs.get(job_id)  # fresh: it may have changed while we took the lock
    if record.state.is_terminal:
        return SKIPPED
    if record.state in (JobState.running, JobState.retrying, JobState.cancelling):
        # We hold the lock, so the attempt that left this state is gone: a redelivery after a lost worker.
        logger.warning("job %s was %s in attempt %d, which was lost; taking over", job_id, record.state.value,
                       record.attempts)
        if record.state == JobState.cancelling:
            jobs.mark_cancelled(job_id)
            return CANCELLED
        record = jobs.mark_retrying(job_id)
        published = find_published_model(store, record.spec, job_id)
        if published is not None:
            logger.warning("job %s had already published model %s; not training again", job_id, published.id)
            jobs.mark_succeeded(job_id, model_id=published.id, history=published.history,
                                stop_reason=published.stop_reason)
            return SUCCEEDED

    record = jobs.mark_running(job_id, worker=worker_identity())
    if record.state == JobState.cancelling:  # cancelled between the two transitions
        jobs.mark_cancelled(job_id)
        return CANCELLED
    if record.state != JobState.running:
        return SKIPPED
    logger.info("job %s: attempt %d on %s", job_id, record.attempts, record.worker)

    resumed_from: int | None = None
    try:
        from dae.training import TrainingHooks, fit_autoencoder  # TensorFlow loads here, in the pool child

        hooks = TrainingHooks(
            on_epoch=lambda metrics: jobs.record_epoch(job_id, metrics),
            # fit_autoencoder polls this at most every ~0.5 s: one HGET each time.
            should_cancel=lambda: lock.lost.is_set() or jobs.is_cancel_requested(job_id),
            checkpoint_dir=store.checkpoint_dir(job_id),
        )
        result = fit_autoencoder(record.spec, store=store, hooks=hooks)
        resumed_from = result.resumed_from_epoch
        if lock.lost.is_set() or not lock.refresh():
            logger.error("job %s: lost its lock during training; another attempt owns it now", job_id)
            return LOCK_LOST
        if result.stop_reason == "cancelled" or jobs.is_cancel_requested(job_id):
            jobs.mark_cancelled(job_id, history=result.history, resumed_from_epoch=resumed_from)
            logger.info("job %s cancelled after epoch %d (checkpoint kept)", job_id, result.epochs_completed)
            return CANCELLED

        from dae.publish import publish_training_result

        card = publish_training_result(result, record.spec, store, job_id=job_id)
        # Checkpoint first: a crash in between leaves a published model, which a redelivery finds and reuses.
        store.delete_checkpoint(job_id)
        jobs.mark_succeeded(job_id, model_id=card.id, history=result.history, stop_reason=result.stop_reason,
                            resumed_from_epoch=resumed_from)
        logger.info("job %s succeeded: model %s (%s v%d)", job_id, card.id, card.name, card.version)
        return SUCCEEDED
    except Exception as error:  # every failure is recorded with a reason, then logged with its traceback
        reason = failure_reason(error, record.spec)
        logger.error("job %s failed: %s", job_id, reason, exc_info=True)
        if lock.lost.is_set():
            return LOCK_LOST
        try:
            store.delete_checkpoint(job_id)  # a failed job never resumes; give its disk space back first
        except OSError:
            logger.warning("job %s: could not delete its checkpoint", job_id, exc_info=True)
        try:
            jobs.mark_failed(job_id, reason, resumed_from_epoch=resumed_from)
        except Conflict:  # finished meanwhile (e.g. the failure came after the model was recorded)
            logger.warning("job %s already finished; not recording this failure", job_id)
        return FAILED


def find_published_model(store: ModelStore, spec: TrainingSpec, job_id: str) -> ModelCard | None:
    """The model an earlier attempt of this job published, if any (scans the versions of the job's model name)."""
    from dae.publish import default_model_name

    total = None
    offset = 0
    while total is None or offset < total:
        cards, total = store.list_models(name=default_model_name(spec), limit=200, offset=offset)
        for card in cards:
            if card.job_id == job_id:
                return card
        if not cards:
            break
        offset += len(cards)
    return None


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

