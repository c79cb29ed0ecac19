"""The task's decisions that need no training: skips, lease contention, redelivery, failure reasons.

Real Redis and a real model store; the training itself is covered by test_training_task.py.
"""

from __future__ import annotations

import errno
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from billiard.exceptions import WorkerLostError
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from core.attempts import AttemptStore
from core.checkpoints import CheckpointStore
from core.jobs import new_job_id
from core.store import ModelStore, is_model_id, model_id_for_job
from dae.errors import Conflict, DatasetNotFound, TrainingFailed
from dae.publish import default_model_name
from dae.spec import JobState, ModelCard, TrainingSpec
from worker import tasks
from worker.config import WorkerSettings


@pytest.fixture
def jobs(redis_client: redis.Redis) -> AttemptStore:
    return AttemptStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:")


@pytest.fixture
def settings(redis_url: str, store_dir: Path) -> WorkerSettings:
    return WorkerSettings(redis_url=redis_url, store_dir=store_dir, lease_ttl_s=2, lease_renew_s=0.5)


def spec() -> TrainingSpec:
    return TrainingSpec.model_validate({"dataset": "digits", "architecture": {"type": "dense"}, "epochs": 2})


def states(jobs: AttemptStore, job_id: str) -> list[str]:
    return [event["state"] for _id, event in jobs.read_events(job_id, None, 0) if event["type"] == "state"]


def publish_fake_model(store: ModelStore, job_id: str) -> ModelCard:
    """A published model card for `job_id` under the id its training would give it (its files do not matter)."""
    name = default_model_name(spec())
    card = ModelCard(id=model_id_for_job(job_id), name=name, version=store.reserve_version(name), job_id=job_id,
                     created_at=datetime.now(UTC), spec=spec(), input_shape=[8, 8, 1], trained_shape=[8, 8, 1],
                     parameters=10, stop_reason="completed")
    return store.publish_model(store.staging_dir(), card)


def test_finished_and_unknown_jobs_are_skipped(jobs: AttemptStore, settings: WorkerSettings, store_dir: Path) -> None:
    store = ModelStore(store_dir)
    record, _ = jobs.create(spec())
    jobs.request_cancel(record.id)
    assert tasks.run_job(record.id, settings=settings, jobs=jobs, store=store) == tasks.SKIPPED
    assert jobs.get(record.id).state == JobState.cancelled and jobs.get(record.id).attempts == 0
    assert tasks.run_job(new_job_id(), settings=settings, jobs=jobs, store=store) == tasks.SKIPPED


def test_a_leased_job_is_left_to_its_holder(jobs: AttemptStore, settings: WorkerSettings, store_dir: Path) -> None:
    record, _ = jobs.create(spec())
    holder = jobs.lease(record.id, owner="other-host:1", ttl_s=5)
    assert jobs.start_attempt(record.id, holder, max_lost_attempts=3)[0] == "started"
    outcome = tasks.run_job(record.id, settings=settings, jobs=jobs, store=ModelStore(store_dir))
    assert outcome == tasks.BUSY
    assert jobs.get(record.id).attempts == 1
    assert jobs.lease_holder(record.id) == holder.value  # the duplicate did not touch the holder's lease


def test_redelivered_cancelling_job_ends_cancelled_and_drops_its_checkpoints(
    jobs: AttemptStore, settings: WorkerSettings, store_dir: Path
) -> None:
    store = ModelStore(store_dir)
    record, _ = jobs.create(spec())
    lost = jobs.lease(record.id, owner="lost:1", ttl_s=5)
    jobs.start_attempt(record.id, lost, max_lost_attempts=3)
    (CheckpointStore(store.root).attempt_dir(record.id, 1) / "state.json").write_text("{}")
    jobs.request_cancel(record.id)  # then the worker died before it saw the flag
    jobs.record_lost_process(record.id, owner="lost:1", exit_note="signal SIGKILL")
    outcome = tasks.run_job(record.id, settings=settings, jobs=jobs, store=store)
    assert outcome == tasks.CANCELLED
    assert jobs.get(record.id).state == JobState.cancelled
    assert jobs.lease_holder(record.id) is None
    assert not (CheckpointStore(store.root).directory / record.id).exists()


def test_redelivery_after_publishing_does_not_publish_again(
    jobs: AttemptStore, settings: WorkerSettings, store_dir: Path
) -> None:
    store = ModelStore(store_dir)
    record, _ = jobs.create(spec())
    lost = jobs.lease(record.id, owner="lost:1", ttl_s=5)
    jobs.start_attempt(record.id, lost, max_lost_attempts=3)
    publish_fake_model(store, new_job_id())  # another job's model of the same name
    card = publish_fake_model(store, record.id)  # the lost attempt got this far
    jobs.record_lost_process(record.id, owner="lost:1", exit_note="signal SIGKILL")
    outcome = tasks.run_job(record.id, settings=settings, jobs=jobs, store=store)
    assert outcome == tasks.SUCCEEDED
    final = jobs.get(record.id)
    assert final.state == JobState.succeeded and final.model_id == card.id
    assert final.attempts == 2 and final.lost_attempts == 1  # the second attempt only recorded the model
    assert states(jobs, record.id) == ["queued", "running", "retrying", "running", "succeeded"]
    assert store.list_models(name=card.name)[1] == 2
    # A second publish under the same job's id is refused by the store: one job, one model.
    with pytest.raises(Conflict):
        publish_fake_model(store, record.id)
    assert store.list_models(name=card.name)[1] == 2


def test_a_job_model_id_is_derived_from_the_job_id() -> None:
    job_id = new_job_id()
    assert model_id_for_job(job_id) == model_id_for_job(job_id) != model_id_for_job(new_job_id())
    assert is_model_id(model_id_for_job(job_id))


def test_how_a_pool_child_died_is_read_from_celery() -> None:
    assert tasks.exit_note(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 3.")) == "signal SIGKILL"
    assert tasks.exit_note(WorkerLostError("Worker exited prematurely: exitcode 70 Job: 1.")) == "exit code 70"
    assert tasks.exit_note(SystemExit(3)) == "exit code 3"


def test_failure_reasons_are_actionable() -> None:
    job_spec = spec()
    disk_full = OSError(errno.ENOSPC, "No space left on device", "/store/tmp/x")
    assert "disk space" in tasks.failure_reason(disk_full, job_spec)
    assert "DAE_STORE_DIR" in tasks.failure_reason(disk_full, job_spec)
    nan = TrainingFailed("loss became NaN at epoch 3; lower the learning rate")
    assert tasks.failure_reason(nan, job_spec) == nan.message
    missing = tasks.failure_reason(DatasetNotFound("No dataset ds_0123456789ab."), job_spec)
    assert "'digits'" in missing and "ds_0123456789ab" in missing
    soft = tasks.failure_reason(SoftTimeLimitExceeded(), job_spec)
    assert "time limit of 870 s" in soft and "max_runtime_s=270" in soft  # the default budget + 600 s
    assert "Invalid values" in tasks.failure_reason(ValueError("pixel 3 is inf"), job_spec)
    assert "RuntimeError" in tasks.failure_reason(RuntimeError("boom"), job_spec)


def test_hard_time_limit_is_recorded(jobs: AttemptStore, monkeypatch: pytest.MonkeyPatch) -> None:
    record, _ = jobs.create(spec().model_copy(update={"max_runtime_s": 3600}))  # hard limit 4320 s
    jobs.mark_running(record.id, worker="w:1")
    task = tasks.app.tasks["dae.train"]
    monkeypatch.setattr(task, "_jobs", (os.getpid(), jobs))
    task.on_failure(TimeLimitExceeded(4320), "task-id", [record.id], {}, None)
    final = jobs.get(record.id)
    assert final.state == JobState.failed and "4320 s" in final.failure_reason
    # Other failures are the task's own business (already recorded by run_job).
    other, _ = jobs.create(spec())
    task.on_failure(RuntimeError("x"), "task-id", [other.id], {}, None)
    assert jobs.get(other.id).state == JobState.queued
