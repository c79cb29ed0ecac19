"""Real processes for integration tests: a `celery worker` subprocess, a Celery producer, wait-until helpers.

Reusable by the worker tests and the gateway's end-to-end tests:

    worker = CeleryWorker(redis_url=..., store_dir=..., log_path=tmp / "worker.log").start()
    producer = make_producer(redis_url)
    enqueue(producer, record)           # exactly how the gateway enqueues: send_task by name, with time limits
    wait_until(lambda: jobs.get(record.id).state.is_terminal, 60, "job finished", worker)
    worker.stop()                       # graceful (SIGTERM, warm shutdown), then SIGKILL of the process group
    worker.kill()                       # SIGKILL of main process and pool children at once (a lost host)

The worker runs in its own session, so its process group holds the main process and every pool child.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from celery import Celery

from core.queue import TRAIN_QUEUE, enqueue_training
from dae.spec import JobRecord

REPO_ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, worker: CeleryWorker | None = None,
               interval_s: float = 0.1) -> object:
    """Poll until `predicate()` is truthy and return its value; on timeout fail naming `what` (+ the worker log)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            log = f"\n--- worker log (tail) ---\n{worker.log_tail()}" if worker is not None else ""
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for: {what}{log}")
        time.sleep(interval_s)


def make_producer(redis_url: str) -> Celery:
    """A Celery app that only sends (as the gateway does): JSON, no result backend, no task imports."""
    producer = Celery("dae-producer", broker=redis_url, set_as_current=False)
    producer.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                         broker_connection_retry_on_startup=True)
    return producer


def enqueue(producer: Celery, record: JobRecord) -> None:
    """Send `dae.train(job_id)` to the train queue with the job's time limits, as the gateway does."""
    enqueue_training(producer, record)


class CeleryWorker:
    """A `celery -A worker.celery_app worker` subprocess with test-friendly reliability settings.

    visibility_timeout_s: seconds before the broker redelivers an unacknowledged message; the last resort, as in
    production (hours): recovery comes from leases and the reaper.
    lease_ttl_s/lease_renew_s: a running attempt's lease; a killed worker's job is picked up again after lease_ttl_s
    (plus two reaper sweeps of reaper_interval_s). Short here: the tests are about the mechanism; one test runs
    the production defaults (pass None to keep a setting's production default).
    max_tasks_per_child: high by default so the ~5 s TensorFlow import is paid once per worker, not per job
    (production's default of 1 returns TensorFlow's memory after each job instead).
    """

    def __init__(self, *, redis_url: str, store_dir: Path, log_path: Path, name: str | None = None,
                 concurrency: int = 1, visibility_timeout_s: float | None = 600.0,
                 restore_interval_s: float | None = 1.0, lease_ttl_s: float | None = 4.0,
                 lease_renew_s: float | None = 1.0, reaper_interval_s: float | None = 1.0,
                 requeue_queued_after_s: float | None = 20.0, max_tasks_per_child: int = 1000,
                 extra_env: dict[str, str] | None = None) -> None:
        self.name = name or f"test-{uuid.uuid4().hex[:6]}"
        self.log_path = Path(log_path)
        timings = {
            "DAE_VISIBILITY_TIMEOUT_S": visibility_timeout_s,
            "DAE_UNACKED_RESTORE_INTERVAL_S": restore_interval_s,
            "DAE_LEASE_TTL_S": lease_ttl_s,
            "DAE_LEASE_RENEW_S": lease_renew_s,
            "DAE_REAPER_INTERVAL_S": reaper_interval_s,
            "DAE_REQUEUE_QUEUED_AFTER_S": requeue_queued_after_s,
        }
        inherited = {key: value for key, value in os.environ.items() if key not in timings}
        self.env = {
            **inherited,
            "DAE_REDIS_URL": redis_url,
            "DAE_STORE_DIR": str(store_dir),
            **{key: str(value) for key, value in timings.items() if value is not None},
            "DAE_MAX_TASKS_PER_CHILD": str(max_tasks_per_child),
            "DAE_CONCURRENCY": str(concurrency),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            **(extra_env or {}),
        }
        self.concurrency = concurrency
        self.process: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    @property
    def command(self) -> list[str]:
        """The documented start command, with this worker's name and pool size."""
        return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "prefork",
                "--concurrency", str(self.concurrency), "-Q", TRAIN_QUEUE, "--loglevel", "INFO",
                "--hostname", f"{self.name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat"]

    def start(self, ready_timeout_s: float = 60.0) -> CeleryWorker:
        """Start the worker and wait until it consumes from the queue."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: " ready." in self.log_text() or not self.alive, ready_timeout_s,
                   f"celery worker {self.name} to be ready", self)
        if not self.alive:
            raise RuntimeError(f"celery worker {self.name} exited at start:\n{self.log_tail()}")
        return self

    def wait_until_warm(self, timeout_s: float = 120.0) -> CeleryWorker:
        """Wait until every pool child has preloaded TensorFlow (worker/celery_app.py logs it): " ready." comes
        before that, and a job received meanwhile waits for the preload while a warm worker drains the queue."""
        wait_until(lambda: self.log_text().count("pool child preloaded") >= self.concurrency or not self.alive,
                   timeout_s, f"the pool children of {self.name} to preload", self)
        if not self.alive:
            raise RuntimeError(f"celery worker {self.name} exited while preloading:\n{self.log_tail()}")
        return self

    @property
    def alive(self) -> bool:
        """Whether the main process is still running."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int:
        """Pid of the main process (also its process group id)."""
        if self.process is None:
            raise RuntimeError("the worker was not started")
        return self.process.pid

    def child_pids(self) -> list[int]:
        """Pids of the live pool children (processes in the worker's group other than the main one; no zombies)."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.pid:
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after its closing parenthesis.
            fields = stat[stat.rindex(")") + 2:].split()
            if fields[0] not in ("Z", "X") and int(fields[2]) == self.pid:
                pids.append(int(entry.name))
        return pids

    def kill(self) -> None:
        """SIGKILL the whole worker (main process and pool children) at once, like a lost host."""
        if self.process is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        # Children may be reaped by init a moment later; make sure none is left training.
        wait_until(lambda: not self.child_pids(), 10, f"pool children of {self.name} to exit")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Warm shutdown (SIGTERM: running tasks finish); after `timeout_s`, SIGKILL of the process group."""
        if self.process is None:
            return
        if self.alive:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def log_text(self) -> str:
        """What this worker run wrote to its log file so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """The last `lines` lines of this worker run's log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> CeleryWorker:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
