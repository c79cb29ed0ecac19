"""JobStore per owner, on the real test Redis: records, lists, counts, cancels, events and idempotency keys live
inside an owner; another owner's job is JobNotFound; an every-owner view lists all; old records and indexes
become the default owner's."""

from __future__ import annotations

import json
import time
import uuid

import pytest
import redis

from core.attempts import AttemptStore
from core.migrations import migrate_job_indexes
from dae.errors import Conflict, JobNotFound
from dae.spec import DEFAULT_OWNER, JobState, TrainingSpec


def spec(**fields: object) -> TrainingSpec:
    return TrainingSpec.model_validate({"dataset": "digits", "epochs": 1, **fields})


@pytest.fixture
def store(redis_client: redis.Redis) -> AttemptStore:
    return AttemptStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:")


def test_another_owners_job_is_not_found_for_reads_cancels_and_events(store: AttemptStore) -> None:
    a, b = store.with_owner("team-a"), store.with_owner("team-b")
    theirs, _ = b.create(spec())
    assert theirs.owner == "team-b"
    for attempt in (lambda: a.get(theirs.id), lambda: a.request_cancel(theirs.id),
                    lambda: a.read_events(theirs.id, None, 0)):
        with pytest.raises(JobNotFound) as caught:
            attempt()
        assert "team-b" not in str(caught.value)
    assert b.get(theirs.id).state == JobState.queued  # the refused cancel changed nothing
    assert a.list() == ([], 0) and a.list(JobState.queued) == ([], 0)


def test_lists_are_per_owner_and_follow_state_changes(store: AttemptStore) -> None:
    a, b = store.with_owner("team-a"), store.with_owner("team-b")
    mine, _ = a.create(spec())
    theirs, _ = b.create(spec())
    assert [record.id for record in a.list()[0]] == [mine.id]
    store.mark_running(mine.id, worker="w:1")  # a worker's view: every write keeps both indexes in step
    assert a.list(JobState.queued) == ([], 0)
    assert [record.id for record in a.list(JobState.running)[0]] == [mine.id]
    admin = store.with_owner("ops", every_owner=True)
    assert {record.id for record in admin.list()[0]} == {mine.id, theirs.id}
    assert admin.get(theirs.id).owner == "team-b"
    assert a.request_cancel(mine.id).state == JobState.cancelling


def test_idempotency_keys_are_per_owner(store: AttemptStore) -> None:
    a, b = store.with_owner("team-a"), store.with_owner("team-b")
    first, created = a.create(spec(), idempotency_key="same-key")
    assert created
    other, created = b.create(spec(), idempotency_key="same-key")  # the same key and body: a job of its own
    assert created and other.id != first.id and other.owner == "team-b"
    with pytest.raises(Conflict) as caught:
        b.create(spec(epochs=2), idempotency_key="same-key")
    assert first.id not in str(caught.value) and other.id in str(caught.value)
    assert a.create(spec(), idempotency_key="same-key") == (first, False)


def test_a_legacy_idempotency_key_still_returns_the_default_owners_job(store: AttemptStore) -> None:
    default = store.with_owner(DEFAULT_OWNER)
    record, _ = default.create(spec())
    from dae.fingerprints import spec_fingerprint  # noqa: PLC0415

    store.client.set(default.legacy_idempotency_key("old-key"),
                     json.dumps({"job_id": record.id, "spec_sha256": spec_fingerprint(spec())}))
    assert default.create(spec(), idempotency_key="old-key") == (record, False)
    assert store.with_owner("team-a").create(spec(), idempotency_key="old-key")[1] is True  # never another's


def test_records_and_indexes_from_before_owners_become_the_default_owners(store: AttemptStore) -> None:
    record, _ = store.create(spec())
    raw = json.loads(store.client.hget(store.job_key(record.id), "record"))
    del raw["owner"]  # a record of the first wave
    store.client.hset(store.job_key(record.id), "record", json.dumps(raw))
    for key in (store.index_key(owner=DEFAULT_OWNER), store.index_key(JobState.queued, DEFAULT_OWNER)):
        store.client.delete(key)  # the first wave had only the global indexes
    assert store.list() == ([], 0)
    assert migrate_job_indexes(store) == 1
    assert [job.id for job in store.list()[0]] == [record.id]
    assert store.get(record.id).owner == DEFAULT_OWNER
    assert migrate_job_indexes(store) == 0  # once


def test_pruning_expired_jobs_empties_the_owners_indexes_too(redis_client: redis.Redis) -> None:
    store = AttemptStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:", retention_s=1).with_owner("team-a")
    record, _ = store.create(spec())
    store.request_cancel(record.id)  # queued → cancelled: finished, expires after a second
    store.client.zadd(store.index_key(JobState.cancelled, "team-a"), {record.id: 1.0})  # created long ago
    store.client.zadd(store.index_key(JobState.cancelled), {record.id: 1.0})
    deadline = time.monotonic() + 5
    while store.client.exists(store.job_key(record.id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert store.prune_expired() == 1
    assert store.client.zcard(store.index_key(owner="team-a")) == 0
    assert store.client.zcard(store.index_key(JobState.cancelled, "team-a")) == 0
