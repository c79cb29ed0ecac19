"""The whole service as real processes: redis-server, a celery worker and the uvicorn gateway."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from testing.gateway import GatewayProcess
from testing.processes import CeleryWorker
from tests.e2e.stack import Stack


@pytest.fixture(scope="module")
def stack(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One worker and one gateway sharing a store, for the tests of a module."""
    root = tmp_path_factory.mktemp("e2e")
    store_dir = root / "store"
    store_dir.mkdir()
    worker = CeleryWorker(redis_url=redis_url, store_dir=store_dir, log_path=root / "worker.log").start()
    gateway = GatewayProcess(redis_url=redis_url, store_dir=store_dir, log_path=root / "gateway.log")
    try:
        gateway.start()
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            yield Stack(gateway=gateway, worker=worker, store_dir=store_dir, client=client)
    finally:
        gateway.stop()
        worker.stop()
