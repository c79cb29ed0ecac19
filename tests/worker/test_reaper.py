"""The reaper's decisions, sweep by sweep, against a real redis-server and real Celery messages (no worker).

A dedicated Redis per test: the reaper reads the broker's queue and unacked keys, which other tests' workers share.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from core.attempts import AttemptStore
from core.checkpoints import CheckpointStore
from core.queue import TRAIN_QUEUE
from core.store import ModelStore
from dae.spec import JobState, TrainingSpec
from testing.processes import enqueue, make_producer
from testing.redis_server import RedisServer
from worker.reaper import Reaper, _job_id_of


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture
def client(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


@pytest.fixture
def jobs(client: redis.Redis) -> AttemptStore:
    return AttemptStore(client)


@pytest.fixture
def producer(server: RedisServer) -> Celery:
    return make_producer(server.url)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def reaper(jobs: AttemptStore, producer: Celery, store: ModelStore, requeue_queued_after_s: float = 60.0) -> Reaper:
    return Reaper(jobs, producer, store, interval_s=1.0, requeue_queued_after_s=requeue_queued_after_s)


def spec() -> TrainingSpec:
    return TrainingSpec.model_validate({"dataset": "digits", "epochs": 1})


def queued_ids(client: redis.Redis) -> list[str]:
    return [_job_id_of(raw) for raw in client.lrange(TRAIN_QUEUE, 0, -1)]


def test_a_queued_job_without_a_message_is_queued_again_after_two_sweeps(
    jobs: AttemptStore, producer: Celery, store: ModelStore, client: redis.Redis
) -> None:
    lost, _ = jobs.create(spec())  # the gateway died before sending
    sent, _ = jobs.create(spec())
    enqueue(producer, sent)
    also_lost, _ = jobs.create(spec())
    sweeper = reaper(jobs, producer, store, requeue_queued_after_s=0.5)
    time.sleep(0.6)
    too_young, _ = jobs.create(spec())  # may still be being sent: too young to judge
    first = sweeper.sweep()
    assert first.requeued == [] and set(first.suspected) == {lost.id, also_lost.id}
    second = sweeper.sweep()
    assert sorted(second.requeued) == sorted([lost.id, also_lost.id])
    assert sorted(queued_ids(client)) == sorted([sent.id, lost.id, also_lost.id])
    assert too_young.id not in second.suspected
    # Messages waiting now: nothing more is sent, however many sweeps follow.
    assert sweeper.sweep().requeued == [] and sweeper.sweep().requeued == []
    assert len(queued_ids(client)) == 3


def test_a_running_job_whose_lease_expired_is_queued_again(
    jobs: AttemptStore, producer: Celery, store: ModelStore, client: redis.Redis
) -> None:
    alive, _ = jobs.create(spec())
    dead, _ = jobs.create(spec())
    for record, ttl in ((alive, 30.0), (dead, 0.2)):
        lease = jobs.lease(record.id, owner="host:1", ttl_s=ttl)
        assert jobs.start_attempt(record.id, lease, max_lost_attempts=3)[0] == "started"
    time.sleep(0.3)
    sweeper = reaper(jobs, producer, store)
    assert sweeper.sweep().suspected == [dead.id]
    assert sweeper.sweep().requeued == [dead.id]
    assert queued_ids(client) == [dead.id]
    assert jobs.get(dead.id).state == JobState.running  # the next attempt counts the loss when it starts


def test_a_suspect_that_recovers_between_sweeps_is_left_alone(
    jobs: AttemptStore, producer: Celery, store: ModelStore, client: redis.Redis
) -> None:
    record, _ = jobs.create(spec())
    lease = jobs.lease(record.id, owner="host:1", ttl_s=0.2)
    jobs.start_attempt(record.id, lease, max_lost_attempts=3)
    time.sleep(0.3)  # Redis was away past the lease's lifetime...
    sweeper = reaper(jobs, producer, store)
    assert sweeper.sweep().suspected == [record.id]
    assert lease.renew()  # ...and the live attempt took its lease back first
    assert sweeper.sweep().requeued == []
    assert queued_ids(client) == []


def test_a_cancelling_job_whose_worker_was_lost_ends_cancelled(
    jobs: AttemptStore, producer: Celery, store: ModelStore
) -> None:
    record, _ = jobs.create(spec())
    lease = jobs.lease(record.id, owner="host:1", ttl_s=0.2)
    jobs.start_attempt(record.id, lease, max_lost_attempts=3)
    (CheckpointStore(store.root).attempt_dir(record.id, 1) / "state.json").write_text("{}")
    jobs.request_cancel(record.id)
    time.sleep(0.3)
    sweeper = reaper(jobs, producer, store)
    sweeper.sweep()
    assert sweeper.sweep().cancelled == [record.id]
    final = jobs.get(record.id)
    assert final.state == JobState.cancelled and final.stop_reason == "cancelled"
    assert not (CheckpointStore(store.root).directory / record.id).exists()


def test_one_reaper_sweeps_at_a_time(jobs: AttemptStore, producer: Celery, store: ModelStore) -> None:
    first, second = reaper(jobs, producer, store), reaper(jobs, producer, store)
    assert first.sweep() is not None
    assert second.sweep() is None  # the turn is the first's while it keeps sweeping
    assert first.sweep() is not None


def test_messages_taken_by_a_worker_count_until_they_are_old(
    jobs: AttemptStore, producer: Celery, store: ModelStore, client: redis.Redis
) -> None:
    record, _ = jobs.create(spec())
    enqueue(producer, record)
    client.hset(jobs.job_key(record.id), "dispatched", str(time.time() - 10))  # sent long ago
    # A worker took the message just now (it moved to the unacked set) and died before starting the job.
    raw = client.rpop(TRAIN_QUEUE)
    client.hset("unacked", "tag-1", f'[{raw.decode()}, "", "{TRAIN_QUEUE}"]')
    client.zadd("unacked_index", {"tag-1": time.time()})
    sweeper = reaper(jobs, producer, store, requeue_queued_after_s=0.5)
    assert sweeper.sweep().suspected == []  # delivered just now: a worker is starting it
    client.zadd("unacked_index", {"tag-1": time.time() - 10})  # ...long ago, and it never started
    assert sweeper.sweep().suspected == [record.id]
    assert sweeper.sweep().requeued == [record.id]
    assert queued_ids(client) == [record.id]
