"""AttemptStore against a real Redis: transitions, idempotency, listing, cancel, events, leases and retention."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from core.attempts import ATTEMPT_BUSY, ATTEMPT_FAILED, ATTEMPT_SKIPPED, ATTEMPT_STARTED, AttemptStore
from core.jobs import check_job_id, new_job_id
from core.leases import JobLease, LeaseLost
from core.queue import MAX_TASK_TIME_S, task_time_limits
from dae.errors import Conflict, DaeError, JobNotFound
from dae.fingerprints import spec_fingerprint
from dae.spec import MAX_RUNTIME_S, EpochMetrics, JobRecord, JobState, TrainingSpec


@pytest.fixture
def jobs(redis_client: redis.Redis) -> AttemptStore:
    """A AttemptStore under a prefix of its own, so counts and listings see only this test's jobs."""
    return AttemptStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:")


def tiny_spec(**overrides: object) -> TrainingSpec:
    return TrainingSpec.model_validate({"dataset": "digits", "epochs": 2, **overrides})


def metrics(epoch: int, epochs: int = 3, loss: float = 0.5) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, epochs=epochs, loss=loss, val_loss=loss + 0.1, learning_rate=1e-3,
                        elapsed_s=float(epoch), eta_s=float(epochs - epoch))


def event_states(jobs: AttemptStore, job_id: str) -> list[str]:
    return [payload["state"] for _id, payload in jobs.read_events(job_id, None, 0) if payload["type"] == "state"]


def test_job_ids_are_validated() -> None:
    job_id = new_job_id()
    assert check_job_id(job_id) == job_id
    assert len(job_id) == 18 and job_id.startswith("j_")
    for bad in ["", "j_123", "../etc/passwd", "j_" + "G" * 16, "j_" + "a" * 17, "x_" + "a" * 16]:
        with pytest.raises(JobNotFound):
            check_job_id(bad)


def test_malformed_and_unknown_ids_are_not_found(jobs: AttemptStore) -> None:
    for job_id in ["nope", "j_../../x", new_job_id()]:
        with pytest.raises(JobNotFound):
            jobs.get(job_id)
        with pytest.raises(JobNotFound):
            jobs.request_cancel(job_id)
        with pytest.raises(JobNotFound):
            jobs.read_events(job_id, None, 0)


def test_task_time_limits_cover_runtime_plus_overhead() -> None:
    soft, hard = task_time_limits(tiny_spec(max_runtime_s=100))
    assert 100 < soft < hard
    assert hard - soft >= 30
    soft_max, hard_max = task_time_limits(tiny_spec(max_runtime_s=MAX_RUNTIME_S))
    assert hard_max == MAX_TASK_TIME_S


def test_create_and_get(jobs: AttemptStore) -> None:
    record, created = jobs.create(tiny_spec())
    assert created
    assert record.state == JobState.queued and record.attempts == 0
    fetched = jobs.get(record.id)
    assert fetched == record
    assert fetched.spec.dataset == "digits"
    assert event_states(jobs, record.id) == ["queued"]


def test_full_life_cycle_updates_indexes_and_events(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec(epochs=3))
    running = jobs.mark_running(record.id, worker="host:1")
    assert running.state == JobState.running and running.attempts == 1 and running.worker == "host:1"
    assert running.started_at is not None
    for epoch in (1, 2, 3):
        jobs.record_epoch(record.id, metrics(epoch))
    done = jobs.mark_succeeded(record.id, model_id="m_0123456789ab", stop_reason="completed")
    assert done.state == JobState.succeeded and done.model_id == "m_0123456789ab"
    assert done.finished_at is not None and done.finished_at >= done.started_at
    assert [entry.epoch for entry in done.history] == [1, 2, 3]
    assert done.progress is not None and done.progress.epoch == 3
    assert jobs.counts_by_state() == {"queued": 0, "running": 0, "retrying": 0, "cancelling": 0,
                                      "succeeded": 1, "failed": 0, "cancelled": 0}
    events = jobs.read_events(record.id, None, 0)
    kinds = [(payload["type"], payload.get("state") or payload.get("epoch")) for _id, payload in events]
    assert kinds == [("state", "queued"), ("state", "running"), ("epoch", 1), ("epoch", 2), ("epoch", 3),
                     ("state", "succeeded")]
    assert events[-1][1]["model_id"] == "m_0123456789ab"
    assert events[2][1]["loss"] == pytest.approx(0.5) and events[2][1]["epochs"] == 3
    # A finished job does not change any more.
    with pytest.raises(Conflict):
        jobs.mark_failed(record.id, "late failure")
    assert jobs.mark_succeeded(record.id, model_id="m_0123456789ab").state == JobState.succeeded


def test_read_events_resumes_after_last_id_and_blocks(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec())
    first = jobs.read_events(record.id, None, 0)
    last_id = first[-1][0]
    assert jobs.read_events(record.id, last_id, 0) == []
    started = time.monotonic()
    assert jobs.read_events(record.id, last_id, 200) == []
    assert time.monotonic() - started >= 0.15

    def later() -> None:
        time.sleep(0.2)
        jobs.mark_running(record.id, worker="w")

    thread = threading.Thread(target=later)
    thread.start()
    started = time.monotonic()
    events = jobs.read_events(record.id, last_id, 5000)
    thread.join()
    assert time.monotonic() - started < 4
    assert [payload["state"] for _id, payload in events] == ["running"]
    with pytest.raises(DaeError):
        jobs.read_events(record.id, "not-an-id", 0)


def test_record_epoch_replaces_repeated_epochs_after_resume(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec(epochs=4))
    jobs.mark_running(record.id, worker="w")
    for epoch in (1, 2, 3):
        jobs.record_epoch(record.id, metrics(epoch, 4, loss=1.0))
    jobs.record_epoch(record.id, metrics(3, 4, loss=0.25))  # attempt 2 resumed from the epoch-2 checkpoint
    history = jobs.get(record.id).history
    assert [(entry.epoch, entry.loss) for entry in history] == [(1, 1.0), (2, 1.0), (3, 0.25)]
    # Non-finite metrics are not stored (JSON has no NaN).
    jobs.record_epoch(record.id, metrics(4, 4, loss=float("nan")))
    assert [entry.epoch for entry in jobs.get(record.id).history] == [1, 2, 3]


def test_listing_newest_first_with_state_filter_and_pagination(jobs: AttemptStore) -> None:
    ids = []
    for _ in range(7):
        ids.append(jobs.create(tiny_spec())[0].id)
        time.sleep(0.002)  # distinct creation times
    for job_id in ids[:3]:
        jobs.mark_running(job_id, worker="w")
    jobs.mark_failed(ids[0], "boom")
    newest_first = list(reversed(ids))

    page, total = jobs.list(limit=3)
    assert total == 7 and [r.id for r in page] == newest_first[:3]
    page, total = jobs.list(limit=3, offset=3)
    assert [r.id for r in page] == newest_first[3:6]
    page, total = jobs.list(limit=3, offset=6)
    assert [r.id for r in page] == newest_first[6:]
    assert jobs.list(limit=3, offset=50) == ([], 7)
    assert jobs.list(limit=0) == ([], 7)

    queued, total = jobs.list(JobState.queued)
    assert total == 4 and [r.id for r in queued] == list(reversed(ids[3:]))
    running, total = jobs.list(JobState.running)
    assert total == 2 and [r.id for r in running] == [ids[2], ids[1]]
    failed, total = jobs.list(JobState.failed)
    assert total == 1 and failed[0].failure_reason == "boom"
    assert jobs.counts_by_state()["queued"] == 4
    with pytest.raises(ValueError):
        jobs.list(limit=-1)


def test_idempotency_same_spec_same_job_different_spec_conflict(jobs: AttemptStore) -> None:
    key = f"key-{uuid.uuid4().hex}"
    first, created = jobs.create(tiny_spec(), idempotency_key=key)
    again, created_again = jobs.create(tiny_spec(), idempotency_key=key)
    assert created and not created_again and again.id == first.id
    # Defaults spelled out are the same spec.
    explicit = tiny_spec(batch_size=TrainingSpec.model_fields["batch_size"].default, seed=0)
    assert spec_fingerprint(explicit) == spec_fingerprint(tiny_spec())
    assert jobs.create(explicit, idempotency_key=key)[0].id == first.id
    with pytest.raises(Conflict) as raised:
        jobs.create(tiny_spec(epochs=3), idempotency_key=key)
    assert key in raised.value.message
    assert jobs.list()[1] == 1
    other, created_other = jobs.create(tiny_spec(epochs=3), idempotency_key=key + "-2")
    assert created_other and other.id != first.id
    with pytest.raises(DaeError):
        jobs.create(tiny_spec(), idempotency_key="has space")


def test_concurrent_creates_with_one_key_make_one_job(jobs: AttemptStore) -> None:
    key = f"race-{uuid.uuid4().hex}"
    results: list[str] = []

    def submit() -> None:
        results.append(jobs.create(tiny_spec(), idempotency_key=key)[0].id)

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1
    assert jobs.list()[1] == 1


def test_cancel_queued_is_immediate_and_idempotent(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec())
    assert not jobs.is_cancel_requested(record.id)
    cancelled = jobs.request_cancel(record.id)
    assert cancelled.state == JobState.cancelled and cancelled.finished_at is not None
    assert jobs.is_cancel_requested(record.id)
    assert jobs.request_cancel(record.id).state == JobState.cancelled
    # The worker then skips it: mark_running leaves a cancelled job alone.
    assert jobs.mark_running(record.id, worker="w").state == JobState.cancelled
    assert jobs.get(record.id).attempts == 0
    assert event_states(jobs, record.id) == ["queued", "cancelled"]


def test_cancel_running_goes_through_cancelling(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec(epochs=3))
    jobs.mark_running(record.id, worker="w")
    jobs.record_epoch(record.id, metrics(1))
    assert jobs.request_cancel(record.id).state == JobState.cancelling
    assert jobs.request_cancel(record.id).state == JobState.cancelling
    assert jobs.is_cancel_requested(record.id)
    done = jobs.mark_cancelled(record.id)
    assert done.state == JobState.cancelled and done.stop_reason == "cancelled"
    assert done.progress is not None and done.progress.epoch == 1
    events = jobs.read_events(record.id, None, 0)
    assert events[-1][1] == {**events[-1][1], "state": "cancelled", "epoch": 1}
    assert event_states(jobs, record.id) == ["queued", "running", "cancelling", "cancelled"]


def test_cancel_finished_job_is_a_conflict(jobs: AttemptStore) -> None:
    for finish in ("succeeded", "failed"):
        record, _ = jobs.create(tiny_spec())
        jobs.mark_running(record.id, worker="w")
        if finish == "succeeded":
            jobs.mark_succeeded(record.id, model_id="m_000000000000")
        else:
            jobs.mark_failed(record.id, "dataset missing")
        with pytest.raises(Conflict) as raised:
            jobs.request_cancel(record.id)
        assert finish in raised.value.message
        assert jobs.get(record.id).state.value == finish


def test_cancel_racing_with_worker_transitions_loses_nothing(jobs: AttemptStore) -> None:
    """Many concurrent record_epoch calls and a cancel: every epoch and the cancelling state survive."""
    record, _ = jobs.create(tiny_spec(epochs=40))
    jobs.mark_running(record.id, worker="w")
    errors: list[BaseException] = []

    def epochs() -> None:
        try:
            for epoch in range(1, 41):
                jobs.record_epoch(record.id, metrics(epoch, 40))
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    thread = threading.Thread(target=epochs)
    thread.start()
    time.sleep(0.005)
    jobs.request_cancel(record.id)
    thread.join()
    assert errors == []
    final = jobs.get(record.id)
    assert final.state == JobState.cancelling
    assert [entry.epoch for entry in final.history] == list(range(1, 41))
    assert jobs.counts_by_state()["cancelling"] == 1 and jobs.counts_by_state()["running"] == 0


def test_redelivery_passes_through_retrying(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec())
    jobs.mark_running(record.id, worker="a:1")
    jobs.mark_retrying(record.id)
    again = jobs.mark_running(record.id, worker="b:2")
    assert again.state == JobState.running and again.attempts == 2 and again.worker == "b:2"
    assert event_states(jobs, record.id) == ["queued", "running", "retrying", "running"]
    # mark_retrying is only for a running record.
    jobs.mark_cancelled(record.id)
    assert jobs.mark_retrying(record.id).state == JobState.cancelled


def test_illegal_transition_is_refused(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec())
    with pytest.raises(Conflict):
        jobs.mark_succeeded(record.id, model_id="m_000000000000")  # queued -> succeeded skips running
    assert jobs.get(record.id).state == JobState.queued


def start(jobs: AttemptStore, job_id: str, owner: str = "host-a:1", ttl_s: float = 5.0,
          max_lost_attempts: int = 3) -> tuple[str, JobRecord, JobLease]:
    lease = jobs.lease(job_id, owner=owner, ttl_s=ttl_s)
    outcome, record = jobs.start_attempt(job_id, lease, max_lost_attempts=max_lost_attempts)
    return outcome, record, lease


def test_an_attempt_takes_the_lease_with_its_number_as_fencing_token(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    outcome, record, lease = start(jobs, job_id)
    assert outcome == ATTEMPT_STARTED and record.state == JobState.running and record.attempts == 1
    assert lease.attempt == 1 and jobs.lease_holder(job_id) == lease.value == f"1|host-a:1|{lease.token}"
    assert record.worker == "host-a:1" and record.lost_attempts == 0
    # A second attempt (a duplicate message) finds the lease held and changes nothing.
    outcome, busy, _ = start(jobs, job_id, owner="host-b:2")
    assert outcome == ATTEMPT_BUSY and busy.attempts == 1 and jobs.lease_holder(job_id) == lease.value
    # Fenced writes go through while the lease is current; the final one releases it.
    jobs.record_epoch(job_id, metrics(1), lease=lease)
    final = jobs.mark_succeeded(job_id, model_id="m_000000000001", lease=lease)
    assert final.state == JobState.succeeded and jobs.lease_holder(job_id) is None
    assert start(jobs, job_id)[0] == ATTEMPT_SKIPPED
    assert event_states(jobs, job_id) == ["queued", "running", "succeeded"]


def test_a_stale_attempt_cannot_change_the_job(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    _, _, stale = start(jobs, job_id, ttl_s=0.3)
    time.sleep(0.45)  # its process stalled past the lease's lifetime
    outcome, record, fresh = start(jobs, job_id, owner="host-b:2")
    assert outcome == ATTEMPT_STARTED and record.attempts == 2 and record.lost_attempts == 1
    assert event_states(jobs, job_id) == ["queued", "running", "retrying", "running"]
    for write in (lambda: jobs.record_epoch(job_id, metrics(1), lease=stale),
                  lambda: jobs.mark_succeeded(job_id, model_id="m_000000000002", lease=stale),
                  lambda: jobs.mark_failed(job_id, "stale", lease=stale),
                  lambda: jobs.hand_off(job_id, stale)):
        with pytest.raises(LeaseLost):
            write()
    assert not stale.renew(), "a newer attempt started: the stale one may not take the lease back"
    assert not stale.release() and jobs.lease_holder(job_id) == fresh.value
    unchanged = jobs.get(job_id)
    assert unchanged.state == JobState.running and unchanged.history == [] and unchanged.attempts == 2


def test_a_lease_that_expired_in_an_outage_is_taken_back_if_no_one_else_started(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    _, _, lease = start(jobs, job_id, ttl_s=0.3)
    time.sleep(0.45)
    assert jobs.lease_holder(job_id) is None
    assert lease.renew() and jobs.lease_holder(job_id) == lease.value
    jobs.record_epoch(job_id, metrics(1), lease=lease)
    assert [entry.epoch for entry in jobs.get(job_id).history] == [1]


def test_a_hand_off_releases_the_lease_without_counting_a_loss(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    _, _, lease = start(jobs, job_id)
    handed = jobs.hand_off(job_id, lease, history=[metrics(1)])
    assert handed.state == JobState.retrying and handed.progress.epoch == 1 and jobs.lease_holder(job_id) is None
    outcome, record, _ = start(jobs, job_id, owner="host-b:2")
    assert outcome == ATTEMPT_STARTED and record.attempts == 2 and record.lost_attempts == 0
    assert event_states(jobs, job_id) == ["queued", "running", "retrying", "running"]


def test_attempts_whose_process_died_end_the_job_after_the_limit(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    for attempt in range(1, 4):
        outcome, record, lease = start(jobs, job_id, owner=f"host:{attempt}")
        assert outcome == ATTEMPT_STARTED and record.attempts == attempt
        # The pool child died: its main process notes how and frees the lease at once.
        assert not jobs.record_lost_process(job_id, owner="host:999", exit_note="signal SIGKILL")  # not its lease
        assert jobs.record_lost_process(job_id, owner=f"host:{attempt}", exit_note="signal SIGKILL")
        assert jobs.lease_holder(job_id) is None
    outcome, final, _ = start(jobs, job_id, owner="host:4")
    assert outcome == ATTEMPT_FAILED and final.state == JobState.failed
    assert final.attempts == 3 and final.lost_attempts == 3
    assert final.failure_reason.startswith(
        "The worker process died during 3 attempts; last signal SIGKILL, possibly out of memory.")
    assert "batch_size" in final.failure_reason
    assert "host (or container) gone" not in final.failure_reason


def test_a_lost_cancelling_attempt_ends_cancelled(jobs: AttemptStore) -> None:
    job_id = jobs.create(tiny_spec())[0].id
    _, _, lease = start(jobs, job_id)
    jobs.request_cancel(job_id)
    assert jobs.finish_abandoned_cancel(job_id) is None  # the attempt is alive: it finishes the cancel itself
    lease.release()  # ...then it dies
    finished = jobs.finish_abandoned_cancel(job_id)
    assert finished.state == JobState.cancelled and finished.stop_reason == "cancelled"
    assert event_states(jobs, job_id)[-2:] == ["cancelling", "cancelled"]


def test_finished_jobs_expire_after_the_retention_and_leave_the_indexes(redis_client: redis.Redis) -> None:
    jobs = AttemptStore(redis_client, prefix=f"test-{uuid.uuid4().hex[:8]}:", retention_s=1)
    done, _ = jobs.create(tiny_spec())
    alive, _ = jobs.create(tiny_spec())
    jobs.request_cancel(done.id)  # queued -> cancelled: finished
    assert 0 < redis_client.ttl(jobs.job_key(done.id)) <= 1 and 0 < redis_client.ttl(jobs.events_key(done.id)) <= 1
    assert redis_client.ttl(jobs.job_key(alive.id)) == -1  # unfinished jobs never expire
    time.sleep(1.2)
    with pytest.raises(JobNotFound):
        jobs.get(done.id)
    assert jobs.prune_expired() == 1
    assert jobs.counts_by_state()["cancelled"] == 0 and jobs.list()[1] == 1
    assert jobs.get(alive.id).state == JobState.queued


def test_only_one_process_holds_a_turn(jobs: AttemptStore) -> None:
    assert jobs.take_turn("reaper", "a", ttl_s=0.3)
    assert not jobs.take_turn("reaper", "b", ttl_s=0.3)
    assert jobs.take_turn("reaper", "a", ttl_s=0.3)  # renewed by its holder
    time.sleep(0.4)
    assert jobs.take_turn("reaper", "b", ttl_s=0.3)


def test_dispatch_is_tracked_for_queued_jobs(jobs: AttemptStore) -> None:
    record, _ = jobs.create(tiny_spec())
    assert jobs.needs_dispatch(record.id)
    jobs.mark_dispatched(record.id)
    assert not jobs.needs_dispatch(record.id)
    other, _ = jobs.create(tiny_spec())
    jobs.request_cancel(other.id)
    assert not jobs.needs_dispatch(other.id)  # nothing to send for a finished job


def test_works_with_a_client_that_decodes_responses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        jobs = AttemptStore(client, prefix=f"test-{uuid.uuid4().hex[:8]}:")
        record, _ = jobs.create(tiny_spec(), idempotency_key="k-1")
        assert jobs.create(tiny_spec(), idempotency_key="k-1")[0].id == record.id
        jobs.mark_running(record.id, worker="w")
        jobs.record_epoch(record.id, metrics(1))
        assert [r.id for r in jobs.list(JobState.running)[0]] == [record.id]
        assert [payload["type"] for _id, payload in jobs.read_events(record.id, None, 0)] == ["state", "state", "epoch"]
        jobs.mark_failed(record.id, "stop")
        leased, _ = jobs.create(tiny_spec())
        outcome, _record, lease = start(jobs, leased.id)
        assert outcome == ATTEMPT_STARTED and jobs.lease_holder(leased.id) == lease.value and lease.renew()
        assert lease.release()
    finally:
        client.close()
