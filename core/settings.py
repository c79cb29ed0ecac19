"""The settings the gateway and the workers share, defined once: each process's Settings class extends this one,
so both read the same `DAE_*` variable with the same default (a worker and a gateway left at their defaults meet
on the same Redis and the same store)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, RedisDsn
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.jobs import DEFAULT_RETENTION_DAYS
from core.queue import DEFAULT_VISIBILITY_TIMEOUT_S


class SharedSettings(BaseSettings):
    """What both processes are configured with; each field maps to `DAE_<FIELD NAME>`."""

    model_config = SettingsConfigDict(env_prefix="DAE_", extra="ignore", frozen=True)

    redis_url: RedisDsn = Field(
        RedisDsn("redis://127.0.0.1:6379/0"),
        description="Redis: the Celery broker, job records, progress events and attempt leases.",
    )
    store_dir: Path = Field(Path("./var/store"), description="The store shared by gateway and workers (models, "
                            "datasets, checkpoints).")
    visibility_timeout_s: float = Field(
        DEFAULT_VISIBILITY_TIMEOUT_S, gt=0,
        description="Seconds an unacknowledged message waits before the broker redelivers it (after a lost worker). "
        "Must exceed the longest job; tests use a few seconds to see a redelivery quickly.",
    )
    job_retention_days: float = Field(
        DEFAULT_RETENTION_DAYS, gt=0, description="Days a finished job's record and event stream are kept in Redis."
    )
