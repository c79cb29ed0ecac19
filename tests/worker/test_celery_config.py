"""Worker settings and the Celery app's reliability configuration."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.queue import MAX_TASK_TIME_S, TRAIN_QUEUE, TRAIN_TASK_NAME, task_time_limits
from dae.spec import MAX_RUNTIME_S, TrainingSpec
from worker.celery_app import create_app
from worker.config import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DAE_REDIS_URL", "DAE_STORE_DIR", "DAE_VISIBILITY_TIMEOUT_S", "DAE_MAX_TASKS_PER_CHILD"):
        monkeypatch.delenv(name, raising=False)
    settings = WorkerSettings()
    assert str(settings.redis_url) == "redis://127.0.0.1:6379/0"
    assert settings.store_dir == Path("./var/store")
    # Longer than the longest job a spec may ask for, plus its export margin and hard-limit grace.
    assert settings.visibility_timeout_s > MAX_TASK_TIME_S > MAX_RUNTIME_S
    assert settings.max_tasks_per_child == 1
    # Production recovery: a lost worker's job is queued again within a lease lifetime and two reaper sweeps.
    assert (settings.lease_ttl_s, settings.lease_renew_s, settings.reaper_interval_s) == (30, 5, 5)
    assert settings.requeue_queued_after_s == 60 and settings.max_attempts == 3
    assert settings.job_retention_days == 30


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DAE_REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("DAE_STORE_DIR", "/tmp/somewhere")
    monkeypatch.setenv("DAE_VISIBILITY_TIMEOUT_S", "7")
    monkeypatch.setenv("DAE_MAX_TASKS_PER_CHILD", "50")
    settings = WorkerSettings()
    assert str(settings.redis_url) == "redis://example:6380/2"
    assert settings.store_dir == Path("/tmp/somewhere")
    assert settings.visibility_timeout_s == 7
    assert settings.max_tasks_per_child == 50


def test_lease_must_be_renewed_before_it_expires() -> None:
    with pytest.raises(ValidationError, match="lease_renew_s < lease_ttl_s"):
        WorkerSettings(lease_ttl_s=5, lease_renew_s=5)
    with pytest.raises(ValidationError):
        WorkerSettings(visibility_timeout_s=0)


def test_app_reliability_settings() -> None:
    settings = WorkerSettings(redis_url="redis://127.0.0.1:6390/0", visibility_timeout_s=123,
                              unacked_restore_interval_s=2, max_tasks_per_child=7, concurrency=3)
    conf = create_app(settings).conf
    assert conf.broker_url == "redis://127.0.0.1:6390/0"
    assert conf.task_serializer == "json" and conf.result_serializer == "json"
    assert list(conf.accept_content) == ["json"]
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_max_tasks_per_child == 7
    assert conf.worker_concurrency == 3
    assert conf.task_ignore_result is True and not conf.result_backend
    assert conf.broker_transport_options == {
        "visibility_timeout": 123, "unacked_restore_interval": 2, "unacked_restore_throttle": 1,
        "unacked_key": "unacked", "unacked_index_key": "unacked_index",
    }
    assert conf.task_routes[TRAIN_TASK_NAME] == {"queue": TRAIN_QUEUE}
    assert conf.task_default_queue == TRAIN_QUEUE
    # Backstop limits equal those of the largest allowed job.
    assert (conf.task_soft_time_limit, conf.task_time_limit) == task_time_limits(
        TrainingSpec(max_runtime_s=MAX_RUNTIME_S)
    )


def test_train_task_is_registered_by_name_with_late_acks() -> None:
    from worker.celery_app import app
    from worker.tasks import TrainRequest, TrainTask

    assert TRAIN_TASK_NAME == "dae.train"
    train = app.tasks[TRAIN_TASK_NAME]
    assert isinstance(train, TrainTask)
    assert train.acks_late is True and train.reject_on_worker_lost is True
    assert train.Request is TrainRequest  # notes a pool child's death and frees its lease
    assert train.ignore_result is True


def test_worker_modules_do_not_import_tensorflow() -> None:
    """TensorFlow must load in the pool child, after the fork, never in the worker's main process."""
    code = (
        "import sys, worker.celery_app, worker.tasks, worker.config;"
        "loaded = [m for m in ('tensorflow', 'keras', 'tf2onnx') if m in sys.modules];"
        "print(','.join(loaded) or 'none')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=120, check=True)
    assert result.stdout.strip() == "none"
