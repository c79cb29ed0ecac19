"""The training queue's contract: the Celery task name and queue, the time limits of a job's task, and how a job
is sent. The gateway sends by name and never imports the worker; the worker registers the task under this name."""

from __future__ import annotations

from typing import Any

from dae.spec import MAX_RUNTIME_S, JobRecord, TrainingSpec

#: Celery task name and queue; the gateway enqueues by name (it never imports the worker).
TRAIN_TASK_NAME = "dae.train"
TRAIN_QUEUE = "dae.train"

#: Time a task needs beyond the training budget: TF import, dataset load, ONNX export + check,
#: evaluation on the test split, plots. The soft limit fires only if all that overruns this margin.
TASK_OVERHEAD_S = 600.0
#: Between the soft limit (SoftTimeLimitExceeded, recorded as a failure) and the hard kill of the child.
HARD_LIMIT_GRACE_S = 120.0

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

#: Default broker visibility timeout: the longest possible task plus an hour. The Redis transport redelivers a
#: message that stayed unacknowledged this long; with acks_late a task is acknowledged only when it ends, so a
#: shorter timeout would hand a healthy long job to a second worker while it still runs. Only the last resort: lost
#: jobs come back through their expired lease and the reaper (worker/reaper.py) within a minute.
DEFAULT_VISIBILITY_TIMEOUT_S = int(MAX_TASK_TIME_S + 3600)
