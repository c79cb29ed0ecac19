"""POST /reconstruct serves the caller's models: a name resolves inside the caller's owner, another owner's id is 404
like a missing one (an admin reaches every owner's ids, and names in its own owner), on the route and on the fast
lane alike; the engine resolves through the store's owner views and never serves a deleted model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from core.store import ModelStore
from dae.errors import ModelNotFound
from dae.spec import ModelCard
from service.auth import Principal, Role
from service.config import Settings
from service.deps import PRINCIPAL_STATE_KEY, get_app_settings
from service.inference.engine import InferenceEngine
from service.main import create_app
from tests.service.tiny_models import TinyModel, publish_tiny_model

PIXELS = np.linspace(0, 1, 64).reshape(8, 8).tolist()
A_INFER = Principal("team-a", Role.infer)
B_TRAIN = Principal("team-b", Role.train)
OPS_ADMIN = Principal("ops", Role.admin)


class Models:
    """`x` published by team-a and by team-b (version 1 each), and `y` by ops (the admin's own owner)."""

    def __init__(self, store_dir: Path, tiny: TinyModel) -> None:
        self.a = publish_tiny_model(ModelStore(store_dir, "team-a"), tiny, "x")
        self.b = publish_tiny_model(ModelStore(store_dir, "team-b"), tiny, "x")
        self.ops = publish_tiny_model(ModelStore(store_dir, "ops"), tiny, "y")


@pytest.fixture
def models(store_dir: Path, tiny_models: dict[str, TinyModel]) -> Models:
    return Models(store_dir, tiny_models["dense"])


class AsCaller:
    """Test-only: the caller the auth middleware would identify, set from the X-Test-Caller header (owner:role)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        for name, value in scope.get("headers", []):
            if name == b"x-test-caller":
                owner, role = value.decode().split(":")
                scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = Principal(owner, Role[role])
        await self.app(scope, receive, send)


def header(caller: Principal) -> dict[str, str]:
    return {"X-Test-Caller": f"{caller.owner}:{caller.role.name}"}


@pytest.fixture(params=["fast lane", "route"])
def client(request: pytest.FixtureRequest, settings: Settings) -> Iterator[TestClient]:
    """The app with the test caller middleware; "route" sets a dependency override, so the lane steps aside."""
    app = create_app(settings)
    app.add_middleware(AsCaller)
    if request.param == "route":
        app.dependency_overrides[get_app_settings] = lambda: settings
    with TestClient(app) as test_client:
        yield test_client


def reconstruct(client: TestClient, caller: Principal, ref: str) -> tuple[int, str | None]:
    answer = client.post("/reconstruct", json={"model": ref, "pixels": PIXELS}, headers=header(caller))
    return answer.status_code, answer.json()["model"]["id"] if answer.status_code == 200 else answer.text


def test_each_owner_gets_its_own_model_by_name(client: TestClient, models: Models) -> None:
    assert reconstruct(client, A_INFER, "x") == (200, models.a.id)
    assert reconstruct(client, B_TRAIN, "x") == (200, models.b.id)
    assert reconstruct(client, A_INFER, "x:1") == (200, models.a.id)
    assert reconstruct(client, B_TRAIN, "x:1") == (200, models.b.id)
    assert reconstruct(client, A_INFER, "x") == (200, models.a.id)  # a kept answer is per owner too


def test_another_owners_model_is_404_like_a_missing_one(client: TestClient, models: Models) -> None:
    assert reconstruct(client, A_INFER, models.a.id) == (200, models.a.id)  # loaded: the cache must not leak it
    status, text = reconstruct(client, B_TRAIN, models.a.id)
    missing_status, missing_text = reconstruct(client, B_TRAIN, "m_000000000000")
    assert status == missing_status == 404
    assert "team-a" not in str(text)
    assert str(text).replace(models.a.id, "m_000000000000") == missing_text  # the same answer as a missing model
    assert reconstruct(client, A_INFER, "y")[0] == 404  # another owner's name


def test_an_admin_reaches_every_owners_ids_and_names_in_its_own_owner(client: TestClient, models: Models) -> None:
    assert reconstruct(client, OPS_ADMIN, models.a.id) == (200, models.a.id)
    assert reconstruct(client, OPS_ADMIN, models.b.id) == (200, models.b.id)
    assert reconstruct(client, OPS_ADMIN, "y") == (200, models.ops.id)
    assert reconstruct(client, OPS_ADMIN, "x")[0] == 404


def test_without_keys_every_caller_is_the_default_owners_admin(settings: Settings, models: Models,
                                                              dense_card: ModelCard) -> None:
    with TestClient(create_app(settings)) as client:  # no test caller: OPEN_ACCESS
        for ref, expected in [(dense_card.name, dense_card.id), (models.a.id, models.a.id)]:
            answer = client.post("/reconstruct", json={"model": ref, "pixels": PIXELS})
            assert answer.status_code == 200 and answer.json()["model"]["id"] == expected
        assert client.post("/reconstruct", json={"model": "x", "pixels": PIXELS}).status_code == 404


def test_the_engine_keeps_resolutions_per_owner_and_drops_deleted_models(store_dir: Path, models: Models) -> None:
    engine = InferenceEngine(ModelStore(store_dir), batch_timeout_ms=1.0, intra_op_threads=1)

    async def scenario() -> None:
        assert (await engine.model("x", "team-a", every_owner=False)).model_id == models.a.id
        assert (await engine.model("x", "team-b", every_owner=False)).model_id == models.b.id
        with pytest.raises(ModelNotFound):
            await engine.model(models.a.id, "team-b", every_owner=False)
        assert (await engine.model(models.a.id, "ops", every_owner=True)).model_id == models.a.id
        ModelStore(store_dir, "team-a").delete_model("x")  # by another process: no evict() call
        for owner, every_owner in [("team-a", False), ("ops", True)]:
            with pytest.raises(ModelNotFound):
                await engine.model(models.a.id, owner, every_owner=every_owner)
        with pytest.raises(ModelNotFound):
            await engine.model("x", "team-a", every_owner=False)
        assert (await engine.model("x", "team-b", every_owner=False)).model_id == models.b.id

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
