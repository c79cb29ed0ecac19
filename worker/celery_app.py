"""The Celery app of the training workers and its reliability settings.

Start a worker (scale out by starting more, on any host that sees the same Redis and model store):

    celery -A worker.celery_app worker -Q dae.train --pool prefork --concurrency 1 --loglevel info

Why these settings:
- JSON only: tasks take a job id (`dae.train(job_id)`), never arrays or pickles.
- `task_acks_late` + `task_reject_on_worker_lost`: a message is acknowledged when the task ends, not when it
  starts. If only a pool child dies, the main process notes how (worker/tasks.py TrainRequest), frees the dead
  attempt's lease and requeues the message at once; the next attempt counts the death, and after DAE_MAX_ATTEMPTS
  deaths the job fails instead of killing pool children forever.
- Recovery does not wait for the broker. Every running attempt holds a lease renewed every few seconds
  (worker/attempt.py); the reaper (worker/reaper.py, a thread of each worker's main process, one at a time
  cluster-wide) re-enqueues jobs whose lease expired and queued jobs that have no message, within about a
  minute. The visibility timeout (`DAE_VISIBILITY_TIMEOUT_S`, ≈ 25 h: longer than the longest possible task, as
  a healthy long job stays unacknowledged while it trains) is only the last resort; the copies it redelivers
  are harmless, as every duplicate is: a message whose job a live attempt holds, or that already finished, is
  dropped.
- `worker_prefetch_multiplier=1`: a worker reserves only as many jobs as it runs; long jobs are not hoarded
  by one worker while others idle.
- Graceful stop (SIGTERM, `docker compose stop`, a deploy): the main process relays SIGTERM to the pool children
  running jobs; each stops at the next batch and hands its job off (checkpoint kept, lease released, message sent
  again), so another worker resumes it within seconds and the 60 s grace period is enough.
- Time limits come with each message (`core.jobs.task_time_limits(spec)`, from the job's `max_runtime_s`); the
  app-wide defaults are those of the largest allowed job, as a backstop for a sender that omits them.
- `worker_max_tasks_per_child` (`DAE_MAX_TASKS_PER_CHILD`, default 1): TensorFlow does not give memory back to
  the OS, so a fresh child per job keeps a worker's footprint flat. Each fresh child pays the TensorFlow import
  (~5 s); tests and small-job deployments raise it.
- TensorFlow is never imported here or in worker/tasks.py at import time: the prefork pool forks children from
  the main process, and TensorFlow's thread pools do not survive a fork. A fresh pool child imports it right
  after the fork (`worker_process_init`, see preload_training_modules): TensorFlow, Keras, the ONNX converter,
  scikit-image and matplotlib take ~5-7 s to import on 2 cores, and a process's first ONNX export ~1 s more than
  later ones; a child that pays both before a job arrives takes that time off the job (measured by bench/train.py). With one job per child the replacement child is
  forked as the previous job ends, so it preloads while the worker waits for the next job. The child signals
  that it is up only after the preload, hence `worker_proc_alive_timeout` (Celery's default, 4 s, would kill and
  replace a child still importing, forever). The task body still imports what it uses (a no-op when preloaded).
- Each pool child also starts one evaluation helper process (dae.evaluation.helper, `python -m dae.evaluation.helper`, ~75 MB):
  the model-independent rows of the evaluation table (noisy, TV, NL-means) run there on the second core while the
  job exports its model, ~1.5 s off every job's overhead. It stops with the child (worker_process_shutdown, or EOF
  on its stdin if the child dies); without it the rows are computed inline.
- No result backend: the job record in Redis (core.jobs) is the task's state and result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready, worker_shutting_down

from core.migrations import migrate_store_names
from core.queue import MAX_TASK_TIME_S, TASK_OVERHEAD_S, TRAIN_QUEUE, TRAIN_TASK_NAME
from core.store import ModelStore
from dae.spec import MAX_RUNTIME_S
from worker.config import WorkerSettings, get_settings
from worker.reaper import UNACKED_INDEX_KEY, UNACKED_KEY, start_reaper

logger = logging.getLogger(__name__)

#: Seconds a new pool child may take to report that it is up, its preload included.
PROCESS_START_TIMEOUT_S = 180.0


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
            # kombu's defaults, named here because the reaper reads these keys (worker/reaper.py).
            "unacked_key": UNACKED_KEY,
            "unacked_index_key": UNACKED_INDEX_KEY,
        },
        task_default_queue=TRAIN_QUEUE,
        task_routes={TRAIN_TASK_NAME: {"queue": TRAIN_QUEUE}},
        task_soft_time_limit=MAX_RUNTIME_S + TASK_OVERHEAD_S,
        task_time_limit=MAX_TASK_TIME_S,
        worker_send_task_events=False,
        worker_proc_alive_timeout=PROCESS_START_TIMEOUT_S,
        worker_hijack_root_logger=True,
    )
    return app


app = create_app(get_settings())


def preload_training_modules() -> None:
    """Import everything a training job imports lazily: TensorFlow/Keras and dae.training, the ONNX export path
    (tf2onnx, onnxruntime), scikit-image's denoisers and matplotlib's Agg canvas (evaluation and plots); run one
    TensorFlow op so its runtime (devices, thread pools) is initialised too; and read the default dataset's local
    Fashion-MNIST files into dae.data's memo (55 MB of uint8; ~0.5 s per job otherwise), never downloading anything.
    Also starts the evaluation helper process (dae.evaluation.helper: the classical baselines run there while the job
    exports its model), first, so that its imports overlap these. Only ever call it in a pool child.
    """
    _start_evaluation_helper(wait=False)
    import matplotlib.backends.backend_agg  # noqa: F401, PLC0415 - plots (dae.publish)
    import matplotlib.figure  # noqa: F401, PLC0415
    import onnxruntime  # noqa: F401, PLC0415 - the export check and the evaluation (dae.export)
    import skimage.restoration  # noqa: F401, PLC0415 - TV and NL-means baselines (dae.evaluation.baselines)
    import tensorflow as tf  # noqa: PLC0415
    import tf2onnx  # noqa: F401, PLC0415 - Keras' ONNX export

    import dae.publish  # noqa: F401, PLC0415
    import dae.training  # noqa: F401, PLC0415

    tf.zeros((1,)) + 1.0  # noqa: B018 - initialises the eager runtime
    from dae.data import FASHION_MNIST_DIR, load_fashion_mnist_pixels  # noqa: PLC0415

    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        load_fashion_mnist_pixels(FASHION_MNIST_DIR)
    _warm_up_export()
    _start_evaluation_helper(wait=True)


def _start_evaluation_helper(*, wait: bool) -> None:
    """Start (or wait for) the evaluation helper (dae.evaluation.helper); without one, jobs compute the reference rows inline."""
    from dae.evaluation.helper import start_helper, stop_helper  # noqa: PLC0415

    try:
        start_helper(wait=wait)
    except Exception:  # e.g. no process could be spawned: slower publishing, not a broken worker
        logger.warning("could not start the evaluation helper process; evaluating inline", exc_info=True)
        stop_helper()


def _warm_up_export() -> None:
    """Export a toy model once through dae.export: a process's first export pays ~0.5-1 s of one-time set-up
    (Keras' export tracing, tf2onnx's handlers, TensorFlow's graph optimizer) that later ones do not."""
    import keras  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from dae.export import export_onnx  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="dae-warm-up-") as directory:
        inputs = keras.Input((8, 8, 1))
        toy = keras.Model(inputs, keras.layers.Conv2D(1, 3, padding="same")(inputs))
        export_onnx(toy, Path(directory) / "toy.onnx", real_images=np.zeros((2, 8, 8, 1), np.float32))
    keras.backend.clear_session()  # forget the toy (layer name counters, graphs): a job starts from a clean state


@worker_process_shutdown.connect
def _stop_helper_in_pool_child(**_: Any) -> None:
    """worker_process_shutdown handler: stop the pool child's evaluation helper with it."""
    from dae.evaluation.helper import stop_helper  # noqa: PLC0415

    stop_helper()


#: Age after which another host's staging directory counts as abandoned (publishing takes seconds to minutes).
STALE_STAGING_S = 3600.0
_reaper_stop: threading.Event | None = None


@worker_ready.connect
def _start_reaper_and_clean_up(**_: Any) -> None:
    """worker_ready handler (main process): clean what cut-short publishes left, then start the reaper."""
    global _reaper_stop
    from worker.tasks import train  # noqa: PLC0415 - worker.tasks imports this module

    settings = get_settings()
    store = ModelStore(settings.store_dir)
    try:
        migrate_store_names(store)
        removed = store.remove_stale_temporaries(older_than_s=STALE_STAGING_S)
        if removed:
            logger.warning("removed %d staging/trash directories left by interrupted publishes", removed)
    except OSError:
        logger.exception("could not clean the store's tmp/ directory")
    _reaper_stop = start_reaper(train.jobs, app, store, interval_s=settings.reaper_interval_s,
                                requeue_queued_after_s=settings.requeue_queued_after_s)
    logger.info("reaper started (every %.0f s)", settings.reaper_interval_s)


@worker_shutting_down.connect
def _hand_off_running_jobs(how: str = "Warm", **_: Any) -> None:
    """worker_shutting_down handler (main process, in its signal handler): stop the reaper and ask the pool
    children running jobs to hand them off (SIGTERM, see worker.tasks.sigterm_hands_off)."""
    from celery.worker.state import active_requests  # noqa: PLC0415

    if _reaper_stop is not None:
        _reaper_stop.set()
    if how == "Cold":
        return  # the children are being terminated; their messages are requeued by the broker
    for request in list(active_requests):
        if request.name == TRAIN_TASK_NAME and request.worker_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(request.worker_pid, signal.SIGTERM)


@worker_process_init.connect
def _preload_in_pool_child(**_: Any) -> None:
    """worker_process_init handler: preload in the fresh child; a failure only costs the job the import time."""
    started = time.monotonic()
    try:
        preload_training_modules()
    except Exception:  # the task imports again and reports any real error as the job's failure
        logger.exception("pool child could not preload the training modules")
        return
    logger.info("pool child preloaded TensorFlow and the training code in %.1f s", time.monotonic() - started)
