"""/docs and /redoc work without internet (issue 13, point 5): Debian's chromium driven by Playwright, every
request to a host other than the gateway aborted, against a real uvicorn gateway and a real redis-server.

Swagger UI's POST /jobs example is pressed (202) and POST /reconstruct's example runs against a tiny model
published as `digits-demo`, the name the examples use (200). The control: FastAPI's default page, which loads
Swagger UI from a CDN, renders no operation under the same blocking, so these tests can fail.
"""

from __future__ import annotations

import itertools
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np
import onnx
import pytest
import redis
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from core.queue import TRAIN_QUEUE
from core.store import ModelStore
from dae.spec import TrainingSpec
from service.config import Settings
from service.docs import DOCS_ASSETS_PATH
from service.main import create_app
from testing.gateway import GatewayProcess
from tests.service.tiny_models import TinyModel, publish_tiny_model

pytestmark = pytest.mark.e2e

#: Debian's browser (scripts/ensure-system-packages installs it); Playwright's own browser download is not used.
CHROMIUM = shutil.which("chromium")
#: The Redis database of this module's gateway: the job the example submits must reach no worker of another module.
DOCS_REDIS_DB = 12
#: The model name the OpenAPI examples use (ReconstructRequest's examples).
MODEL_NAME = "digits-demo"
#: A loaded 2-core machine parses Swagger UI's 1.5 MB bundle and the OpenAPI document in seconds, not milliseconds.
UI_TIMEOUT_MS = 30_000


def dense_autoencoder(path: Path) -> TinyModel:
    """A dense 8x8x1 DAE (64-16-8-16-64, ReLU) with random weights, written with the onnx package.

    The same graph Keras exports for tests/service/tiny_models.py's dense model, without TensorFlow's ~8 s of
    start-up: this module tests the docs pages, not the export.
    """
    rng = np.random.default_rng(0)
    widths = [64, 16, 8, 16, 64]
    nodes = [helper.make_node("Reshape", ["image", "flat_shape"], ["layer0"])]
    weights = [numpy_helper.from_array(np.array([-1, 64], np.int64), "flat_shape"),
               numpy_helper.from_array(np.array([-1, 8, 8, 1], np.int64), "image_shape")]
    for layer, (fan_in, fan_out) in enumerate(itertools.pairwise(widths)):
        kernel = rng.normal(0, fan_in**-0.5, (fan_in, fan_out)).astype(np.float32)
        weights += [numpy_helper.from_array(kernel, f"w{layer}"),
                    numpy_helper.from_array(np.zeros(fan_out, np.float32), f"b{layer}")]
        nodes += [helper.make_node("MatMul", [f"layer{layer}", f"w{layer}"], [f"matmul{layer}"]),
                  helper.make_node("Add", [f"matmul{layer}", f"b{layer}"], [f"dense{layer}"])]
        last = layer == len(widths) - 2
        nodes.append(helper.make_node("Identity" if last else "Relu", [f"dense{layer}"], [f"layer{layer + 1}"]))
    nodes.append(helper.make_node("Reshape", [f"layer{len(widths) - 1}", "image_shape"], ["denoised"]))
    graph = helper.make_graph(
        nodes, "dense_dae",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [helper.make_tensor_value_info("denoised", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        initializer=weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    spec = TrainingSpec.model_validate(
        {"dataset": "digits", "epochs": 1, "architecture": {"type": "dense", "hidden_units": [16], "latent_dim": 8}}
    )
    parameters = sum(fan_in * fan_out + fan_out for fan_in, fan_out in itertools.pairwise(widths))
    return TinyModel(path, spec, (8, 8, 1), parameters)


@pytest.fixture(scope="module")
def gateway(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A uvicorn gateway with a tiny dense model published as `digits-demo`."""
    root = tmp_path_factory.mktemp("docs")
    store_dir = root / "store"
    store_dir.mkdir()
    publish_tiny_model(ModelStore(store_dir), dense_autoencoder(root / "dense.onnx"), MODEL_NAME)
    url = urlunsplit(urlsplit(redis_url)._replace(path=f"/{DOCS_REDIS_DB}"))
    process = GatewayProcess(
        redis_url=url, store_dir=store_dir, log_path=root / "gateway.log",
        extra_env={"DAE_INFERENCE_INTRA_OP_THREADS": "1"},
    )
    try:
        yield process.start()
    finally:
        process.stop()
        client = redis.Redis.from_url(url)
        client.delete(TRAIN_QUEUE)
        client.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium."""
    if CHROMIUM is None:
        pytest.fail("Debian's chromium is not installed. Expected /usr/bin/chromium. Received: none "
                    "(run scripts/ensure-system-packages, or apt-get install -y chromium)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class OfflinePage:
    """A page whose requests reach the gateway only; `blocked` lists every other URL it asked for."""

    page: Page
    blocked: list[str] = field(default_factory=list)


@pytest.fixture
def offline(browser: Browser, gateway: GatewayProcess) -> Iterator[OfflinePage]:
    context = browser.new_context(base_url=gateway.url)
    context.set_default_timeout(UI_TIMEOUT_MS)
    offline_page = OfflinePage(context.new_page())
    own_host = urlsplit(gateway.url).netloc

    def gateway_only(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own_host:
            route.continue_()
        else:
            offline_page.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    context.route("**/*", gateway_only)
    try:
        yield offline_page
    finally:
        context.close()


def press_example(page: Page, operation_id: str, path: str) -> tuple[int, dict]:
    """Open an operation in Swagger UI, press "Try it out" then "Execute" with its pre-filled example.

    Returns the status Swagger UI shows and the JSON body the gateway answered.
    """
    operation = page.locator(f"#operations-{operation_id.split('-')[0]}-{operation_id}")
    operation.locator(".opblock-summary-control").click()
    operation.get_by_role("button", name="Try it out").click()
    with page.expect_response(lambda response: urlsplit(response.url).path == path) as answered:
        operation.get_by_role("button", name="Execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status")
    expect(status).to_have_text(re.compile(r"^\s*\d{3}"), timeout=UI_TIMEOUT_MS)
    return int(status.inner_text().split()[0]), answered.value.json()


def test_swagger_ui_presses_the_examples_with_other_hosts_blocked(offline: OfflinePage, gateway: GatewayProcess):
    page = offline.page
    page.goto("/docs")
    expect(page.locator(".opblock").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    assert page.locator(".opblock").count() == len(operation_ids(gateway))

    status, job = press_example(page, "jobs-create_job", "/jobs")
    assert status == 202, job
    assert httpx.get(f"{gateway.url}/jobs/{job['id']}", timeout=10).json()["state"] == "queued"

    status, answer = press_example(page, "reconstruct-reconstruct_images", "/reconstruct")
    assert status == 200, answer
    assert answer["model"]["name"] == MODEL_NAME, answer["model"]
    assert offline.blocked == []


def test_redoc_renders_its_operations_with_other_hosts_blocked(offline: OfflinePage, gateway: GatewayProcess):
    page = offline.page
    page.goto("/redoc")
    operations = page.locator("[data-section-id*='operation/']")
    expect(operations.first).to_be_visible(timeout=UI_TIMEOUT_MS)
    rendered = {section.split("operation/")[-1] for section in operations.evaluate_all(
        "sections => sections.map(section => section.dataset.sectionId)")}
    assert rendered == operation_ids(gateway)
    assert offline.blocked == []


def test_fastapis_cdn_page_renders_no_operation_with_other_hosts_blocked(offline: OfflinePage):
    # The control: the page FastAPI serves by default, on the same origin, its assets on a CDN.
    cdn_page = get_swagger_ui_html(openapi_url="/openapi.json", title="DAE service - Swagger UI")
    offline.page.route("**/docs", lambda route: route.fulfill(body=bytes(cdn_page.body), content_type="text/html"))
    offline.page.goto("/docs", wait_until="load")
    assert any(urlsplit(url).netloc == "cdn.jsdelivr.net" for url in offline.blocked), offline.blocked
    assert offline.page.evaluate("typeof window.SwaggerUIBundle") == "undefined"
    assert offline.page.locator(".opblock").count() == 0


def test_docs_pages_and_their_assets_need_no_api_key(tmp_path: Path):
    keyed = create_app(Settings(api_keys="k-one", store_dir=tmp_path))
    client = TestClient(keyed)  # no lifespan: the docs need neither Redis nor the store
    swagger = client.get("/docs")
    assert swagger.status_code == 200
    assets = re.findall(rf'"({DOCS_ASSETS_PATH}/[^"]+)"', swagger.text + client.get("/redoc").text)
    assert {asset.rsplit("/", 1)[-1] for asset in assets} == {
        "swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png"
    }
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert client.get("/docs/oauth2-redirect").status_code == 200
    assert client.get("/jobs").status_code == 401


def operation_ids(gateway: GatewayProcess) -> set[str]:
    """Every operationId the gateway documents."""
    schema = httpx.get(f"{gateway.url}/openapi.json", timeout=10).json()
    return {
        operation["operationId"]
        for methods in schema["paths"].values()
        for operation in methods.values()
        if isinstance(operation, dict) and "operationId" in operation
    }

