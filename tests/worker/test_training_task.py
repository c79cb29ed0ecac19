"""dae.train end to end: a real redis-server, real `celery worker` subprocesses, tiny real training jobs.

One worker serves the whole module (TensorFlow is imported once per pool child, ~5 s); the burst test adds a
second one, and the fault test (last) kills the module's worker and starts a replacement. Jobs are enqueued
the way the gateway does it: AttemptStore.create + send_task by name with the job's time limits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

from core.attempts import AttemptStore
from core.checkpoints import CheckpointStore
from core.store import ModelStore
from dae.spec import JobRecord, JobState, TrainingSpec
from testing.processes import CeleryWorker, enqueue, make_producer, wait_until

pytestmark = pytest.mark.slow

#: A dense DAE on 8x8 digits: trains in well under a second per epoch at batch 32.
TINY_MODEL = {"type": "dense", "hidden_units": [32], "latent_dim": 8}
#: Visibility timeout of the module's workers: longer than any job here, so no healthy job is redelivered.
LONG_VISIBILITY_S = 600.0
JOB_TIMEOUT_S = 150.0


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-store")


@pytest.fixture(scope="module")
def store(store_root: Path) -> ModelStore:
    return ModelStore(store_root)


@pytest.fixture(scope="module")
def jobs(redis_url: str) -> Iterator[AttemptStore]:
    client = redis.Redis.from_url(redis_url)
    yield AttemptStore(client)  # the default "dae:" prefix: the worker's
    client.close()


@pytest.fixture(scope="module")
def producer(redis_url: str) -> Celery:
    return make_producer(redis_url)


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("worker-logs")


@pytest.fixture(scope="module")
def worker(redis_url: str, store_root: Path, logs: Path) -> Iterator[CeleryWorker]:
    worker = CeleryWorker(redis_url=redis_url, store_dir=store_root, log_path=logs / "worker-a.log", name="a",
                          visibility_timeout_s=LONG_VISIBILITY_S).start()
    yield worker
    worker.stop()


def submit(jobs: AttemptStore, producer: Celery, **spec_fields: Any) -> JobRecord:
    fields = {"dataset": "digits", "architecture": TINY_MODEL, "epochs": 2, "batch_size": 32,
              "max_train_images": 200, **spec_fields}
    record, created = jobs.create(TrainingSpec.model_validate(fields))
    assert created
    enqueue(producer, record)
    return record


def wait_finished(jobs: AttemptStore, job_id: str, worker: CeleryWorker, timeout_s: float = JOB_TIMEOUT_S) -> JobRecord:
    wait_until(lambda: jobs.get(job_id).state.is_terminal, timeout_s, f"job {job_id} to finish", worker)
    return jobs.get(job_id)


def models_of_job(store: ModelStore, job_id: str) -> list[str]:
    cards, _total = store.list_models(limit=10_000)
    return [card.id for card in cards if card.job_id == job_id]


def test_job_runs_to_success_with_one_event_per_epoch(
    worker: CeleryWorker, jobs: AttemptStore, producer: Celery, store: ModelStore
) -> None:
    record = submit(jobs, producer, epochs=3)
    # Follow the events live, as the gateway's SSE endpoint does, until the terminal state event.
    events: list[dict[str, Any]] = []
    last_id = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (events and events[-1]["type"] == "state" and JobState(events[-1]["state"]).is_terminal):
        assert time.monotonic() < deadline, f"no terminal event; got {events}\n{worker.log_tail()}"
        for event_id, payload in jobs.read_events(record.id, last_id, 1000):
            last_id = event_id
            events.append(payload)

    summary = [(e["type"], e.get("state") or e["epoch"]) for e in events]
    assert summary == [("state", "queued"), ("state", "running"), ("epoch", 1), ("epoch", 2), ("epoch", 3),
                       ("state", "succeeded")], worker.log_tail()
    epoch_events = [e for e in events if e["type"] == "epoch"]
    assert all(e["epochs"] == 3 and e["loss"] > 0 and e["val_loss"] is not None for e in epoch_events)
    assert epoch_events[-1]["eta_s"] == 0

    final = jobs.get(record.id)
    assert final.state == JobState.succeeded and final.attempts == 1
    assert final.started_at is not None and final.finished_at is not None and final.finished_at > final.started_at
    assert [entry.epoch for entry in final.history] == [1, 2, 3]
    assert final.stop_reason == "completed" and final.failure_reason is None
    assert final.worker is not None and ":" in final.worker
    card = store.read_card(final.model_id)
    assert card.job_id == record.id and card.spec == record.spec and len(card.history) == 3
    assert store.artifact_path(card.id, "model.onnx").stat().st_size > 0
    assert store.artifact_path(card.id, "model.keras").stat().st_size > 0
    assert events[-1]["model_id"] == card.id
    # A finished job's checkpoints are dropped right after its final state is recorded (never before).
    wait_until(lambda: not (CheckpointStore(store.root).directory / record.id).exists(), 10, "the checkpoints to go", worker)
    assert models_of_job(store, record.id) == [card.id]
    # The pool child's evaluation helper computed the model-independent rows (dae.evaluation.helper): it started, and the
    # table is complete.
    log = worker.log_text()
    assert "evaluation helper process" in log and "could not start the evaluation helper" not in log, log[-3000:]
    assert "computing the reference rows inline" not in log
    assert [row.method for row in card.evaluation[:4]] == ["noisy", "model", "tv", "nl_means"]


def test_cancel_mid_training_stops_within_an_epoch(
    worker: CeleryWorker, jobs: AttemptStore, producer: Celery, store: ModelStore
) -> None:
    # Batch 1 over ~720 images: ~720 steps (~1.5 s) per epoch, several times the cancel poll (0.25 s), so the cancel
    # lands in the middle of the run however fast the machine.
    record = submit(jobs, producer, epochs=30, batch_size=1, max_train_images=800)
    wait_until(lambda: jobs.get(record.id).progress is not None, JOB_TIMEOUT_S, "epoch 1 to finish", worker)
    epoch_at_cancel = jobs.get(record.id).progress.epoch
    requested = jobs.request_cancel(record.id)
    assert requested.state in (JobState.cancelling, JobState.cancelled)
    cancelled_at = time.monotonic()
    final = wait_finished(jobs, record.id, worker)
    seconds_to_stop = time.monotonic() - cancelled_at

    assert final.state == JobState.cancelled, final.failure_reason
    assert final.stop_reason == "cancelled" and final.model_id is None
    assert epoch_at_cancel <= final.progress.epoch <= epoch_at_cancel + 1
    assert final.progress.epoch < 30
    epoch_seconds = final.history[-1].elapsed_s / final.history[-1].epoch
    assert seconds_to_stop < 2 * epoch_seconds + 5, (seconds_to_stop, epoch_seconds)
    # Its checkpoints are removed once the cancel is recorded, and nothing was published.
    wait_until(lambda: not (CheckpointStore(store.root).directory / record.id).exists(), 10, "the checkpoints to go", worker)
    assert models_of_job(store, record.id) == []
    states = [e["state"] for _id, e in jobs.read_events(record.id, None, 0) if e["type"] == "state"]
    assert states == ["queued", "running", "cancelling", "cancelled"]
    # Cancelling again is idempotent.
    assert jobs.request_cancel(record.id).state == JobState.cancelled


def test_failures_are_recorded_and_the_worker_survives(
    worker: CeleryWorker, jobs: AttemptStore, producer: Celery, store: ModelStore
) -> None:
    missing = submit(jobs, producer, dataset="ds_0123456789ab")
    diverging = submit(jobs, producer, epochs=3,
                       optimizer={"type": "sgd", "learning_rate": 10, "momentum": 0.99},
                       architecture={**TINY_MODEL, "activation": "elu"})
    healthy = submit(jobs, producer, epochs=1)

    failed_missing = wait_finished(jobs, missing.id, worker)
    assert failed_missing.state == JobState.failed
    assert "ds_0123456789ab" in failed_missing.failure_reason
    assert "Upload it again or pick another dataset" in failed_missing.failure_reason

    failed_diverging = wait_finished(jobs, diverging.id, worker)
    assert failed_diverging.state == JobState.failed
    assert "learning rate" in failed_diverging.failure_reason
    assert "epoch" in failed_diverging.failure_reason
    events = jobs.read_events(diverging.id, None, 0)
    assert events[-1][1]["state"] == "failed" and events[-1][1]["failure_reason"] == failed_diverging.failure_reason

    # The worker process lived through both and still trains.
    assert worker.alive
    assert wait_finished(jobs, healthy.id, worker).state == JobState.succeeded
    assert models_of_job(store, missing.id) == [] and models_of_job(store, diverging.id) == []


def test_burst_of_twenty_jobs_all_finish_on_two_workers(
    worker: CeleryWorker, jobs: AttemptStore, producer: Celery, store: ModelStore, redis_url: str, store_root: Path,
    logs: Path,
) -> None:
    """20 jobs at once, two competing workers: none lost, none run twice.

    Publishing a model costs seconds on a busy 2-core machine (ONNX export, baselines, plots), so 4 jobs train
    and publish; 8 are cancelled by their user while still queued (the worker must skip them) and 8 point at
    a missing upload (they fail fast, after a real attempt). Every one of the 20 messages is consumed, and a
    second message for one of the training jobs does not make it run twice.
    """
    second = CeleryWorker(redis_url=redis_url, store_dir=store_root, log_path=logs / "worker-b.log", name="b",
                          visibility_timeout_s=LONG_VISIBILITY_S).start()
    try:
        # Jobs take ~1 s now: without this, the warm first worker could drain the queue while b still imports.
        second.wait_until_warm()
        kinds = ["train"] * 4 + ["cancel"] * 8 + ["missing"] * 8
        order = [kinds[(i * 7) % 20] for i in range(20)]  # interleaved, deterministic
        records: list[tuple[str, JobRecord]] = []
        for kind in order:
            fields: dict[str, Any] = {"epochs": 1}
            if kind == "missing":
                fields["dataset"] = "ds_00000000dead"
            spec = TrainingSpec.model_validate({"dataset": "digits", "architecture": TINY_MODEL,
                                                "batch_size": 32, "max_train_images": 100, **fields})
            record, _ = jobs.create(spec)
            records.append((kind, record))
        for kind, record in records:
            enqueue(producer, record)
            if kind == "cancel":
                jobs.request_cancel(record.id)
        # A duplicate message for one training job (as a redelivery would make): it must still run only once.
        duplicated = next(record for kind, record in records if kind == "train")
        enqueue(producer, duplicated)

        ids = [record.id for _kind, record in records]
        wait_until(lambda: all(jobs.get(job_id).state.is_terminal for job_id in ids), 240,
                   "all 20 jobs to finish", worker)
        finals = {kind_record[1].id: (kind_record[0], jobs.get(kind_record[1].id)) for kind_record in records}
        expected_state = {"train": JobState.succeeded, "cancel": JobState.cancelled, "missing": JobState.failed}
        for job_id, (kind, final) in finals.items():
            assert final.state == expected_state[kind], (kind, final.state, final.failure_reason)
            assert final.attempts == (0 if kind == "cancel" else 1), (job_id, final.attempts)
            assert len(models_of_job(store, job_id)) == (1 if kind == "train" else 0)
        # Both workers took part (competing consumers on one queue).
        workers_used = {final.worker.rsplit(":", 1)[1] for kind, final in finals.values() if final.worker}
        assert len(workers_used) == 2, workers_used
        assert worker.alive and second.alive
    finally:
        second.stop()
