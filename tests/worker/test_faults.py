"""Faults, for real: SIGKILLed worker hosts and pool children, a SIGKILLed Redis, SIGTERM, SIGSTOP, lost messages.

Every test starts real processes (redis-server with AOF, `celery worker`, uvicorn where the gateway matters) and
asserts what a user sees: the job's state, history, attempts and models. Timings are short where a test is about
the mechanism; the lost-host test runs the production defaults, as its promise is about them.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from celery import Celery

from core.attempts import AttemptStore
from core.checkpoints import CheckpointStore
from core.store import ModelStore
from dae.spec import JobRecord, JobState, TrainingSpec
from testing.gateway import GatewayProcess
from testing.processes import CeleryWorker, enqueue, make_producer, wait_until
from testing.redis_server import RedisServer

pytestmark = pytest.mark.slow

TINY_MODEL = {"type": "dense", "hidden_units": [32], "latent_dim": 8}
#: ~90 steps of batch 4 per epoch on 8x8 digits: about a second an epoch, long enough to hit mid-training.
SLOW_EPOCHS = {"batch_size": 4, "max_train_images": 400}
JOB_TIMEOUT_S = 180.0


class Cluster:
    """A Redis (AOF) with its job store, producer and model store, and the workers a test starts."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.redis = RedisServer(root / "redis", appendonly=True)
        self.client = redis.Redis.from_url(self.redis.url, socket_timeout=5)
        self.jobs = AttemptStore(self.client)
        self.producer: Celery = make_producer(self.redis.url)
        self.store_dir = root / "store"
        self.store = ModelStore(self.store_dir)
        self.workers: list[CeleryWorker] = []

    def worker(self, name: str, **timings: Any) -> CeleryWorker:
        worker = CeleryWorker(redis_url=self.redis.url, store_dir=self.store_dir, log_path=self.root / f"{name}.log",
                              name=name, **timings).start()
        self.workers.append(worker)
        return worker

    def submit(self, **fields: Any) -> JobRecord:
        spec = TrainingSpec.model_validate({"dataset": "digits", "architecture": TINY_MODEL, "epochs": 2,
                                            "batch_size": 32, "max_train_images": 200, **fields})
        record, _created = self.jobs.create(spec)
        enqueue(self.producer, record)
        self.jobs.mark_dispatched(record.id)
        return record

    def get(self, job_id: str) -> JobRecord:
        return self.jobs.get(job_id)

    def wait_finished(self, job_id: str, worker: CeleryWorker | None, timeout_s: float = JOB_TIMEOUT_S) -> JobRecord:
        wait_until(lambda: self.get(job_id).state.is_terminal, timeout_s, f"job {job_id} to finish", worker)
        return self.get(job_id)

    def models_of(self, job_id: str) -> list[str]:
        cards, _total = self.store.list_models(limit=10_000)
        return [card.id for card in cards if card.job_id == job_id]

    def states(self, job_id: str) -> list[str]:
        return [e["state"] for _id, e in self.jobs.read_events(job_id, None, 0) if e["type"] == "state"]

    def holder_pid(self, job_id: str) -> tuple[int, int] | None:
        """(attempt, pid) of the attempt holding the job's lease, if any."""
        value = self.jobs.lease_holder(job_id)
        if value is None:
            return None
        attempt, owner, _token = value.split("|")
        return int(attempt), int(owner.rsplit(":", 1)[1])

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.client.close()
        self.redis.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(tmp_path)
    yield cluster
    cluster.close()


def owner_of(worker: CeleryWorker, pid: int) -> bool:
    return pid in worker.child_pids()


def test_a_lost_worker_host_is_recovered_at_production_defaults(cluster: Cluster) -> None:
    """Acceptance 1: every process of the worker SIGKILLed at epoch >= 2, a new worker started; production lease,
    reaper and visibility timeout. Training again within 120 s, resumed, one model, complete history."""
    production = {"visibility_timeout_s": None, "restore_interval_s": None, "lease_ttl_s": None,
                  "lease_renew_s": None, "reaper_interval_s": None, "requeue_queued_after_s": None}
    first = cluster.worker("host-a", **production).wait_until_warm()
    record = cluster.submit(epochs=6, **SLOW_EPOCHS)
    wait_until(lambda: (cluster.get(record.id).progress or 0) and cluster.get(record.id).progress.epoch >= 2,
               JOB_TIMEOUT_S, "epoch 2 to finish", first, interval_s=0.05)
    first.kill()
    killed_at = time.monotonic()
    at_kill = cluster.get(record.id)
    assert at_kill.state == JobState.running and at_kill.attempts == 1

    replacement = cluster.worker("host-b", **production)
    wait_until(lambda: cluster.get(record.id).attempts == 2, 120, "the job to train again", replacement)
    recovery_s = time.monotonic() - killed_at
    assert recovery_s < 120, recovery_s
    final = cluster.wait_finished(record.id, replacement)
    assert final.state == JobState.succeeded, (final.failure_reason, replacement.log_tail())
    assert final.attempts == 2 and final.lost_attempts == 1
    assert final.resumed_from_epoch is not None and final.resumed_from_epoch >= 2
    assert [entry.epoch for entry in final.history] == [1, 2, 3, 4, 5, 6]
    assert cluster.states(record.id) == ["queued", "running", "retrying", "running", "succeeded"]
    assert cluster.models_of(record.id) == [final.model_id]
    assert [entry.epoch for entry in cluster.store.read_card(final.model_id).history] == [1, 2, 3, 4, 5, 6]
    assert "queued it again" in replacement.log_text()  # the reaper, not the broker's 25 h visibility timeout
    wait_until(lambda: not (CheckpointStore(cluster.store.root).directory / record.id).exists(), 10, "the checkpoints to go")
    print(f"lost host: training again {recovery_s:.1f} s after the kill")  # noqa: T201 - the figure in README


@pytest.mark.parametrize("outage_s", [3, 45])
def test_a_redis_restart_mid_training_fails_nothing(cluster: Cluster, outage_s: float) -> None:
    """Acceptance 2: redis-server SIGKILLed mid-training, restarted from its AOF after `outage_s`. The job succeeds
    with its whole history and one model; meanwhile the gateway answers 503 fast and keeps serving models."""
    worker = cluster.worker("w", reaper_interval_s=2.0).wait_until_warm()
    served = cluster.submit(epochs=1)
    served_model = cluster.wait_finished(served.id, worker).model_id
    assert served_model is not None
    gateway = GatewayProcess(redis_url=cluster.redis.url, store_dir=cluster.store_dir,
                             log_path=cluster.root / "gateway.log").start()
    image = {"model": served_model, "pixels": np.full((8, 8), 0.5).tolist()}
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as http:
            assert http.post("/reconstruct", json=image).status_code == 200  # loaded before the outage
            record = cluster.submit(epochs=8, **SLOW_EPOCHS)
            wait_until(lambda: (cluster.get(record.id).progress or 0) and cluster.get(record.id).progress.epoch >= 2,
                       JOB_TIMEOUT_S, "epoch 2 to finish", worker, interval_s=0.05)
            cluster.redis.kill()
            down_since = time.monotonic()
            slowest = 0.0
            while time.monotonic() - down_since < outage_s:
                started = time.monotonic()
                answer = http.get(f"/jobs/{record.id}")
                slowest = max(slowest, time.monotonic() - started)
                assert answer.status_code == 503 and "Retry-After" in answer.headers, answer.text
                assert http.post("/reconstruct", json=image).status_code == 200
                time.sleep(0.5)
            assert slowest < 5, slowest
            print(f"Redis down {outage_s} s: slowest GET /jobs/{{id}} answer {slowest * 1000:.0f} ms")  # noqa: T201
            cluster.redis.start()
            final = cluster.wait_finished(record.id, worker)
            assert http.get(f"/jobs/{record.id}").json()["state"] == "succeeded"
    finally:
        gateway.stop()
    assert final.state == JobState.succeeded, (final.failure_reason, worker.log_tail())
    assert [entry.epoch for entry in final.history] == list(range(1, 9))
    assert cluster.models_of(record.id) == [final.model_id]
    assert worker.alive
    assert "Unexpected ConnectionError" not in worker.log_text()


def test_a_job_that_kills_its_pool_child_fails_after_max_attempts(cluster: Cluster) -> None:
    """Acceptance 3: the pool child dies (SIGKILL, as the kernel's OOM killer does) on every attempt."""
    worker = cluster.worker("w").wait_until_warm()
    record = cluster.submit(epochs=50, **SLOW_EPOCHS)
    killed: set[int] = set()

    def kill_each_attempt() -> bool:
        holder = cluster.holder_pid(record.id)
        if holder is not None and holder[0] not in killed:
            os.kill(holder[1], signal.SIGKILL)
            killed.add(holder[0])
        return cluster.get(record.id).state.is_terminal

    wait_until(kill_each_attempt, JOB_TIMEOUT_S, "the crash loop to end", worker, interval_s=0.05)
    final = cluster.get(record.id)
    assert final.state == JobState.failed and killed == {1, 2, 3}
    assert final.attempts == 3 and final.lost_attempts == 3
    assert final.failure_reason.startswith(
        "The worker process died during 3 attempts; last signal SIGKILL, possibly out of memory."), final.failure_reason
    # The worker lives on and takes the next job.
    healthy = cluster.submit(epochs=1)
    assert cluster.wait_finished(healthy.id, worker).state == JobState.succeeded
    assert worker.alive


def test_sigterm_hands_the_job_to_an_idle_worker(cluster: Cluster) -> None:
    """Acceptance 4: SIGTERM to the worker running a job; a second, idle worker resumes it within 30 s."""
    workers = [cluster.worker("one").wait_until_warm(), cluster.worker("two").wait_until_warm()]
    record = cluster.submit(epochs=500, **SLOW_EPOCHS)  # far longer than the test: it is cancelled at the end
    wait_until(lambda: (cluster.get(record.id).progress or 0) and cluster.get(record.id).progress.epoch >= 1,
               JOB_TIMEOUT_S, "epoch 1 to finish", workers[0], interval_s=0.05)
    running = next(worker for worker in workers if owner_of(worker, cluster.holder_pid(record.id)[1]))
    idle = workers[1 - workers.index(running)]
    running.process.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    wait_until(lambda: (holder := cluster.holder_pid(record.id)) is not None and owner_of(idle, holder[1]), 30,
               "the idle worker to resume the job", idle)
    handed_off_s = time.monotonic() - stopped_at
    assert handed_off_s < 30
    print(f"SIGTERM: the second worker trains the job {handed_off_s:.1f} s later")  # noqa: T201 - README figure
    running.process.wait(timeout=30)  # the stopped worker finished its warm shutdown
    assert running.process.returncode == 0, running.log_tail()
    resumed = cluster.get(record.id)
    assert resumed.attempts == 2 and resumed.lost_attempts == 0 and resumed.state == JobState.running
    assert "handed off after epoch" in running.log_text()
    cluster.jobs.request_cancel(record.id)
    final = cluster.wait_finished(record.id, idle)
    assert final.state == JobState.cancelled and final.resumed_from_epoch >= 1
    assert cluster.states(record.id) == ["queued", "running", "retrying", "running", "cancelling", "cancelled"]
    wait_until(lambda: not (CheckpointStore(cluster.store.root).directory / record.id).exists(), 10,
               "a cancelled job's checkpoints to go", idle)


def test_a_job_whose_message_was_lost_is_queued_again(cluster: Cluster) -> None:
    """Acceptance 5: the record was written but its message never reached the broker (gateway crash)."""
    worker = cluster.worker("w", requeue_queued_after_s=3.0)
    spec = TrainingSpec.model_validate({"dataset": "digits", "architecture": TINY_MODEL, "epochs": 1,
                                        "batch_size": 32, "max_train_images": 200})
    record, _created = cluster.jobs.create(spec)  # ...and no send
    final = cluster.wait_finished(record.id, worker, timeout_s=90)
    assert final.state == JobState.succeeded and final.attempts == 1
    assert cluster.models_of(record.id) == [final.model_id]
    assert f"job {record.id} was queued with no live attempt and no message" in worker.log_text()


def test_a_stalled_attempt_whose_lease_was_taken_publishes_nothing(cluster: Cluster) -> None:
    """Acceptance 6: attempt 1 is frozen (SIGSTOP) past its lease, attempt 2 takes over on another worker, then
    attempt 1 wakes up while attempt 2 runs. One model, one final state."""
    workers = [cluster.worker("one").wait_until_warm(), cluster.worker("two").wait_until_warm()]
    record = cluster.submit(epochs=10, **SLOW_EPOCHS)
    wait_until(lambda: (cluster.get(record.id).progress or 0) and cluster.get(record.id).progress.epoch >= 1,
               JOB_TIMEOUT_S, "epoch 1 to finish", workers[0], interval_s=0.05)
    _attempt, stalled_pid = cluster.holder_pid(record.id)
    stalled = next(worker for worker in workers if owner_of(worker, stalled_pid))
    other = workers[1 - workers.index(stalled)]
    os.kill(stalled_pid, signal.SIGSTOP)
    try:
        wait_until(lambda: (holder := cluster.holder_pid(record.id)) is not None and holder[0] == 2, 90,
                   "attempt 2 to take over", other)
    finally:
        os.kill(stalled_pid, signal.SIGCONT)
    final = cluster.wait_finished(record.id, other)
    assert final.state == JobState.succeeded and final.attempts == 2
    assert owner_of(other, int(final.worker.rsplit(":", 1)[1]))
    assert cluster.models_of(record.id) == [final.model_id]
    assert cluster.states(record.id).count("succeeded") == 1
    wait_until(lambda: "lost its lease" in stalled.log_text() or "stops:" in stalled.log_text(), 30,
               "the stale attempt to notice", stalled)
    assert [entry.epoch for entry in final.history] == list(range(1, 11))
