"""Settings of a worker process, read from `DAE_*` environment variables (one `get_settings()`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, RedisDsn, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dae.jobs import DEFAULT_LOCK_REFRESH_S, DEFAULT_LOCK_TTL_S, MAX_TASK_TIME_S

#: Default broker visibility timeout: the longest possible task (hard limit of a job with the largest
#: allowed max_runtime_s, dae.jobs.MAX_TASK_TIME_S ≈ 24.2 h) plus an hour. The Redis transport redelivers a
#: message that stayed unacknowledged this long; with acks_late a task is acknowledged only when it ends, so
#: a shorter timeout would hand a healthy long job to a second worker while it still runs.
DEFAULT_VISIBILITY_TIMEOUT_S = int(MAX_TASK_TIME_S + 3600)


class WorkerSettings(BaseSettings):
    """Everything a worker can be configured with; each field maps to `DAE_<FIELD NAME>`."""

    model_config = SettingsConfigDict(env_prefix="DAE_", extra="ignore", frozen=True)

    redis_url: RedisDsn = Field(
        RedisDsn("redis://127.0.0.1:6379/0"), description="Redis: Celery broker, job records, events and locks."
    )
    store_dir: Path = Field(Path("./var/store"), description="The model store shared with the gateway.")
    visibility_timeout_s: float = Field(
        DEFAULT_VISIBILITY_TIMEOUT_S,
        gt=0,
        description=(
            "Seconds an unacknowledged message waits before the broker redelivers it (after a lost worker). "
            "Must exceed the longest job; tests use a few seconds to see a redelivery quickly."
        ),
    )
    unacked_restore_interval_s: float = Field(
        60.0,
        gt=0,
        description="How often a worker sweeps for messages whose visibility timeout has passed (also once at start).",
    )
    concurrency: int = Field(1, ge=1, le=64, description="Training jobs run at once per worker (pool children).")
    max_tasks_per_child: int = Field(
        1,
        ge=1,
        description=(
            "Jobs a pool child runs before it is replaced. 1 returns all TensorFlow memory after every job; "
            "higher saves the ~5 s TensorFlow import per job at the cost of memory that only grows."
        ),
    )
    lock_ttl_s: float = Field(
        DEFAULT_LOCK_TTL_S, gt=0, description="Lifetime of the per-job lock; a dead worker's job is free after it."
    )
    lock_refresh_s: float = Field(DEFAULT_LOCK_REFRESH_S, gt=0, description="How often a running job renews its lock.")

    @model_validator(mode="after")
    def _refresh_before_expiry(self) -> WorkerSettings:
        if self.lock_refresh_s >= self.lock_ttl_s:
            raise ValueError(
                "The job lock must be renewed before it expires. Expected lock_refresh_s < lock_ttl_s. "
                f"Received: lock_refresh_s={self.lock_refresh_s}, lock_ttl_s={self.lock_ttl_s}"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process-wide worker settings, read from the environment once."""
    return WorkerSettings()
