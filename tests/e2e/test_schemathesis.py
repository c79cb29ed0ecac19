"""schemathesis against the live service: the app's own OpenAPI schema, fuzzed through real processes.

A `uvicorn service.main:app` gateway in its default, open configuration (no DAE_API_KEYS), a celery worker and a
real redis-server; the worker first trains a tiny model named like the docs' examples (`digits-demo`, dense, on
`digits`), so the /reconstruct examples denoise for real and /models has a card, plots and a model to delete.
Then the `st` CLI (a subprocess: fixed seed, bounded examples, one JSON report) runs every operation of
/openapi.json through its four phases, with every check it has (the server-error, status-code, content-type,
header and response-schema conformance checks, negative data rejection, positive data acceptance, missing
required headers, unsupported methods, Allow headers, use after free, resource availability, ignored auth):
- examples: the schema's own examples (a training job, three /reconstruct calls, model and dataset refs);
- coverage: boundary and invalid values of every parameter and body field, missing headers, other methods;
- fuzzing: random valid and invalid requests;
- stateful: sequences over the links schemathesis infers from Location headers and ids, e.g.
  POST /jobs -> GET /jobs/{job_id} -> DELETE /jobs/{job_id} -> GET /jobs/{job_id}/events.
The target is 0 failures: no 5xx, and every response as the schema documents it. A second gateway on the same
Redis and store runs with API keys (and /metrics behind one); a shorter run through it, with a valid key, adds the
ignored-auth check: no operation that declares the key answers without it or with an invalid one.

What the configuration below tells schemathesis, and why:
- `dictionaries`: real ids to draw from half of the time (a model, a dataset, a finished job, the first page), so
  requests reach the code behind the 404s; DELETE /models/{ref} gets a copy of the model, so the other phases
  keep the real one until the stateful phase deletes what GET /models lists (and checks that it is gone).
- POST /jobs, POST /datasets, POST /reconstruct may answer 422 to a schema-valid body: whether a spec's dataset
  exists, what its model would cost, whether a string is a PNG of the right shape or an upload a valid .npz is
  decided by the service, not expressible in JSON Schema. POST /reconstruct may also answer 400 to a multipart
  form of more than 8 fields until its schema says so.
- DELETE /jobs/{job_id} cancels a job and keeps its record (the API's documented contract), so a job read after
  it is no use after free.
- An event stream of an unfinished job stays open by design: read for at most `STREAM_SECONDS`.
Job limits are lowered (DAE_MAX_EPOCHS=5, tiny models and data) so the jobs the fuzzer submits train in seconds on
a 2-core machine instead of competing with it for minutes; the worker also runs at a lower CPU priority.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest
import redis

from core.queue import TRAIN_QUEUE
from core.store import ModelStore, new_model_id
from dae.spec import ModelCard
from testing.gateway import GatewayProcess
from testing.processes import CeleryWorker, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 20261202
#: Test cases per operation and phase: ~2,000 cases over every operation in ~20 s on 2 cores.
MAX_EXAMPLES = 25
#: Stateful phase: sequences to try (~100, ~7 s) and at most this many steps each.
STATEFUL_EXAMPLES = 50
MAX_STEPS = 8
#: How long the fuzzer reads an event stream that is still open (an unfinished job's), and how many events.
STREAM_SECONDS = 1.0
STREAM_EVENTS = 5
#: The whole `st run` may not take longer than this (it is a hang, not a finding).
RUN_TIMEOUT_S = 240

#: The Redis database of this module (the gateway tests use 11): the fuzzer's jobs never reach other workers.
FUZZ_REDIS_DB = 12

MODEL_NAME = "digits-demo"  # the name the docs' examples use (TrainingSpec and ReconstructRequest examples)
VICTIM_NAME = "fuzz-victim"  # a copy of the model for DELETE /models/{ref}

SEED_JOB = {
    "name": MODEL_NAME,
    "dataset": "digits",
    "architecture": {"type": "dense", "hidden_units": [16], "latent_dim": 8},
    "epochs": 1,
    "batch_size": 64,
}

#: The gateway in its default configuration (open: no DAE_API_KEYS) except for job sizes: whatever the fuzzer
#: submits trains in seconds (the docs' example job, 5 dense epochs on `digits`, still fits).
GATEWAY_ENV = {
    "DAE_MAX_EPOCHS": "5",
    "DAE_MAX_MODEL_PARAMS": "20000",
    "DAE_MAX_TRAINING_MEMORY_MIB": "4",
    "DAE_INFERENCE_INTRA_OP_THREADS": "1",
}

CONFIG = string.Template("""\
# Written by tests/e2e/test_schemathesis.py (see its docstring).
seed = $seed
request-timeout = 10
workers = 1

[cache]
enabled = false  # no crash replay from earlier runs: every run is the same run

[generation]
max-examples = $max_examples
database = "none"

[checks]
enabled = true

[phases.stateful]
max-steps = $max_steps
generation.max-examples = $stateful_examples

[dictionaries.models]
values = ["$model"]

[dictionaries.victims]
values = ["$victim"]

[dictionaries.jobs]
values = ["$job_id"]

[dictionaries.datasets]
values = ["digits", "fashion_mnist", "$dataset_id"]

[dictionaries.first_page]
values = [0]

[[operations]]
include-path-regex = "^/(jobs|models)$$"
include-method = "GET"
parameters = { "query.offset" = { dictionary = "first_page", probability = 0.5 } }

[[operations]]
include-operation-id = "models-list_models"
parameters = { "query.name" = { dictionary = "models", probability = 0.5 } }

[[operations]]
include-path-regex = "^/models/\\\\{ref\\\\}"
exclude-method = "DELETE"
parameters = { "path.ref" = { dictionary = "models", probability = 0.5 } }

[[operations]]
include-operation-id = "models-delete_model"
parameters = { "path.ref" = { dictionary = "victims", probability = 0.5 } }

[[operations]]
include-operation-id = "reconstruct-reconstruct_images"
parameters = { "body.model" = { dictionary = "models", probability = 0.5 } }

[[operations]]
include-path-regex = "^/datasets/\\\\{dataset_id\\\\}$$"
parameters = { "path.dataset_id" = { dictionary = "datasets", probability = 0.5 } }

[[operations]]
include-path-regex = "^/jobs/\\\\{job_id\\\\}"
parameters = { "path.job_id" = { dictionary = "jobs", probability = 0.5 } }
checks.use_after_free.enabled = false

[[operations]]
include-operation-id = "jobs-stream_job_events"
request-timeout = $stream_seconds
max-stream-events = $stream_events

[[operations]]
include-operation-id = ["jobs-create_job", "datasets-create_dataset"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "409", "422"]

# 400 too: its multipart form takes at most 8 fields ("Too many fields"), which its schema does not say yet.
[[operations]]
include-operation-id = "reconstruct-reconstruct_images"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "422"]
""")


@dataclass
class FuzzStack:
    """The running service and what the fuzzer is told about it."""

    gateway: GatewayProcess
    worker: CeleryWorker
    store_dir: Path
    job_id: str
    dataset_id: str


def _fuzz_redis_url(redis_url: str) -> str:
    return urlunsplit(urlsplit(redis_url)._replace(path=f"/{FUZZ_REDIS_DB}"))


def _lower_priority(worker: CeleryWorker) -> None:
    """Training jobs yield the CPU to the gateway and the fuzzer (pool children inherit it from the group)."""
    try:
        os.setpriority(os.PRIO_PGRP, worker.pid, 10)
    except OSError:
        pass


def _copy_model(store: ModelStore, card: ModelCard, name: str) -> ModelCard:
    """Publish a copy of a trained model under another name (the store API, as the worker publishes)."""
    staging = store.staging_dir()
    source = store.root / "models" / card.id
    for artifact in ("model.onnx", "history.png", "samples.png"):
        shutil.copyfile(source / artifact, staging / artifact)
    copy = card.model_copy(update={
        "id": new_model_id(), "name": name, "version": store.reserve_version(name), "created_at": datetime.now(UTC),
    })
    return store.publish_model(staging, copy)


def _upload_dataset(client: httpx.Client) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, x=np.random.default_rng(0).integers(0, 256, (16, 8, 8), dtype=np.uint8))
    response = client.post("/datasets", files={"file": ("fuzz.npz", buffer.getvalue())})
    assert response.status_code == 201, response.text
    return response.json()["id"]


@contextmanager
def running_fuzz_stack(redis_url: str, root: Path) -> Iterator[FuzzStack]:
    """Redis (own database), a worker and a gateway; a trained model, a copy of it and an uploaded dataset."""
    url = _fuzz_redis_url(redis_url)
    store_dir = root / "store"
    store_dir.mkdir()
    worker = CeleryWorker(redis_url=url, store_dir=store_dir, log_path=root / "worker.log").start()
    _lower_priority(worker)
    gateway = GatewayProcess(redis_url=url, store_dir=store_dir, log_path=root / "gateway.log", extra_env=GATEWAY_ENV)
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            created = client.post("/jobs", json=SEED_JOB)
            assert created.status_code == 202, created.text
            job_id = created.json()["id"]
            dataset_id = _upload_dataset(client)

            def finished() -> dict | None:
                record = client.get(f"/jobs/{job_id}").json()
                return record if record["state"] in ("succeeded", "failed", "cancelled") else None

            record = wait_until(finished, 180, "the seed model to be trained", worker)
            assert record["state"] == "succeeded", record
        store = ModelStore(store_dir)
        _copy_model(store, store.read_card(record["model_id"]), VICTIM_NAME)
        yield FuzzStack(gateway=gateway, worker=worker, store_dir=store_dir, job_id=job_id, dataset_id=dataset_id)
    finally:
        gateway.stop()
        worker.stop(timeout_s=5)
        _drop_fuzz_keys(url)


def _drop_fuzz_keys(url: str) -> None:
    """Remove what the fuzzer's jobs left in this module's database: records, events, queue, Celery's bookkeeping."""
    client = redis.Redis.from_url(url)
    try:
        for pattern in ("dae:*", f"{TRAIN_QUEUE}*", "unacked*", "_kombu.*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module")
def fuzz_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FuzzStack]:
    """The service as real processes, with something to work on."""
    with running_fuzz_stack(redis_url, tmp_path_factory.mktemp("schemathesis")) as stack:
        yield stack


def _write_config(path: Path, stack: FuzzStack, max_examples: int = MAX_EXAMPLES) -> Path:
    path.write_text(CONFIG.substitute(
        seed=SEED, max_examples=max_examples, stateful_examples=STATEFUL_EXAMPLES, max_steps=MAX_STEPS, model=MODEL_NAME, victim=VICTIM_NAME,
        job_id=stack.job_id, dataset_id=stack.dataset_id, stream_seconds=STREAM_SECONDS, stream_events=STREAM_EVENTS,
    ), encoding="utf-8")
    return path


def _run_schemathesis(url: str, config: Path, workdir: Path, *extra: str) -> None:
    """`st run` of the gateway's own schema; asserts no failure and that every operation was tested."""
    report = workdir / "report.json"
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", f"{url}/openapi.json",
        "--report", "json", "--report-json-path", str(report), "--no-color", *extra,
    ]
    started = time.monotonic()
    # Run in workdir: hypothesis and schemathesis write their caches to the working directory.
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - started
    document = json.loads(report.read_text()) if report.exists() else {}
    operations = document.get("operations", {})
    cases = document.get("test_cases", {})
    failures = sum(group["count"] for group in document.get("failures", []))
    print(
        f"\nschemathesis: {operations.get('tested')}/{operations.get('total')} operations, "
        f"{cases.get('generated')} cases, {failures} failures, {len(document.get('errors', []))} errors "
        f"in {elapsed:.1f} s (seed {SEED})"
    )
    assert result.returncode == 0, f"schemathesis found problems:\n{result.stdout[-20000:]}\n{result.stderr[-3000:]}"
    assert operations.get("tested") == operations.get("total"), operations


def test_schemathesis_finds_nothing(fuzz_stack: FuzzStack, tmp_path: Path) -> None:
    config = _write_config(tmp_path / "schemathesis.toml", fuzz_stack)
    _run_schemathesis(fuzz_stack.gateway.url, config, tmp_path)


#: The keyed gateway's key: the default owner's admin, so the fuzzer reaches the seeded model, job and dataset.
FUZZ_KEY = "fuzz-admin-secret-20261202"
#: Fewer cases with keys: what this run adds is the ignored-auth check (each operation probed without and with an
#: invalid key once it answered 2xx) and the schema's security with keys on; the open run fuzzed the rest.
KEYED_EXAMPLES = 8


def test_schemathesis_with_api_keys_finds_no_ignored_auth(fuzz_stack: FuzzStack, tmp_path: Path) -> None:
    env = {**GATEWAY_ENV, "DAE_API_KEYS": f"default:admin:{FUZZ_KEY}", "DAE_METRICS_REQUIRE_KEY": "true"}
    gateway = GatewayProcess(redis_url=fuzz_stack.gateway.env["DAE_REDIS_URL"],
                             store_dir=fuzz_stack.store_dir, log_path=tmp_path / "keyed-gateway.log",
                             extra_env=env).start()
    try:
        schema = httpx.get(f"{gateway.url}/openapi.json").json()
        for path, methods in schema["paths"].items():
            for method, operation in methods.items():
                expected = None if path in ("/healthz", "/readyz") else [{"ApiKey": []}]
                assert operation.get("security") == expected, (method, path)  # every route's security, open ones too
        assert httpx.get(f"{gateway.url}/metrics").status_code == 401
        config = _write_config(tmp_path / "schemathesis.toml", fuzz_stack, max_examples=KEYED_EXAMPLES)
        _run_schemathesis(gateway.url, config, tmp_path, "--phases", "examples,coverage,fuzzing",
                          "-H", f"X-API-Key: {FUZZ_KEY}")
    finally:
        gateway.stop()


def test_what_schemathesis_found_stays_fixed(fuzz_stack: FuzzStack) -> None:
    """Each finding of the fuzzer as one exact request (a seed change may stop generating it)."""
    with httpx.Client(base_url=fuzz_stack.gateway.url, timeout=10) as client:
        # Offsets beyond Redis' 64-bit ranks were a ResponseError, a 500.
        assert client.get("/jobs", params={"offset": 2**63}).status_code == 422
        # A Last-Event-ID Redis refuses broke the stream after its 200; now a 400 before it starts.
        events = client.get(f"/jobs/{fuzz_stack.job_id}/events", headers={"Last-Event-ID": "99999999999999999999-0"})
        assert events.status_code == 400 and events.headers["content-type"] == "application/json"
        # Allow named the first route's methods only.
        for path, allow in (("/datasets", "GET, POST"), (f"/jobs/{fuzz_stack.job_id}", "DELETE, GET")):
            response = client.options(path)
            assert (response.status_code, response.headers["allow"]) == (405, allow)
        # `true` was trained as kernel_size 1; whole floats still count as integers.
        spec = {**SEED_JOB, "architecture": {"type": "conv", "filters": [4], "kernel_size": True}}
        assert client.post("/jobs", json=spec).status_code == 422
        assert "epochs: Input should be a valid integer" in client.post("/jobs", json={**SEED_JOB, "epochs": "1"}).text
        whole = client.post("/jobs", json={**SEED_JOB, "epochs": 1.0})
        assert whole.status_code == 202 and whole.json()["spec"]["epochs"] == 1
        # Broken multipart: a 400 with the ErrorBody sentence (it was undocumented and said only "Invalid multipart").
        broken = client.post("/datasets", content=b"--b\r\nnot-a-header\r\n\r\nx\r\n--b--\r\n",
                             headers={"content-type": "multipart/form-data; boundary=b"})
        assert broken.status_code == 400 and "could not be parsed" in broken.json()["detail"]
    schema = httpx.get(f"{fuzz_stack.gateway.url}/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # every 422 is the ErrorBody it really is
    assert schema["paths"]["/jobs"]["get"]["security"] == [{"ApiKey": []}, {}]  # open gateway: key optional
    body = schema["paths"]["/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["allOf"][1] == {"properties": {"epochs": {"maximum": 5}}}  # DAE_MAX_EPOCHS
