"""Fixtures shared by every test package: a real Redis and a temporary model store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from testing.redis_server import RedisServer

# Quiet TensorFlow's C++ start-up chatter in test output; set before any test imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of a real Redis: the one at DAE_REDIS_URL, else a redis-server started for this session."""
    external = os.environ.get("DAE_REDIS_URL")
    if external:
        yield external
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A client of the test Redis. Tests use fresh ids, so no data is flushed (DAE_REDIS_URL may be shared)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An empty model store directory for one test."""
    path = tmp_path / "store"
    path.mkdir()
    return path
