"""POST /reconstruct is an ordinary FastAPI route: the app's middleware, dependency overrides and root_path apply."""

from __future__ import annotations

import numpy as np
from fastapi.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import Settings
from service.deps import get_app_settings
from service.main import create_app
from tests.service.tiny_models import png_base64, png_bytes

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


# ---------------------------------------------------------------------------------------------
# The fast lane (service.fast_lane): the same answers as the route, behind every middleware
# ---------------------------------------------------------------------------------------------

API_KEY = "lane-test-key"


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
        ("401 unknown key", {"json": good, "headers": {"X-API-Key": "wrong"}}),
    ]


def test_the_lane_and_the_route_give_identical_answers(settings, dense_card):
    lane_settings = Settings(**{**settings.model_dump(), "api_keys": [API_KEY], "max_upload_mb": 1})
    lane_app, route_app = create_app(lane_settings), create_app(lane_settings)
    route_app.dependency_overrides[get_app_settings] = lambda: lane_settings  # any override: the route serves
    served: list[str] = []
    import service.fast_lane as fast_lane_module

    original = fast_lane_module.serve

    async def recording(request):
        served.append("lane")
        return await original(request)

    fast_lane_module.serve = recording
    try:
        with TestClient(lane_app) as lane, TestClient(route_app) as route:
            for label, arguments in requests_to_compare(dense_card.name):
                via_lane = lane.post("/reconstruct", **arguments)
                via_route = route.post("/reconstruct", **arguments)
                assert via_lane.status_code == via_route.status_code, label
                assert via_lane.content == via_route.content, label
                for header in ("content-type", "www-authenticate", "x-mean-l1-error", "retry-after"):
                    assert via_lane.headers.get(header) == via_route.headers.get(header), (label, header)
    finally:
        fast_lane_module.serve = original
    assert served, "the lane never served"
    assert len(served) <= len(requests_to_compare(dense_card.name))  # the route's requests did not take it


def test_every_middleware_of_the_list_wraps_the_lane(settings):
    from service.app import middleware
    from service.fast_lane import ReconstructLane
    from service.metrics import GatewayMetrics

    stack = middleware(settings, GatewayMetrics())
    assert stack[-1].cls is ReconstructLane  # innermost: every other middleware runs before it
    app = create_app(settings)
    assert [entry.cls for entry in app.user_middleware] == [entry.cls for entry in stack]
