"""Attempt leases: the running attempt of a job holds "attempt|host:pid|token" under SET NX PX in Redis and renews
it every few seconds; the attempt number is the fencing token of every write it makes (core.jobs). A lost worker's
lease expires, and the reaper (worker/reaper.py) hands its job to a new attempt."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from core.jobs import JobStore

#: Lease of a running attempt: its lifetime and how often the holder renews it. A lost attempt's job is picked up
#: once its lease has expired (by the workers' reaper, worker/reaper.py).
DEFAULT_LEASE_TTL_S = 30.0
DEFAULT_LEASE_RENEW_S = 5.0
#: Hash field naming the attempt number that may hold the lease (the fencing token's reference).
ATTEMPT_FIELD = "attempt"


class LeaseLost(Exception):
    """This attempt no longer holds its job's lease: another attempt owns the job, so it must write nothing more."""


# Renew: our lease (compare-and-pexpire), or take it back after it expired during a Redis outage, but only while
# no newer attempt has started (the job's attempt field still names ours). 1 renewed, 0 lost.
RENEW_LEASE_LUA = """
local current = redis.call('get', KEYS[1])
if current == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if not current and redis.call('hget', KEYS[2], ARGV[3]) == ARGV[4] then
    redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
    return 1
end
return 0
"""
TAKE_TURN_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    return 1
end
return 0
"""
RELEASE_LEASE_LUA = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""
# KEYS: job hash, lease; ARGV: owner ("host:pid"), exit note. Frees the lease only if that process held it.
FREE_LOST_LEASE_LUA = """
redis.call('hset', KEYS[1], 'exit', ARGV[2])
local current = redis.call('get', KEYS[2])
if current and string.find(current, '|' .. ARGV[1] .. '|', 1, true) then
    return redis.call('del', KEYS[2])
end
return 0
"""


class JobLease:
    """One attempt's lease on its job: "attempt|owner|token" under SET NX PX, taken by JobStore.start_attempt.

    The attempt number is the fencing token: writes fenced with this lease (JobStore._update) succeed only while
    it is the job's current lease. `renew()` extends it; the holder renews every few seconds (worker/attempt.py).
    """

    def __init__(self, jobs: JobStore, job_id: str, *, owner: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"Expected a positive lease lifetime. Received: ttl_s={ttl_s}")
        if "|" in owner:
            raise ValueError(f"Expected an owner without '|'. Received: owner={owner!r}")
        self.jobs = jobs
        self.job_id = job_id
        self.owner = owner
        self.key = jobs.lease_key(job_id)
        self.ttl_ms = int(ttl_s * 1000)
        self.attempt = 0
        self.token = secrets.token_hex(8)

    @property
    def value(self) -> str:
        """What the lease key holds while this lease is current."""
        return f"{self.attempt}|{self.owner}|{self.token}"

    def renew(self) -> bool:
        """Extend the lease (or take it back after it expired, if no newer attempt started); False once lost."""
        keys = [self.key, self.jobs.job_key(self.job_id)]
        return bool(self.jobs._renew_lease(keys=keys, args=[self.value, self.ttl_ms, ATTEMPT_FIELD, self.attempt]))

    def release(self) -> bool:
        """Give the lease back if it is still ours (never deletes another attempt's lease)."""
        return bool(self.jobs._release_lease(keys=[self.key], args=[self.value]))
