"""POST /reconstruct through the direct lane answers exactly as through the full FastAPI stack."""

from __future__ import annotations

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.service.tiny_models import png_base64, png_bytes

IMAGE = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
API_KEY = "lane-test-key"


class FullStackOnly:
    """The same app, entered through FastAPI.__call__: the framework's middleware stack and router, no lane."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        await FastAPI.__call__(self.app, scope, receive, send)


def requests_to_compare(model: str) -> list[tuple[str, dict]]:
    """(label, httpx request arguments) covering success, every error class and both body types."""
    good = {"model": model, "image": png_base64(IMAGE)}
    headers = {"X-API-Key": API_KEY}
    return [
        ("json", {"json": good, "headers": headers}),
        ("compact", {"json": good, "headers": headers, "params": {"error_format": "f32", "heatmap": "false"}}),
        ("png accept", {"json": good, "headers": {**headers, "Accept": "image/png"}}),
        ("multipart", {"data": {"model": model}, "files": {"file": ("x.png", png_bytes(IMAGE), "image/png")},
                       "headers": headers}),
        ("422 field", {"json": {"model": model}, "headers": headers}),
        ("422 json", {"content": b"{not json", "headers": {**headers, "Content-Type": "application/json"}}),
        ("422 query", {"json": good, "headers": headers, "params": {"format": "gif"}}),
        ("404 model", {"json": {**good, "model": "no-such-model"}, "headers": headers}),
        ("415", {"content": b"x", "headers": {**headers, "Content-Type": "text/plain"}}),
        ("413", {"content": b"x" * 2_000_000, "headers": {**headers, "Content-Type": "application/json"}}),
        ("401", {"json": good}),
        ("403", {"json": good, "headers": {"X-API-Key": "wrong"}}),
    ]


@pytest.fixture
def lane_settings(settings: Settings) -> Settings:
    return Settings(**{**settings.model_dump(), "api_keys": [API_KEY], "max_upload_mb": 1})


def test_lane_and_full_stack_give_identical_answers(lane_settings, dense_card):
    app = create_app(lane_settings)
    assert app.direct_lane is not None
    with TestClient(app) as lane, TestClient(FullStackOnly(app)) as full:
        for label, arguments in requests_to_compare(dense_card.name):
            via_lane = lane.post("/reconstruct", **arguments)
            via_full = full.post("/reconstruct", **arguments)
            assert via_lane.status_code == via_full.status_code, label
            assert via_lane.content == via_full.content, label
            for header in ("content-type", "www-authenticate", "x-mean-l1-error", "retry-after"):
                assert via_lane.headers.get(header) == via_full.headers.get(header), (label, header)
        statuses = [lane.post("/reconstruct", **arguments).status_code for _, arguments in requests_to_compare("m")]
        assert set(statuses) >= {401, 403, 404, 413, 415, 422}


def test_the_lane_does_not_enter_the_framework_stack(settings, dense_card):
    """With the framework's middleware stack broken, POST /reconstruct still answers; other paths do not."""
    app = create_app(settings)

    async def broken_stack(scope, receive, send) -> None:
        raise RuntimeError("the framework stack was entered")

    with TestClient(app, raise_server_exceptions=True) as client:
        app.middleware_stack = broken_stack
        answer = client.post("/reconstruct", json={"model": dense_card.name, "image": png_base64(IMAGE)})
        assert answer.status_code == 200
        assert answer.json()["results"][0]["shape"] == [8, 8, 1]
        with pytest.raises(RuntimeError, match="framework stack was entered"):
            client.get("/healthz")
        with pytest.raises(RuntimeError, match="framework stack was entered"):
            client.get("/reconstruct")  # other methods take the full stack (and get its 405)


def test_lane_requests_are_counted_under_the_route_template(settings, dense_card):
    with TestClient(create_app(settings)) as client:
        for _ in range(3):
            assert client.post("/reconstruct", json={"model": dense_card.name, "image": png_base64(IMAGE)}).status_code == 200
        assert client.post("/reconstruct", json={"model": "nope", "image": png_base64(IMAGE)}).status_code == 404
        metrics = client.get("/metrics").text
    counted = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("dae_http_requests_total{") and 'route="/reconstruct"' in line}
    assert sum(value for key, value in counted.items() if 'status="200"' in key) == 3
    assert sum(value for key, value in counted.items() if 'status="404"' in key) == 1
