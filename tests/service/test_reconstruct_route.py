"""POST /reconstruct is an ordinary FastAPI route: the app's middleware, dependency overrides and root_path apply."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.deps import get_app_settings
from service.main import create_app
from tests.service.tiny_models import png_base64

IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)


def test_requests_are_counted_under_the_route_template(settings, dense_card):
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            assert client.post("/reconstruct", json={"model": dense_card.name, "image": png_base64(IMAGE)}).status_code == 200
        assert client.post("/reconstruct", json={"model": "nope", "image": png_base64(IMAGE)}).status_code == 404
        metrics = client.get("/metrics").text
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("dae_http_requests_total{") and 'route="/reconstruct"' in line}
    assert sum(value for key, value in counted.items() if 'status="200"' in key) == 3
    assert sum(value for key, value in counted.items() if 'status="404"' in key) == 1


class SeenPaths:
    """A middleware added the usual way (app.add_middleware), recording the paths it saw."""

    seen: list[str] = []

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            SeenPaths.seen.append(f"{scope['method']} {scope['path']}")
        await self.app(scope, receive, send)


def test_a_middleware_added_the_usual_way_runs_on_reconstruct(settings, dense_card):
    app = create_app(settings)
    app.add_middleware(SeenPaths)
    SeenPaths.seen.clear()
    with TestClient(app) as client:
        answer = client.post("/reconstruct", json={"model": dense_card.name, "image": png_base64(IMAGE)})
    assert answer.status_code == 200
    assert "POST /reconstruct" in SeenPaths.seen


def test_dependency_overrides_apply_to_reconstruct(settings, dense_card):
    app = create_app(settings)
    tiny = Settings(**{**settings.model_dump(), "max_batch_images": 1})
    app.dependency_overrides[get_app_settings] = lambda: tiny
    with TestClient(app) as client:
        answer = client.post("/reconstruct", json={"model": dense_card.name, "images": [{"image": png_base64(IMAGE)}] * 2})
    assert answer.status_code == 413
    assert "DAE_MAX_BATCH_IMAGES" in answer.json()["detail"]


def test_reconstruct_answers_under_a_root_path(settings, dense_card):
    with TestClient(create_app(settings), root_path="/gateway") as client:
        answer = client.post("/gateway/reconstruct", json={"model": dense_card.name, "image": png_base64(IMAGE)})
    assert answer.status_code == 200, answer.text
    assert answer.json()["results"][0]["shape"] == [8, 8, 1]
