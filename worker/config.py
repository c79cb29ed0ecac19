"""Settings of a worker process, read from `DAE_*` environment variables (one `get_settings()`)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator

from core.leases import DEFAULT_LEASE_RENEW_S, DEFAULT_LEASE_TTL_S
from core.settings import SharedSettings


class WorkerSettings(SharedSettings):
    """Everything a worker can be configured with; each field maps to `DAE_<FIELD NAME>`."""

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
    lease_ttl_s: float = Field(
        DEFAULT_LEASE_TTL_S, gt=0,
        description="Lifetime of a running attempt's lease; a lost worker's job is picked up again after it.",
    )
    lease_renew_s: float = Field(DEFAULT_LEASE_RENEW_S, gt=0, description="How often a running attempt renews its lease.")
    reaper_interval_s: float = Field(
        5.0, gt=0, le=300,
        description="How often the reaper (one worker at a time) looks for jobs without a live attempt or a message.",
    )
    requeue_queued_after_s: float = Field(
        60.0, gt=0,
        description="A queued job with no message for this long (its send was lost) is queued again by the reaper.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts whose worker process died (killed, out of memory) before the job fails."
    )

    @model_validator(mode="after")
    def _renew_before_expiry(self) -> WorkerSettings:
        if self.lease_renew_s >= self.lease_ttl_s:
            raise ValueError(
                "The lease must be renewed before it expires. Expected lease_renew_s < lease_ttl_s. "
                f"Received: lease_renew_s={self.lease_renew_s}, lease_ttl_s={self.lease_ttl_s}"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The process-wide worker settings, read from the environment once."""
    return WorkerSettings()
