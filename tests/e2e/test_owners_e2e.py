"""The name hijack of the first wave, end to end: two owners train `name=x` through a keyed gateway and a real
worker, and each owner's `/reconstruct {"model": "x"}` is answered by its own model, however the two jobs finish.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import pytest
import redis

from core.queue import TRAIN_QUEUE
from testing.gateway import GatewayProcess
from testing.processes import CeleryWorker, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

A_TRAIN, B_TRAIN, A_INFER = "e2e-a-train-secret-01", "e2e-b-train-secret-02", "e2e-a-infer-secret-03"
KEYS = f"team-a:train:{A_TRAIN},team-b:train:{B_TRAIN},team-a:infer:{A_INFER}"
#: A Redis database of this module: its jobs never reach another module's worker.
OWNERS_REDIS_DB = 13
JOB = {"name": "x", "dataset": "digits", "architecture": {"type": "dense", "hidden_units": [16], "latent_dim": 8},
       "epochs": 1, "batch_size": 64}
PIXELS = np.linspace(0, 1, 64).reshape(8, 8).round(2).tolist()


@pytest.fixture(scope="module")
def keyed_stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A worker and a gateway with three keys, sharing a store; yields the gateway's URL."""
    url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{OWNERS_REDIS_DB}"))
    root = tmp_path_factory.mktemp("owners-e2e")
    store_dir = root / "store"
    store_dir.mkdir()
    worker = CeleryWorker(redis_url=url, store_dir=store_dir, log_path=root / "worker.log").start()
    gateway = GatewayProcess(redis_url=url, store_dir=store_dir, log_path=root / "gateway.log",
                             extra_env={"DAE_API_KEYS": KEYS})
    try:
        gateway.start()
        yield gateway.url
    finally:
        gateway.stop()
        worker.stop()
        client = redis.Redis.from_url(url)
        client.delete(TRAIN_QUEUE)
        client.close()


def test_two_owners_train_the_same_name_and_each_reconstructs_its_own(keyed_stack: str) -> None:
    def call(key: str, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, keyed_stack + path, headers={"X-API-Key": key}, timeout=30, **kwargs)

    jobs = {key: call(key, "POST", "/jobs", json=JOB).json()["id"] for key in (A_TRAIN, B_TRAIN)}

    def finished(key: str) -> dict | None:
        record = call(key, "GET", f"/jobs/{jobs[key]}").json()
        return record if record["state"] in ("succeeded", "failed", "cancelled") else None

    records = {key: wait_until(lambda key=key: finished(key), 180, "both jobs to finish") for key in jobs}
    assert all(record["state"] == "succeeded" for record in records.values()), records
    a_model, b_model = records[A_TRAIN]["model_id"], records[B_TRAIN]["model_id"]
    assert a_model != b_model

    # Names and versions are per owner: each owner's x is its version 1, and resolves to its own model.
    for key, own in [(A_TRAIN, a_model), (A_INFER, a_model), (B_TRAIN, b_model)]:
        card = call(key, "GET", "/models/x").json()
        assert (card["id"], card["version"]) == (own, 1)
        answer = call(key, "POST", "/reconstruct", json={"model": "x", "pixels": PIXELS})
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"]["id"] == own
    # Another owner's id is not found, the infer key of the owner serves it, and the cards record their owners.
    assert call(B_TRAIN, "POST", "/reconstruct", json={"model": a_model, "pixels": PIXELS}).status_code == 404
    assert call(B_TRAIN, "GET", f"/jobs/{jobs[A_TRAIN]}/events").status_code == 404
    assert call(A_TRAIN, "GET", f"/models/{a_model}").json()["owner"] == "team-a"
    assert call(B_TRAIN, "GET", f"/models/{b_model}").json()["owner"] == "team-b"
