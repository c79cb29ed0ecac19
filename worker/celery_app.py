"""The Celery app of the training workers and its reliability settings.

Start a worker (scale out by starting more, on any host that sees the same Redis and model store):

    celery -A worker.celery_app worker -Q dae.train --pool prefork --concurrency 1 --loglevel info

Why these settings:
- JSON only: tasks take a job id (`dae.train(job_id)`), never arrays or pickles.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged when the task ends, not when it
  starts, so a job whose worker dies is not lost: if only the pool child dies, the main process requeues the
  message at once; if the whole worker dies (SIGKILL, host lost), the message stays in the Redis transport's
  "unacked" set and is put back on the queue once it is older than the visibility timeout.
- `worker_prefetch_multiplier=1`: a worker reserves only as many jobs as it runs; long jobs are not hoarded
  by one worker while others idle.
- Visibility timeout (`DAE_VISIBILITY_TIMEOUT_S`): kombu's Redis transport restores unacked messages older than
  it when a worker starts and then every `unacked_restore_interval` seconds (we scan on every sweep:
  throttle 1). Production uses a timeout longer than the longest possible task (worker/config.py, ≈ 25 h):
  with acks_late a healthy job stays unacknowledged while it trains, and a shorter timeout would hand it to
  a second worker mid-run. The price is that a job lost with its whole worker waits that long to come back.
  Tests use a few seconds so a redelivery happens within the test.
- Duplicates are harmless anyway: the task takes a per-job Redis lock (dae.jobs.JobLock, TTL renewed while
  training) before it runs, skips finished jobs, and publishes at most one model per job (worker/tasks.py).
  We rely on the broker's redelivery rather than a lock-expiry sweeper: the broker already holds the message
  of every unfinished job, so recovery needs no extra process and no scan of job records.
- Time limits come with each message (`dae.jobs.task_time_limits(spec)`, from the job's `max_runtime_s`); the
  app-wide defaults are those of the largest allowed job, as a backstop for a sender that omits them.
- `worker_max_tasks_per_child` (`DAE_MAX_TASKS_PER_CHILD`, default 1): TensorFlow does not give memory back to
  the OS, so a fresh child per job keeps a worker's footprint flat. Each fresh child pays the TensorFlow import
  (~5 s); tests and small-job deployments raise it.
- TensorFlow is never imported here or in worker/tasks.py at import time: the prefork pool forks children from
  the main process, and TensorFlow's thread pools do not survive a fork. Tasks import dae.training inside the
  task body, i.e. in the child.
- No result backend: the job record in Redis (dae.jobs) is the task's state and result.
"""

from __future__ import annotations

from celery import Celery

from dae.jobs import MAX_TASK_TIME_S, TASK_OVERHEAD_S, TRAIN_QUEUE, TRAIN_TASK_NAME
from dae.spec import MAX_RUNTIME_S
from worker.config import WorkerSettings, get_settings


def create_app(settings: WorkerSettings) -> Celery:
    """Build the Celery app from worker settings."""
    app = Celery("dae", broker=str(settings.redis_url), include=["worker.tasks"])
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.concurrency,
        worker_max_tasks_per_child=settings.max_tasks_per_child,
        worker_pool="prefork",
        # A Redis blip must not abort hours of training; the job's record still gets its final state and
        # the message is restored after the visibility timeout, where the task sees a finished job and skips it.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": settings.unacked_restore_interval_s,
            "unacked_restore_throttle": 1,
        },
        task_default_queue=TRAIN_QUEUE,
        task_routes={TRAIN_TASK_NAME: {"queue": TRAIN_QUEUE}},
        task_soft_time_limit=MAX_RUNTIME_S + TASK_OVERHEAD_S,
        task_time_limit=MAX_TASK_TIME_S,
        worker_send_task_events=False,
        worker_hijack_root_logger=True,
    )
    return app


app = create_app(get_settings())
