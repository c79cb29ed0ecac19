"""The whole service as real processes: redis-server, a celery worker and the uvicorn gateway."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.e2e.gateway_process import GatewayProcess
from tests.processes import CeleryWorker


@dataclass
class Stack:
    """Handles on the running processes."""

    gateway: GatewayProcess
    worker: CeleryWorker
    store_dir: Path
    client: httpx.Client


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
