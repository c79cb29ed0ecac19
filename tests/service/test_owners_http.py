"""API keys with owners and roles, over real HTTP: a uvicorn gateway started with three keys (two `train` owners,
one `infer` key of the first owner) plus an admin, a real Redis and one store.

Every operation of the OpenAPI schema is exercised across owners (read, list, delete, cancel, artifacts, events,
reconstruct by name and by id, idempotency keys, a dataset in a job spec): the other owner's resources answer 404
and stay unchanged, the infer key cannot write, and a test checks that the cases cover the whole schema.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from core.store import ModelStore
from dae.spec import ModelCard
from testing.gateway import GatewayProcess
from tests.service.tiny_models import TinyModel, publish_tiny_model

A_TRAIN, B_TRAIN, A_INFER, ADMIN = "a-train-secret-0001", "b-train-secret-0002", "a-infer-secret-0003", "ops-admin-secret-04"
KEYS = f"team-a:train:{A_TRAIN},team-b:train:{B_TRAIN},team-a:infer:{A_INFER},ops:admin:{ADMIN}"
JOB = {"dataset": "digits", "architecture": {"type": "dense", "hidden_units": [16], "latent_dim": 4}, "epochs": 1}
PIXELS = np.linspace(0, 1, 64).reshape(8, 8).round(2).tolist()

#: Which test exercises each operation across owners (checked against the served schema by the last test).
CASES: dict[tuple[str, str], str] = {
    ("POST", "/jobs"): "test_idempotency_keys_are_per_owner",
    ("GET", "/jobs"): "test_job_lists_are_per_owner_and_an_admin_sees_every_owner",
    ("GET", "/jobs/{job_id}"): "test_jobs_of_another_owner_are_not_found_for_reads_cancels_and_events",
    ("DELETE", "/jobs/{job_id}"): "test_jobs_of_another_owner_are_not_found_for_reads_cancels_and_events",
    ("GET", "/jobs/{job_id}/events"): "test_jobs_of_another_owner_are_not_found_for_reads_cancels_and_events",
    ("POST", "/datasets"): "test_datasets_of_another_owner_are_invisible_and_undeletable",
    ("GET", "/datasets"): "test_datasets_of_another_owner_are_invisible_and_undeletable",
    ("GET", "/datasets/{dataset_id}"): "test_datasets_of_another_owner_are_invisible_and_undeletable",
    ("DELETE", "/datasets/{dataset_id}"): "test_datasets_of_another_owner_are_invisible_and_undeletable",
    ("GET", "/models"): "test_model_lists_are_per_owner",
    ("GET", "/models/{ref}"): "test_models_of_another_owner_are_not_found_for_reads_artifacts_and_deletes",
    ("GET", "/models/{ref}/history.png"): "test_models_of_another_owner_are_not_found_for_reads_artifacts_and_deletes",
    ("GET", "/models/{ref}/samples.png"): "test_models_of_another_owner_are_not_found_for_reads_artifacts_and_deletes",
    ("DELETE", "/models/{ref}"): "test_models_of_another_owner_are_not_found_for_reads_artifacts_and_deletes",
    ("POST", "/reconstruct"): "test_reconstruct_resolves_names_inside_the_callers_owner",
}
OPEN_TEMPLATES = ("/healthz", "/readyz", "/metrics")


@dataclass
class World:
    """The running gateway and what each owner has in it."""

    url: str
    store_dir: Path
    a_model: ModelCard
    b_model: ModelCard
    a_dataset: str
    a_job: str
    b_job: str

    def call(self, key: str | None, method: str, path: str, **kwargs) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), **({"X-API-Key": key} if key else {})}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kwargs)


def npz_upload() -> dict:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).integers(0, 256, (64, 8, 8), dtype=np.uint8))
    return {"files": {"file": ("a.npz", buffer.getvalue(), "application/octet-stream")}}


@pytest.fixture(scope="module")
def world(service_redis_url: str, tiny_models: dict[str, TinyModel],
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    store_dir = tmp_path_factory.mktemp("owners") / "store"
    store_dir.mkdir()
    root = ModelStore(store_dir)
    # Both owners publish a model called X: names are per owner.
    a_model = publish_tiny_model(root.with_owner("team-a"), tiny_models["dense"], "x")
    b_model = publish_tiny_model(root.with_owner("team-b"), tiny_models["dense"], "x")
    gateway = GatewayProcess(redis_url=service_redis_url, store_dir=store_dir,
                             log_path=store_dir.parent / "gateway.log", extra_env={"DAE_API_KEYS": KEYS}).start()
    try:
        probe = World(gateway.url, store_dir, a_model, b_model, "", "", "")
        uploaded = probe.call(A_TRAIN, "POST", "/datasets", **npz_upload())
        assert uploaded.status_code == 201, uploaded.text
        a_job = probe.call(A_TRAIN, "POST", "/jobs", json=JOB, headers={"Idempotency-Key": "shared-key"})
        b_job = probe.call(B_TRAIN, "POST", "/jobs", json=JOB, headers={"Idempotency-Key": "shared-key"})
        assert a_job.status_code == b_job.status_code == 202, (a_job.text, b_job.text)
        yield World(gateway.url, store_dir, a_model, b_model, uploaded.json()["id"], a_job.json()["id"],
                    b_job.json()["id"])
    finally:
        gateway.stop()


def test_idempotency_keys_are_per_owner(world: World) -> None:
    # The same key and body from another owner made another job (no replay of, and no 409 naming, A's job).
    assert world.a_job != world.b_job
    replay = world.call(A_TRAIN, "POST", "/jobs", json=JOB, headers={"Idempotency-Key": "shared-key"})
    assert replay.status_code == 202 and replay.json()["id"] == world.a_job
    assert replay.headers["Idempotent-Replayed"] == "true"
    conflict = world.call(B_TRAIN, "POST", "/jobs", json={**JOB, "epochs": 2}, headers={"Idempotency-Key": "shared-key"})
    assert conflict.status_code == 409 and world.a_job not in conflict.text and world.b_job in conflict.text
    assert world.call(A_TRAIN, "GET", f"/jobs/{world.a_job}").json()["owner"] == "team-a"


def test_jobs_of_another_owner_are_not_found_for_reads_cancels_and_events(world: World) -> None:
    for method, template in [("GET", "/jobs/{job_id}"), ("DELETE", "/jobs/{job_id}"), ("GET", "/jobs/{job_id}/events")]:
        answer = world.call(B_TRAIN, method, template.format(job_id=world.a_job))
        assert answer.status_code == 404, (method, template, answer.text)
        assert "team-a" not in answer.text
    # Nothing changed: A's job is still queued (B's cancel did not reach it) and A reads it.
    assert world.call(A_TRAIN, "GET", f"/jobs/{world.a_job}").json()["state"] == "queued"


def test_job_lists_are_per_owner_and_an_admin_sees_every_owner(world: World) -> None:
    a_ids = {job["id"] for job in world.call(A_TRAIN, "GET", "/jobs").json()["items"]}
    b_listing = world.call(B_TRAIN, "GET", "/jobs").json()
    assert world.a_job in a_ids and world.b_job not in a_ids
    assert {job["id"] for job in b_listing["items"]} == {world.b_job} and b_listing["total"] == 1
    every = {job["id"] for job in world.call(ADMIN, "GET", "/jobs").json()["items"]}
    assert {world.a_job, world.b_job} <= every
    only_b = {job["id"] for job in world.call(ADMIN, "GET", "/jobs", params={"owner": "team-b"}).json()["items"]}
    assert only_b == {world.b_job}


def test_naming_another_owner_needs_the_admin_role(world: World) -> None:
    answer = world.call(B_TRAIN, "GET", "/jobs", params={"owner": "team-a"})
    assert answer.status_code == 403
    detail = answer.json()["detail"]
    assert "admin" in detail and "owner='team-a'" in detail and B_TRAIN not in detail
    assert world.call(B_TRAIN, "GET", "/jobs", params={"owner": "team-b"}).status_code == 200  # its own: fine


def test_a_job_cannot_train_on_another_owners_dataset(world: World) -> None:
    answer = world.call(B_TRAIN, "POST", "/jobs", json={**JOB, "dataset": world.a_dataset})
    assert answer.status_code == 422 and "Unknown dataset" in answer.json()["detail"]
    own = world.call(A_TRAIN, "POST", "/jobs", json={**JOB, "dataset": world.a_dataset})
    assert own.status_code == 202, own.text
    world.call(A_TRAIN, "DELETE", f"/jobs/{own.json()['id']}")


def test_datasets_of_another_owner_are_invisible_and_undeletable(world: World) -> None:
    b_ids = {entry["id"] for entry in world.call(B_TRAIN, "GET", "/datasets").json()}
    assert world.a_dataset not in b_ids and "digits" in b_ids  # built-ins are everyone's
    assert world.a_dataset in {entry["id"] for entry in world.call(A_TRAIN, "GET", "/datasets").json()}
    for method, template in [("GET", "/datasets/{dataset_id}"), ("DELETE", "/datasets/{dataset_id}")]:
        assert world.call(B_TRAIN, method, template.format(dataset_id=world.a_dataset)).status_code == 404
    assert world.call(A_TRAIN, "GET", f"/datasets/{world.a_dataset}").json()["owner"] == "team-a"


def test_models_of_another_owner_are_not_found_for_reads_artifacts_and_deletes(world: World) -> None:
    a_id = world.a_model.id
    for method, template in [("GET", "/models/{ref}"), ("GET", "/models/{ref}/history.png"),
                             ("GET", "/models/{ref}/samples.png"), ("DELETE", "/models/{ref}")]:
        answer = world.call(B_TRAIN, method, template.format(ref=a_id))
        assert answer.status_code == 404, (method, template, answer.text)
    # By name, each owner reaches its own version 1 of x.
    assert world.call(B_TRAIN, "GET", "/models/x").json()["id"] == world.b_model.id
    assert world.call(B_TRAIN, "GET", "/models/x:1").json()["id"] == world.b_model.id
    assert world.call(A_TRAIN, "GET", "/models/x").json()["id"] == a_id
    assert world.call(A_INFER, "GET", f"/models/{a_id}/samples.png").status_code == 200
    assert world.call(A_TRAIN, "GET", f"/models/{a_id}").json()["owner"] == "team-a"  # B's delete did nothing


def test_model_lists_are_per_owner(world: World) -> None:
    a_list = world.call(A_INFER, "GET", "/models").json()
    assert [card["id"] for card in a_list["items"]] == [world.a_model.id] and a_list["total"] == 1
    assert [card["id"] for card in world.call(B_TRAIN, "GET", "/models").json()["items"]] == [world.b_model.id]
    every = world.call(ADMIN, "GET", "/models").json()
    assert {card["id"] for card in every["items"]} == {world.a_model.id, world.b_model.id}


def test_reconstruct_resolves_names_inside_the_callers_owner(world: World) -> None:
    # The hijack of the first wave: B's model called X must never answer A's /reconstruct {"model": "x"}.
    for key, expected in [(A_TRAIN, world.a_model.id), (A_INFER, world.a_model.id), (B_TRAIN, world.b_model.id)]:
        answer = world.call(key, "POST", "/reconstruct", json={"model": "x", "pixels": PIXELS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["id"] == expected
    by_id = world.call(B_TRAIN, "POST", "/reconstruct", json={"model": world.a_model.id, "pixels": PIXELS})
    assert by_id.status_code == 404, by_id.text
    assert world.call(ADMIN, "POST", "/reconstruct", json={"model": world.a_model.id, "pixels": PIXELS}).status_code == 200


def test_the_infer_role_reads_and_reconstructs_but_cannot_write(world: World) -> None:
    writes = [("POST", "/jobs", {"json": JOB}), ("GET", "/jobs", {}), ("DELETE", f"/jobs/{world.a_job}", {}),
              ("POST", "/datasets", npz_upload()), ("GET", "/datasets", {}),
              ("DELETE", f"/models/{world.a_model.id}", {})]
    for method, path, kwargs in writes:
        answer = world.call(A_INFER, method, path, **kwargs)
        assert answer.status_code == 403, (method, path, answer.text)
        detail = answer.json()["detail"]
        assert "role train" in detail and "infer key of owner 'team-a'" in detail and A_INFER not in detail
    assert world.call(A_TRAIN, "GET", f"/jobs/{world.a_job}").json()["state"] == "queued"
    assert world.call(A_INFER, "GET", f"/models/{world.a_model.id}").status_code == 200


def test_missing_and_unknown_keys_get_401_on_every_resource_route(world: World) -> None:
    schema = httpx.get(world.url + "/openapi.json").json()
    for template, methods in schema["paths"].items():
        for method in methods:
            path = template.replace("{job_id}", world.a_job).replace("{ref}", "x").replace("{dataset_id}", "digits")
            if template in OPEN_TEMPLATES:
                assert world.call(None, method.upper(), path).status_code == 200, template
                continue
            for key in (None, "not-a-configured-key"):
                answer = world.call(key, method.upper(), path)
                assert answer.status_code == 401, (method, template, key, answer.text)
                assert "not-a-configured-key" not in answer.text
    ready = httpx.get(world.url + "/readyz").json()
    assert ready["auth"] == "api_keys" and "team-a" not in str(ready)


def test_the_cases_cover_every_operation_of_the_schema(world: World) -> None:
    schema = httpx.get(world.url + "/openapi.json").json()
    operations = {(method.upper(), template) for template, methods in schema["paths"].items() for method in methods}
    scoped = {(method, template) for method, template in operations if template not in OPEN_TEMPLATES}
    assert scoped == set(CASES), "every operation of the schema needs a cross-owner case"
    assert all(callable(globals().get(name)) for name in CASES.values())
    # The schema documents the security of every route: the key on each scoped one, none on the probes.
    for method, template in operations:
        security = schema["paths"][template][method.lower()].get("security")
        if (method, template) in scoped:
            assert security == [{"ApiKey": []}], (method, template)
        else:
            assert not security, (method, template)
