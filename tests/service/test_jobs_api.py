"""POST/GET/DELETE /jobs and the event stream, over a real Redis (the Celery message is read back from it)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from core.attempts import AttemptStore
from core.datasets import DatasetStore
from core.queue import TRAIN_QUEUE, TRAIN_TASK_NAME, task_time_limits
from core.store import ModelStore
from dae.spec import EpochMetrics, JobState, TrainingSpec
from service.config import Settings
from service.deps import get_producer
from service.main import create_app, make_producer
from tests.service.job_requests import SPEC, parse_sse


def queued_messages(client: redis.Redis, job_id: str) -> list[dict]:
    """The Celery messages in the training queue whose args name this job."""
    found = []
    for raw in client.lrange(TRAIN_QUEUE, 0, -1):
        message = json.loads(raw)
        args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
        if args == [job_id]:
            found.append(message)
    return found


def test_create_job_answers_202_with_location_and_queues_the_task_by_name(client, service_redis):
    response = client.post("/jobs", json=SPEC)
    assert response.status_code == 202
    record = response.json()
    assert record["state"] == "queued" and record["id"].startswith("j_")
    assert response.headers["location"] == f"/jobs/{record['id']}"
    assert record["spec"]["dataset"] == "digits" and record["spec"]["epochs"] == 2
    messages = queued_messages(service_redis, record["id"])
    assert len(messages) == 1
    headers = messages[0]["headers"]
    soft, hard = task_time_limits(TrainingSpec.model_validate(SPEC))
    assert headers["task"] == TRAIN_TASK_NAME
    assert headers["timelimit"] == [hard, soft]
    assert messages[0]["content-type"] == "application/json"  # JSON, never pickle
    assert client.get(response.headers["location"]).json()["state"] == "queued"


def test_idempotency_key_returns_the_same_job_and_409_for_another_body(client, service_redis):
    key = f"key-{time.time_ns()}"
    first = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    again = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert len(queued_messages(service_redis, first.json()["id"])) == 1  # queued once
    conflict = client.post("/jobs", json={**SPEC, "epochs": 3}, headers={"Idempotency-Key": key})
    assert conflict.status_code == 409
    assert key in conflict.json()["detail"]


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({**SPEC, "epochs": 201}, 422, "DAE_MAX_EPOCHS"),
        ({**SPEC, "epochs": 5000}, 422, "body.epochs"),
        ({**SPEC, "dataset": "imagenet"}, 422, "fashion_mnist, mnist, digits, natural_patches"),
        ({**SPEC, "dataset": "ds_0123456789ab"}, 422, "Unknown dataset"),
        ({**SPEC, "dataset": "../../etc"}, 422, "body.dataset"),
        ({**SPEC, "architecture": {"type": "conv", "filters": [4, 4, 4, 4]}}, 422, "at most 3 levels"),
        ({**SPEC, "epochs": "many"}, 422, "body.epochs"),
        ({**SPEC, "unknown_field": 1}, 422, "unknown_field"),
        ([1, 2, 3], 422, "body"),
    ],
)
def test_invalid_specs_are_422_with_a_useful_message(client, body, status, fragment):
    response = client.post("/jobs", json=body)
    assert response.status_code == status
    assert fragment in response.json()["detail"]


def test_malformed_json_and_bad_idempotency_keys_are_4xx(client):
    response = client.post("/jobs", content=b'{"dataset": ', headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert "not valid JSON" in response.json()["detail"]
    bad_key = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": "has spaces in it"})
    assert bad_key.status_code == 400
    assert "Idempotency-Key" in bad_key.json()["detail"]


def test_a_dataset_the_machine_cannot_download_is_rejected_at_submit(client):
    response = client.post("/jobs", json={**SPEC, "dataset": "mnist"})
    datasets = {info["id"]: info for info in client.get("/datasets").json()}
    if datasets["mnist"]["available"]:
        assert response.status_code == 202  # a cached copy exists here
    else:
        assert response.status_code == 422
        assert "no cached copy" in response.json()["detail"]


def test_list_jobs_newest_first_with_state_filter_and_pagination(client):
    ids = [client.post("/jobs", json=SPEC).json()["id"] for _ in range(3)]
    client.delete(f"/jobs/{ids[1]}")  # queued -> cancelled
    page = client.get("/jobs", params={"limit": 2}).json()
    assert [item["id"] for item in page["items"]] == [ids[2], ids[1]]
    assert page["total"] >= 3 and page["limit"] == 2 and page["offset"] == 0
    second = client.get("/jobs", params={"limit": 1, "offset": 2}).json()
    assert second["items"][0]["id"] == ids[0]
    cancelled = client.get("/jobs", params={"state": "cancelled", "limit": 500}).json()
    cancelled_ids = [item["id"] for item in cancelled["items"]]
    assert ids[1] in cancelled_ids and ids[0] not in cancelled_ids
    assert all(item["state"] == "cancelled" for item in cancelled["items"])
    assert client.get("/jobs", params={"state": "sleeping"}).status_code == 422
    assert client.get("/jobs", params={"limit": 0}).status_code == 422
    assert client.get("/jobs", params={"offset": -1}).status_code == 422


@pytest.mark.parametrize("job_id", ["j_0000000000000000", "nope", "..%2F..%2Fetc%2Fpasswd", "j_%00"])
def test_unknown_and_malformed_job_ids_are_404(client, job_id):
    for method in ("GET", "DELETE"):
        response = client.request(method, f"/jobs/{job_id}")
        assert response.status_code == 404, (method, job_id)
        assert "Received:" in response.json()["detail"]
    assert client.get(f"/jobs/{job_id}/events").status_code == 404


def _job_store(settings: Settings) -> AttemptStore:
    return AttemptStore(redis.Redis.from_url(str(settings.redis_url)))


def _epoch(epoch: int) -> EpochMetrics:
    return EpochMetrics(epoch=epoch, epochs=2, loss=1.0 / epoch, val_loss=1.2 / epoch, learning_rate=1e-3, elapsed_s=epoch)


def test_cancel_is_idempotent_and_409_for_finished_jobs(client, settings):
    queued = client.post("/jobs", json=SPEC).json()["id"]
    assert client.delete(f"/jobs/{queued}").json()["state"] == "cancelled"
    assert client.delete(f"/jobs/{queued}").json()["state"] == "cancelled"

    jobs = _job_store(settings)
    running = client.post("/jobs", json=SPEC).json()["id"]
    jobs.mark_running(running, worker="test")
    assert client.delete(f"/jobs/{running}").json()["state"] == "cancelling"
    assert jobs.is_cancel_requested(running)

    finished = client.post("/jobs", json=SPEC).json()["id"]
    jobs.mark_running(finished, worker="test")
    jobs.mark_succeeded(finished, model_id="m_0123456789ab")
    response = client.delete(f"/jobs/{finished}")
    assert response.status_code == 409
    assert "already finished" in response.json()["detail"]


def test_events_replay_every_epoch_and_end_with_the_final_state(client, settings):
    job_id = client.post("/jobs", json=SPEC).json()["id"]
    jobs = _job_store(settings)
    jobs.mark_running(job_id, worker="test")
    jobs.record_epoch(job_id, _epoch(1))
    jobs.record_epoch(job_id, _epoch(2))
    jobs.mark_succeeded(job_id, model_id="m_0123456789ab", history=[_epoch(1), _epoch(2)])

    response = client.get(f"/jobs/{job_id}/events")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert [(event["event"], event["data"].get("state") or event["data"]["epoch"]) for event in events] == [
        ("state", "queued"), ("state", "running"), ("epoch", 1), ("epoch", 2), ("state", "succeeded"),
    ]
    assert events[-1]["data"]["model_id"] == "m_0123456789ab"
    assert events[2]["data"]["loss"] == pytest.approx(1.0)

    resumed = parse_sse(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": events[2]["id"]}).text)
    assert [event["id"] for event in resumed] == [events[3]["id"], events[4]["id"]]

    after_end = parse_sse(client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": events[4]["id"]}).text)
    assert [event["data"]["state"] for event in after_end] == ["succeeded"]  # closes at once, never hangs

    bad = client.get(f"/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400
    assert "Last-Event-ID" in bad.json()["detail"]


def test_events_stream_live_progress_until_the_job_ends(client, settings):
    job_id = client.post("/jobs", json=SPEC).json()["id"]
    jobs = _job_store(settings)

    def worker():
        time.sleep(0.3)
        jobs.mark_running(job_id, worker="test")
        for epoch in (1, 2):
            time.sleep(0.1)
            jobs.record_epoch(job_id, _epoch(epoch))
        jobs.mark_failed(job_id, "loss became NaN at epoch 3")

    thread = threading.Thread(target=worker)
    thread.start()
    started = time.perf_counter()
    events = parse_sse(client.get(f"/jobs/{job_id}/events").text)
    thread.join()
    assert time.perf_counter() - started < 10
    assert [event["event"] for event in events] == ["state", "state", "epoch", "epoch", "state"]
    assert events[-1]["data"]["state"] == "failed"
    assert "NaN" in events[-1]["data"]["failure_reason"]


def test_jobs_on_an_uploaded_dataset_are_checked_against_its_shape(client, store: ModelStore):
    info = DatasetStore(store.root).save(np.random.default_rng(0).random((20, 4, 4, 1), dtype=np.float32), filename="x.npz")
    too_deep = {**SPEC, "dataset": info.id, "architecture": {"type": "conv", "filters": [4, 4, 4]}}
    response = client.post("/jobs", json=too_deep)
    assert response.status_code == 422
    assert "4x4" in response.json()["detail"]
    ok = client.post("/jobs", json={**SPEC, "dataset": info.id, "architecture": {"type": "conv", "filters": [4, 4]}})
    assert ok.status_code == 202


@pytest.fixture
def refused_sends(client: TestClient) -> Iterator[None]:
    """POST /jobs sends to a broker on a closed port while job records stay in the reachable test Redis."""
    broken = make_producer(Settings(redis_url="redis://127.0.0.1:1/0"))
    client.app.dependency_overrides[get_producer] = lambda: broken
    yield
    client.app.dependency_overrides.pop(get_producer, None)
    broken.close()


def test_a_refused_send_without_a_key_fails_the_job_instead_of_leaving_it_queued(client, refused_sends):
    response = client.post("/jobs", json=SPEC)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "did not accept" in response.json()["detail"] and "marked failed" in response.json()["detail"]
    latest = client.get("/jobs", params={"limit": 1}).json()["items"][0]
    assert latest["state"] == JobState.failed.value
    assert "could not be queued" in latest["failure_reason"]


def test_a_refused_send_with_a_key_stays_queued_and_the_retry_queues_it(client, refused_sends, service_redis):
    key = f"key-{time.time_ns()}"
    refused = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    detail = refused.json()["detail"]
    assert "same Idempotency-Key" in detail and "Received: OperationalError" in detail
    job_id = detail.split()[1]
    assert client.get(f"/jobs/{job_id}").json()["state"] == "queued"  # not failed: the retry may still run it
    assert queued_messages(service_redis, job_id) == []

    client.app.dependency_overrides.pop(get_producer)  # the broker is back
    retried = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert retried.status_code == 202
    assert retried.json()["id"] == job_id and retried.json()["state"] == "queued"
    assert retried.headers["idempotent-replayed"] == "true"
    assert retried.headers["location"] == f"/jobs/{job_id}"
    assert len(queued_messages(service_redis, job_id)) == 1

    replayed = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert replayed.status_code == 202 and replayed.json()["id"] == job_id
    assert replayed.headers["idempotent-replayed"] == "true"
    assert len(queued_messages(service_redis, job_id)) == 1  # dispatched once: a replay sends nothing more


def test_a_job_created_without_a_message_is_sent_by_the_next_retry_of_its_key(client, settings, service_redis):
    # The crash between writing the record and sending it (gateway killed): the record exists, no message does.
    key = f"key-{time.time_ns()}"
    jobs = AttemptStore(service_redis)
    record, created = jobs.create(TrainingSpec.model_validate(SPEC), idempotency_key=key)
    assert created and jobs.needs_dispatch(record.id)
    response = client.post("/jobs", json=SPEC, headers={"Idempotency-Key": key})
    assert response.status_code == 202 and response.json()["id"] == record.id
    assert len(queued_messages(service_redis, record.id)) == 1
    assert not jobs.needs_dispatch(record.id)


OVERSIZED_SPECS = {
    "dense 8 x 8192": ({"dataset": "fashion_mnist", "architecture": {"type": "dense", "hidden_units": [8192] * 8}},
                       "953,025,328 parameters", "architecture.hidden_units"),
    "conv 4 x 1024, kernel 11, batch 4096": (
        {"dataset": "fashion_mnist", "batch_size": 4096,
         "architecture": {"type": "conv", "filters": [1024] * 4, "kernel_size": 11}},
        "888,399,873 parameters", "architecture.filters"),
}


@pytest.mark.parametrize("name", list(OVERSIZED_SPECS))
def test_a_job_no_worker_could_hold_is_refused_before_it_is_queued(client, service_redis, name):
    body, estimate, field = OVERSIZED_SPECS[name]
    queue_before = service_redis.llen(TRAIN_QUEUE)
    jobs_before = client.get("/jobs").json()["total"]
    response = client.post("/jobs", json=body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert estimate in detail and field in detail and "MiB" in detail
    assert "DAE_MAX_MODEL_PARAMS" in detail and "DAE_MAX_TRAINING_MEMORY_MIB" in detail
    assert service_redis.llen(TRAIN_QUEUE) == queue_before  # nothing queued
    assert client.get("/jobs").json()["total"] == jobs_before  # nothing recorded


def test_the_cost_limits_are_settings_checked_at_their_boundary(settings):
    from dae.cost import estimate_job_cost
    from dae.data import dataset_info

    spec = TrainingSpec.model_validate(SPEC)
    info = dataset_info("digits")
    cost = estimate_job_cost(spec, tuple(info.shape), train_images=info.count)
    at_limit = settings.model_copy(update={"max_model_params": cost.parameters,
                                           "max_training_memory_mib": cost.training_memory_mib})
    with TestClient(create_app(at_limit)) as at:
        assert at.post("/jobs", json=SPEC).status_code == 202
    for over in ({"max_model_params": cost.parameters - 1},
                 {"max_training_memory_mib": cost.training_memory_mib * (1 - 1e-6)}):
        with TestClient(create_app(at_limit.model_copy(update=over))) as tight:
            response = tight.post("/jobs", json=SPEC)
            assert response.status_code == 422 and f"{cost.parameters:,} parameters" in response.json()["detail"]
