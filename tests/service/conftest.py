"""Fixtures of the gateway tests: an app over the real test Redis, a temporary store and tiny ONNX models
(built once per session by tests/service/tiny_models.py, published into each test's store)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis
from fastapi.testclient import TestClient

from core.queue import TRAIN_QUEUE
from core.store import ModelStore
from dae.spec import ModelCard
from service.config import Settings
from service.main import create_app
from tests.service.tiny_models import TinyModel, build_tiny_models, publish_tiny_model

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    """A dense 8x8x1 and a conv (factor 4) DAE with random weights, exported to ONNX once per session."""
    return build_tiny_models(tmp_path_factory.mktemp("onnx"))


#: The gateway tests use a Redis database of their own: the training messages they queue must never reach a
#: worker started by another test package on the same Redis (db 0).
SERVICE_REDIS_DB = 11


@pytest.fixture(scope="session")
def service_redis_url(redis_url: str) -> Iterator[str]:
    """The test Redis, database SERVICE_REDIS_DB; its training queue is dropped at the end of the session."""
    url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{SERVICE_REDIS_DB}"))
    yield url
    client = redis.Redis.from_url(url)
    client.delete(TRAIN_QUEUE)
    client.close()


@pytest.fixture
def settings(service_redis_url: str, store_dir: Path) -> Settings:
    """Gateway settings for one test: the test Redis (own database), an empty store, auth off."""
    return Settings(redis_url=service_redis_url, store_dir=store_dir, inference_intra_op_threads=1)


@pytest.fixture
def service_redis(service_redis_url: str) -> Iterator[redis.Redis]:
    """A client of the gateway tests' Redis database."""
    client = redis.Redis.from_url(service_redis_url)
    yield client
    client.close()


@pytest.fixture
def store(store_dir: Path) -> ModelStore:
    """The test's model store (the one `settings` points at)."""
    return ModelStore(store_dir)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """A TestClient of a fresh app; the lifespan runs (connects to Redis) inside the with block."""
    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture
def dense_card(store: ModelStore, tiny_models: dict[str, TinyModel]) -> ModelCard:
    """The tiny dense model (8x8x1), published as `dense-test`."""
    return publish_tiny_model(store, tiny_models["dense"], "dense-test")


@pytest.fixture
def conv_card(store: ModelStore, tiny_models: dict[str, TinyModel]) -> ModelCard:
    """The tiny conv model (any size, padded to multiples of 4), published as `conv-test`."""
    return publish_tiny_model(store, tiny_models["conv"], "conv-test")


