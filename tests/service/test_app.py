"""The app as a whole: probes, metrics, auth, body limits, error bodies, OpenAPI, settings, and no TensorFlow."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from service.config import Settings
from service.main import create_app
from service.metrics import GatewayMetrics
from service.openapi import openapi_yaml
from tests.service.tiny_models import png_base64

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_import_does_not_load_tensorflow_or_connect():
    # A closed port as Redis: importing (and building the app) must not try to reach it.
    env = {**os.environ, "DAE_REDIS_URL": "redis://127.0.0.1:1/0"}
    code = (
        "import sys, service.main; "
        "heavy = [m for m in ('tensorflow', 'keras', 'tf2onnx', 'matplotlib') if m in sys.modules]; "
        "assert not heavy, heavy; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_settings_come_from_dae_environment_variables(tmp_path):
    env = {
        **os.environ,
        "DAE_REDIS_URL": "redis://example:6380/2",
        "DAE_STORE_DIR": str(tmp_path),
        "DAE_API_KEYS": "alpha, beta",
        "DAE_MAX_EPOCHS": "7",
        "DAE_INFERENCE_BATCH_TIMEOUT_MS": "2.5",
    }
    code = (
        "from service.main import app; s = app.state.settings; "
        "print(s.redis_url, s.store_dir, [k.get_secret_value() for k in s.api_keys], s.max_epochs, "
        "s.inference_batch_timeout_ms)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["redis://example:6380/2", str(tmp_path), "['alpha',", "'beta']", "7", "2.5"]
    assert "alpha" not in repr(Settings(api_keys="alpha"))  # secrets stay out of logs


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"redis": "ok", "store": "ok"}, "auth": "open"}


def test_readiness_is_503_when_redis_or_the_store_is_unusable(tmp_path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("x")
    broken = Settings(redis_url="redis://127.0.0.1:1/0", store_dir=not_a_directory)
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
        assert client.get("/healthz").status_code == 200
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["redis"].startswith("unreachable") and body["checks"]["store"].startswith("not writable")


def test_metrics_count_requests_by_route_template_and_jobs_by_state(client, dense_card):
    client.get(f"/jobs/j_{'0' * 16}")
    client.post("/jobs", json={"dataset": "digits", "epochs": 1})
    client.post("/reconstruct", json={"model": dense_card.id, "pixels": np.zeros((8, 8)).tolist()})
    text = client.get("/metrics").text
    assert 'dae_http_requests_total{method="GET",route="/jobs/{job_id}",status="404"} 1.0' in text
    assert 'dae_http_requests_total{method="POST",route="/reconstruct",status="200"} 1.0' in text
    assert 'dae_http_request_duration_seconds_count{method="POST",route="/jobs"} 1.0' in text
    assert "dae_reconstruct_batch_size_count 1.0" in text
    queued = [line for line in text.splitlines() if line.startswith('dae_jobs{state="queued"}')]
    assert len(queued) == 1 and float(queued[0].split()[-1]) >= 1
    assert "dae_inference_sessions 1.0" in text
    client.get("/no/such/path")
    assert 'dae_http_requests_total{method="GET",route="other",status="404"} 1.0' in client.get("/metrics").text


def _series(metrics_text: str) -> set[str]:
    """The metric names with their label sets (values dropped) in a /metrics body."""
    return {line.rsplit(" ", 1)[0] for line in metrics_text.splitlines() if line and not line.startswith("#")}


def test_metrics_labels_stay_bounded_whatever_methods_and_paths_clients_send(client):
    rng = random.Random(0)

    def invented_requests(count: int) -> None:
        for _ in range(count):
            method = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
            path = "/" + "/".join(f"{rng.getrandbits(32):08x}" for _ in range(rng.randint(1, 3)))
            client.request(method, path)  # invented method, unmatched path
            client.request(method, "/jobs")  # invented method on a real route: 405
            client.get(path)  # a known method on an unmatched path: 404

    client.get("/metrics")
    invented_requests(20)
    first = client.get("/metrics").text
    invented_requests(300)  # 900 more requests; the 2,000 grew /metrics to 3.6 MB
    after = client.get("/metrics").text
    assert 'dae_http_requests_total{method="other",route="other",status="404"} 320.0' in after
    assert 'dae_http_requests_total{method="other",route="/jobs",status="405"} 320.0' in after
    assert 'dae_http_requests_total{method="GET",route="other",status="404"} 320.0' in after
    assert _series(after) == _series(first)
    assert len(after) < len(first) + 1024, (len(first), len(after))
    print(f"/metrics: {len(first):,} bytes after 60 invented requests, {len(after):,} after 960")


def test_statuses_outside_http_are_counted_as_other():
    metrics = GatewayMetrics()
    metrics.observe_request("GET", "/healthz", 999, 0.001)
    metrics.observe_request("BREW", "/healthz", 200, 0.001)
    text = generate_latest(metrics.registry).decode()
    assert 'dae_http_requests_total{method="GET",route="/healthz",status="other"} 1.0' in text
    assert 'dae_http_requests_total{method="other",route="/healthz",status="200"} 1.0' in text


@pytest.fixture
def secured(settings) -> TestClient:
    keyed = Settings(**{**settings.model_dump(), "api_keys": ["k-one", "k-two"], "max_upload_mb": 0.5})
    with TestClient(create_app(keyed)) as client:
        yield client


def test_api_keys_401_without_or_unknown_200_right(secured):
    missing = secured.get("/jobs")
    assert missing.status_code == 401 and "X-API-Key" in missing.json()["detail"]
    wrong = secured.get("/jobs", headers={"X-API-Key": "k-three"})
    assert wrong.status_code == 401 and "not valid" in wrong.json()["detail"] and "k-three" not in wrong.text
    for key in ("k-one", "k-two"):
        assert secured.get("/jobs", headers={"X-API-Key": key}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
        assert secured.get(path).status_code == 200, path


def test_auth_runs_before_the_body_is_read(secured):
    # An unauthenticated client gets 401, not 413/422: the gateway never parses its body.
    assert secured.post("/reconstruct", content=b"{broken").status_code == 401
    assert secured.post("/datasets", content=b"x" * (1024 * 1024)).status_code == 401  # over the 0.5 MiB limit
    assert secured.post("/datasets", content=b"x" * (1024 * 1024), headers={"X-API-Key": "k-one"}).status_code == 413


def test_swagger_shows_the_authorize_button():
    schema = create_app(Settings()).openapi()
    assert schema["components"]["securitySchemes"]["ApiKey"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "An API key (owner:role:secret configured in DAE_API_KEYS; send the secret). Required when the "
        "gateway runs with keys; the probes are always open, metrics and docs unless configured otherwise.",
    }
    # Open (no DAE_API_KEYS): the key is optional, `{}` says so; with keys it is required.
    assert schema["paths"]["/jobs"]["post"]["security"] == [{"ApiKey": []}, {}]
    keyed = create_app(Settings(api_keys="k-one")).openapi()
    assert keyed["paths"]["/jobs"]["post"]["security"] == [{"ApiKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def test_bodies_over_the_limit_are_413_by_header_and_while_streaming(settings):
    small = Settings(**{**settings.model_dump(), "max_upload_mb": 0.001})  # 1048 bytes
    with TestClient(create_app(small)) as client:
        declared = client.post("/reconstruct", content=b"x" * 5000, headers={"content-type": "application/json"})
        assert declared.status_code == 413
        assert "Content-Length 5000" in declared.json()["detail"]

        def chunks():
            for _ in range(10):
                yield b"x" * 500

        streamed = client.post("/reconstruct", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert "more than 1048 bytes" in streamed.json()["detail"]
        fits = client.post("/reconstruct", json={"model": "nobody", "pixels": [[0.5]]})
        assert fits.status_code == 404


def test_unknown_paths_and_methods_answer_json(client):
    missing = client.get("/nothing/here")
    assert missing.status_code == 404 and "Received: GET '/nothing/here'" in missing.json()["detail"]
    wrong_method = client.put("/jobs")
    assert wrong_method.status_code == 405 and "PUT" in wrong_method.json()["detail"]


def test_openapi_yaml_at_the_repo_root_is_generated_from_the_app():
    app = create_app(Settings())
    committed = (REPO_ROOT / "openapi.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(committed) == app.openapi(), "openapi.yaml is stale: run `python -m service.openapi > openapi.yaml`"
    assert committed == openapi_yaml(app)  # byte for byte: the dump is deterministic


def test_every_operation_is_documented_with_a_stable_id():
    schema = create_app(Settings()).openapi()
    operation_ids = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            assert operation.get("summary"), (method, path)
            assert operation.get("description"), (method, path)
            tag = operation["tags"][0]
            assert operation["operationId"].startswith(f"{tag}-"), operation["operationId"]
            operation_ids.append(operation["operationId"])
            assert "200" in operation["responses"] or "201" in operation["responses"] or "202" in operation[
                "responses"
            ] or "204" in operation["responses"], (method, path)
    assert len(operation_ids) == len(set(operation_ids))
    assert {"jobs-create_job", "jobs-stream_job_events", "reconstruct-reconstruct_images", "datasets-create_dataset"} <= set(
        operation_ids
    )
    body = schema["paths"]["/reconstruct"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "multipart/form-data"}
    assert "ReconstructRequest" in schema["components"]["schemas"]
    assert schema["components"]["schemas"]["TrainingSpec"]["examples"]


def test_the_json_examples_of_the_docs_are_accepted(client, store, tiny_models):
    from tests.service.tiny_models import publish_tiny_model

    schema = client.get("/openapi.json").json()
    job_example = schema["components"]["schemas"]["TrainingSpec"]["examples"][0]
    assert client.post("/jobs", json=job_example).status_code == 202
    publish_tiny_model(store, tiny_models["dense"], job_example["name"])
    for example in schema["components"]["schemas"]["ReconstructRequest"]["examples"]:
        response = client.post("/reconstruct", json=example)
        assert response.status_code == 200, (example, response.text)
    assert client.post("/reconstruct", json={"model": job_example["name"], "image": png_base64(np.ones((8, 8)))}).status_code == 200


GARBAGE = [
    (b"", "application/json"),
    (b"\x00\xff\xfe garbage", "application/json"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json"),
    (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "application/json"),
    (b'"just a string"', "application/json"),
    (b"null", "application/json"),
    (b"--boundary\r\nnot really multipart", "multipart/form-data; boundary=boundary"),
    (b"--x\r\n", "multipart/form-data"),
    (b"a=1&b=2", "application/x-www-form-urlencoded"),
]


@pytest.mark.parametrize("path", ["/jobs", "/datasets", "/reconstruct"])
def test_garbage_bodies_never_cause_a_server_error(client, path):
    for body, content_type in GARBAGE:
        response = client.post(path, content=body, headers={"content-type": content_type})
        assert 400 <= response.status_code < 500, (path, body[:20], content_type, response.status_code, response.text[:200])
        assert isinstance(response.json()["detail"], str)
