"""Hostile and heavy /reconstruct requests: decode budgets checked from headers, bounded memory, a free event loop.

The process tests drive a real `uvicorn service.main:app` (tests/e2e/gateway_process.py) and read its memory from
/proc; they print their figures (run with -s to see them). The boundary tests use the in-process app.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import shutil
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import service.reconstruct.formats as formats_module
import service.reconstruct.parsing as parsing_module
import service.reconstruct.pipeline as pipeline_module
from core.store import ModelStore
from dae.spec import TrainingSpec
from service.config import Settings
from service.imaging.codec import float32_base64
from service.inference.engine import TRIM_DELAY_S
from service.main import create_app
from testing.gateway import GatewayProcess
from tests.service.tiny_models import TinyModel, png_base64, publish_tiny_model

RNG = np.random.default_rng(12)
MIB = 1024 * 1024


def png_b64(pixels: np.ndarray, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def black_png(side: int) -> str:
    return png_b64(np.zeros((side, side), np.uint8))


def garbage_png(height: int, width: int) -> str:
    """A PNG whose IHDR says height x width and whose pixel data is garbage: only decoding can tell."""
    garbage = bytes(range(256)) * 4

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    content = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", garbage) + chunk(b"IEND", b"")
    return base64.b64encode(content).decode()


def limited(settings: Settings, **changes) -> Settings:
    return Settings(**{**settings.model_dump(), **changes})


# ---------------------------------------------------------------------------------------------
# The decode budget (DAE_MAX_REQUEST_PIXELS) and the image count, at their boundaries, before decoding
# ---------------------------------------------------------------------------------------------

BUDGET = 1200


def sources_of(values: int) -> dict[str, dict]:
    """One request body per source kind whose images decode to exactly `values` float32 values."""
    rows = values // 12  # every kind below has 12 values per row (12 gray, 4 RGB pixels; RGBA counts as RGB)
    gray = RNG.integers(0, 256, (rows, 12), dtype=np.uint8)
    rgb = RNG.integers(0, 256, (rows, 4, 3), dtype=np.uint8)
    rgba = RNG.integers(0, 256, (rows, 4, 4), dtype=np.uint8)
    return {
        "png gray": {"image": png_b64(gray)},
        "png rgb": {"image": png_b64(rgb)},
        "png rgba (alpha not counted)": {"image": png_b64(rgba)},
        "jpeg": {"image": png_b64(rgb, "JPEG")},
        "pixels": {"pixels": (gray / 255).tolist()},
        "array uint8": {"array": {"data": base64.b64encode(gray.tobytes()).decode(), "shape": [rows, 12, 1],
                                  "dtype": "uint8"}},
        "4-D array": {"array": {"data": float32_base64(np.zeros((rows, 3, 4, 1))), "shape": [rows, 3, 4, 1]}},
        "batch of 3": {"images": [{"pixels": np.zeros((rows, 4)).tolist()}] * 3},
    }


@pytest.fixture
def budget_client(settings, conv_card) -> Iterator[TestClient]:
    with TestClient(create_app(limited(settings, max_request_pixels=BUDGET))) as client:
        yield client


@pytest.mark.parametrize("kind", list(sources_of(BUDGET)))
def test_the_decode_budget_admits_exactly_its_size_and_refuses_one_row_more(budget_client, kind):
    at_budget = budget_client.post("/reconstruct", json={"model": "conv-test", **sources_of(BUDGET)[kind]})
    assert at_budget.status_code == 200, at_budget.text
    over = budget_client.post("/reconstruct", json={"model": "conv-test", **sources_of(BUDGET + 12)[kind]})
    assert over.status_code == 413, over.text
    detail = over.json()["detail"]
    assert f"Expected at most {BUDGET} pixel values" in detail and "DAE_MAX_REQUEST_PIXELS" in detail
    assert f"Received: {BUDGET + 12} values in" in detail


def test_clean_references_count_against_the_same_budget(budget_client):
    half = np.zeros((50, 12))  # 600 values
    body = {"model": "conv-test", "pixels": half.tolist(), "clean": {"pixels": half.tolist()}}
    assert budget_client.post("/reconstruct", json=body).status_code == 200
    body["clean"] = {"pixels": np.zeros((51, 12)).tolist()}  # 612 values: 1212 in all
    over = budget_client.post("/reconstruct", json=body)
    assert over.status_code == 413
    assert "Received: 1212 values (600 in 1 image(s), 612 in 1 clean image(s))" in over.json()["detail"]


def test_an_oversized_request_is_refused_from_headers_without_decoding_anything(settings, conv_card, monkeypatch):
    """Images whose pixel data is garbage: over the budget the answer is 413 (nothing was decoded, or the
    garbage would be a 422); within it the garbage is found by decoding (422)."""
    decoded: list[int] = []
    decode_call = pipeline_module.decode_call
    monkeypatch.setattr(pipeline_module, "decode_call", lambda *args: decoded.append(1) or decode_call(*args))
    with TestClient(create_app(limited(settings, max_request_pixels=64 * 64 * 4))) as client:
        over = client.post("/reconstruct", json={"model": "conv-test", "images": [{"image": garbage_png(64, 64)}] * 5})
        assert over.status_code == 413 and "Received: 20480 values in 5 image(s)" in over.json()["detail"]
        assert decoded == []
        within = client.post("/reconstruct",
                             json={"model": "conv-test", "images": [{"image": garbage_png(64, 64)}] * 4})
        assert within.status_code == 422 and "could not be decoded" in within.json()["detail"]
        assert decoded == [1]


def test_the_image_count_is_checked_before_any_header_is_read(settings, conv_card):
    with TestClient(create_app(limited(settings, max_batch_images=4))) as client:
        at_limit = client.post("/reconstruct", json={"model": "conv-test", "images": [{"image": "%%%"}] * 4})
        assert at_limit.status_code == 422 and "not valid base64" in at_limit.json()["detail"]  # read: counted 4
        over = client.post("/reconstruct", json={"model": "conv-test", "images": [{"image": "%%%"}] * 5})
        assert over.status_code == 413
        assert "Expected at most 4 (DAE_MAX_BATCH_IMAGES). Received: 5" in over.json()["detail"]
        stacked = {"data": "%%%", "shape": [5, 2, 2, 1]}  # a 4-D array counts its N, before its data is read
        assert client.post("/reconstruct", json={"model": "conv-test", "array": stacked}).status_code == 413
        clean = client.post("/reconstruct", json={"model": "conv-test", "pixels": [[0.5]],
                                                  "clean": [{"image": "%%%"}] * 5})
        assert clean.status_code == 413 and "Too many clean images" in clean.json()["detail"]


def test_a_request_larger_than_the_whole_queue_is_413_and_one_that_fits_it_exactly_is_served(settings, conv_card):
    image = {"pixels": np.zeros((8, 8)).tolist()}
    with TestClient(create_app(limited(settings, inference_queue_max_values=4 * 64))) as client:
        fits = client.post("/reconstruct", json={"model": "conv-test", "images": [image] * 4})
        assert fits.status_code == 200
        over = client.post("/reconstruct", json={"model": "conv-test", "images": [image] * 5})
        assert over.status_code == 413
        detail = over.json()["detail"]
        assert "Expected at most 256 pixel values (DAE_INFERENCE_QUEUE_MAX_VALUES). Received: 320" in detail


def test_a_chunked_body_is_limited_by_the_bytes_read_and_the_connection_closed_at_413(settings, conv_card):
    """DAE_MAX_UPLOAD_MB counts a chunked body as it streams: its limit exactly passes (and is then parsed), one
    byte more is a 413 that closes the connection (or the server would read on for as long as the client sends)."""
    limit = 256 * 1024

    def chunked(size: int):
        for start in range(0, size, 10_000):
            yield b" " * min(10_000, size - start)

    headers = {"content-type": "application/json"}
    with TestClient(create_app(limited(settings, max_upload_mb=limit / MIB))) as client:
        at_limit = client.post("/reconstruct", content=chunked(limit), headers=headers)
        assert at_limit.status_code == 422 and "not valid JSON" in at_limit.json()["detail"]  # read whole, parsed
        over = client.post("/reconstruct", content=chunked(limit + 1), headers=headers)
        assert over.status_code == 413 and over.headers["connection"] == "close"
        detail = over.json()["detail"]
        assert f"Expected at most {limit} bytes (DAE_MAX_UPLOAD_MB). Received: more than {limit}" in detail


# ---------------------------------------------------------------------------------------------
# The same answers from the fast paths: pieces, worker threads, blocked JSON
# ---------------------------------------------------------------------------------------------


def varied_bodies() -> list[tuple[str, dict, dict]]:
    """(label, query, body): sizes that need padding, several sizes in one request, clean references, noise."""
    odd = [RNG.random((7, 9)).tolist(), RNG.random((12, 16)).tolist(), RNG.random((7, 9)).tolist()]
    batch = {"model": "conv-test", "images": [{"pixels": pixels} for pixels in odd * 3]}
    return [
        ("full", {}, batch),
        ("array", {"format": "array"}, batch),
        ("f32", {"format": "f32", "error_format": "f32"}, batch),
        ("png maps", {"error_format": "png"}, batch),
        ("clean + noise", {}, {**batch, "clean": batch["images"], "add_noise": {"type": "gaussian", "level": 0.2}}),
        ("one large", {"format": "array"}, {"model": "conv-test", "pixels": RNG.random((300, 301)).tolist()}),
    ]


def test_pieces_worker_threads_and_blocked_json_answer_byte_for_byte_like_the_plain_path(
    settings, conv_card, monkeypatch
):
    """The plain path (whole runs, everything inline, orjson on the whole body) against the bounded one (pieces of
    2 images, every step in a worker thread, arrays serialized in small blocks, the answer streamed in blocks)."""
    plain = limited(settings, inference_batch_max_size=64, inference_batch_max_values=10**9)
    bounded = limited(settings, inference_batch_max_size=2, inference_batch_max_values=2 * 12 * 16)
    answers: dict[str, list[bytes]] = {}
    bodies = varied_bodies()
    for label, app_settings, inline_limit, block in (("plain", plain, 10**12, 10**9), ("bounded", bounded, 0, 100)):
        monkeypatch.setattr(parsing_module, "INLINE_WORK_LIMIT", inline_limit)
        monkeypatch.setattr(pipeline_module, "INLINE_WORK_LIMIT", inline_limit)
        monkeypatch.setattr(formats_module, "JSON_BLOCK_VALUES", block)
        monkeypatch.setattr(pipeline_module, "ANSWER_BLOCK_VALUES", 2 * block)  # two 7x9 entries per block
        app = create_app(app_settings)
        with TestClient(app) as client:
            answers[label] = []
            for name, query, body in bodies:
                response = client.post("/reconstruct", params=query, json=body)
                assert response.status_code == 200, (label, name, response.text)
                assert ("content-length" in response.headers) == (label == "plain"), (label, name)  # bounded: streamed
                answers[label].append(response.content)
            sizes = list(app.state.resources.inference.stats.recent_batch_sizes)
        assert max(sizes) <= (64 if label == "plain" else 2), sizes
    for (name, _, _), plain_answer, bounded_answer in zip(bodies, answers["plain"], answers["bounded"], strict=True):
        assert bounded_answer == plain_answer, name
    one_large = json.loads(answers["plain"][-1])["results"][0]
    assert one_large["shape"] == [300, 301, 1] and len(one_large["denoised"]) == 300  # padded, cropped, contiguous


def test_json_fragments_are_what_orjson_writes_for_the_whole_array(monkeypatch):
    import orjson  # noqa: PLC0415

    monkeypatch.setattr(formats_module, "JSON_BLOCK_VALUES", 7)
    for shape in [(1, 1), (5, 3), (13, 4), (3, 4, 3), (1, 50)]:
        array = RNG.random(shape, dtype=np.float32)
        expected = orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY)
        assert orjson.dumps(formats_module.json_fragment(array)) == expected, shape


def _thread_of_decoding(monkeypatch) -> list[str]:
    where: list[str] = []
    decode_call = pipeline_module.decode_call

    def recording(*args):
        try:
            asyncio.get_running_loop()
            where.append("event loop")
        except RuntimeError:
            where.append("worker thread")
        return decode_call(*args)

    monkeypatch.setattr(pipeline_module, "decode_call", recording)
    return where


def test_large_bodies_are_decoded_off_the_loop_by_bytes_read_even_when_chunked(client, conv_card, monkeypatch):
    where = _thread_of_decoding(monkeypatch)
    small = json.dumps({"model": "conv-test", "image": png_base64(RNG.random((8, 8)))}).encode()
    big = small[:-1] + b" " * parsing_module.INLINE_WORK_LIMIT + b"}"  # the same request, padded with whitespace

    def chunked(body: bytes):
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    headers = {"content-type": "application/json"}
    assert client.post("/reconstruct", content=small, headers=headers).status_code == 200
    assert client.post("/reconstruct", content=chunked(small), headers=headers).status_code == 200
    answer = client.post("/reconstruct", content=big, headers=headers)
    assert answer.status_code == 200, answer.text
    assert client.post("/reconstruct", content=chunked(big), headers=headers).status_code == 200
    assert where == ["event loop", "event loop", "worker thread", "worker thread"]


def test_a_small_body_that_decodes_to_many_pixels_is_decoded_off_the_loop(client, conv_card, monkeypatch):
    where = _thread_of_decoding(monkeypatch)
    body = {"model": "conv-test", "image": black_png(512)}  # ~1 KB of base64, 262,144 values
    assert len(body["image"]) < 2048
    answer = client.post("/reconstruct", params={"error_format": "none", "heatmap": "false"}, json=body)
    assert answer.status_code == 200
    assert where == ["worker thread"]


# ---------------------------------------------------------------------------------------------
# A real gateway process: the bomb, and an honest large batch
# ---------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024
    return fields


#: Polls /healthz from its own process (so the test process's own work, e.g. parsing a 50 MB answer, holds no GIL
#: the poller needs) until the stop file appears; prints every latency and status as JSON.
POLLER = """
import json, os, sys, time
import httpx
url, stop = sys.argv[1], sys.argv[2]
latencies, statuses = [], []
with httpx.Client(base_url=url, timeout=10) as client:
    client.get("/healthz")
    print("ready", flush=True)
    while not os.path.exists(stop):
        started = time.perf_counter()
        statuses.append(client.get("/healthz").status_code)
        latencies.append(time.perf_counter() - started)
        time.sleep(0.005)
print(json.dumps({"latencies": latencies, "statuses": statuses}), flush=True)
"""


class HealthPoller:
    """GET /healthz in a loop from another process while the block runs; records every latency and status."""

    def __init__(self, url: str, directory: Path) -> None:
        self.url = url
        self.stop_file = directory / "stop-polling"
        self.latencies: list[float] = []
        self.statuses: list[int] = []

    def __enter__(self) -> HealthPoller:
        self.stop_file.unlink(missing_ok=True)
        self.process = subprocess.Popen([sys.executable, "-c", POLLER, self.url, str(self.stop_file)],
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"
        time.sleep(0.1)  # some polls before the load
        return self

    def __exit__(self, *exc_info) -> None:
        time.sleep(0.1)  # and after it
        self.stop_file.touch()
        output, _ = self.process.communicate(timeout=30)
        polled = json.loads(output)
        self.latencies, self.statuses = polled["latencies"], polled["statuses"]

    def summary(self) -> str:
        ordered = sorted(self.latencies)
        return (f"{len(ordered)} polls, median {ordered[len(ordered) // 2] * 1000:.1f} ms, "
                f"max {ordered[-1] * 1000:.1f} ms")


@dataclass
class Gateway:
    process: GatewayProcess
    store: ModelStore
    root: Path

    @property
    def pid(self) -> int:
        return self.process.process.pid


def start_gateway(root: Path, redis_url: str, models: dict[str, TinyModel], **env: str) -> Gateway:
    store_dir = root / "store"
    store_dir.mkdir(parents=True)
    store = ModelStore(store_dir)
    for name, model in models.items():
        publish_tiny_model(store, model, name)
    gateway = GatewayProcess(redis_url=redis_url, store_dir=store_dir, log_path=root / "gateway.log",
                             extra_env={"DAE_INFERENCE_INTRA_OP_THREADS": "1", **env})
    return Gateway(gateway.start(), store, root)


@pytest.fixture(scope="module")
def wide_conv(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """A conv DAE with the default architecture's widths (32, 64 filters): its activations are what an arena keeps."""
    import keras  # noqa: PLC0415

    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 1))
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2DTranspose(1, 3, strides=2, padding="same")(x)
    model = keras.Model(inputs, outputs)
    model.predict(np.zeros((1, 8, 8, 1), np.float32), verbose=0)
    path = tmp_path_factory.mktemp("wide") / "wide.onnx"
    model.export(str(path), format="onnx", verbose=False)
    spec = TrainingSpec.model_validate({"dataset": "digits", "epochs": 1,
                                        "architecture": {"type": "conv", "filters": [32, 64]}})
    return TinyModel(path, spec, (8, 8, 1), int(model.count_params()))


@pytest.fixture(scope="module")
def default_gateway(service_redis_url, tiny_models, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway with the production defaults (only Redis, the store and one onnxruntime thread set)."""
    root = tmp_path_factory.mktemp("hostile-default")
    gateway = start_gateway(root, service_redis_url, {"conv-test": tiny_models["conv"]})
    try:
        yield gateway
    finally:
        gateway.process.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """1024 copies of an all-black 2048x2048 PNG: ~5.7 MB of JSON, 4 G float32 values (16 GiB) once decoded."""
    image = black_png(2048)
    body = json.dumps({"model": "conv-test", "images": [{"image": image}] * 1024}).encode()
    assert 5_000_000 < len(body) < 7_000_000 and len(image) < 6000
    return body


def _send_bomb(gateway: Gateway, body: bytes, *, chunked: bool) -> None:
    def pieces():
        for start in range(0, len(body), 65536):
            yield body[start : start + 65536]

    poller = HealthPoller(gateway.process.url, gateway.root)
    with poller, httpx.Client(base_url=gateway.process.url, timeout=30) as client:
        started = time.perf_counter()
        response = client.post("/reconstruct", content=pieces() if chunked else body,
                               headers={"content-type": "application/json"})
        refused_s = time.perf_counter() - started
    memory = proc_status(gateway.pid)
    how = "chunked" if chunked else "with Content-Length"
    print(f"\nbomb {how}: {response.status_code} after {refused_s * 1000:.0f} ms; gateway peak RSS "
          f"{memory['VmHWM'] / MIB:.0f} MiB (now {memory['VmRSS'] / MIB:.0f} MiB); /healthz {poller.summary()}")
    assert response.status_code == 413, response.text
    detail = response.json()["detail"]
    assert "Expected at most 67108864 pixel values" in detail
    assert "Received: 4294967296 values in 1024 image(s)" in detail
    assert refused_s < 1.0
    assert memory["VmHWM"] < 1024 * MIB
    assert set(poller.statuses) == {200} and len(poller.latencies) >= 10
    assert max(poller.latencies) < 0.1, poller.summary()


def test_the_bomb_with_a_content_length_is_a_413_within_a_second_and_the_gateway_stays_small(default_gateway, bomb):
    _send_bomb(default_gateway, bomb, chunked=False)


def test_the_bomb_sent_chunked_is_a_413_within_a_second_and_the_gateway_stays_small(default_gateway, bomb):
    _send_bomb(default_gateway, bomb, chunked=True)


def test_the_server_stops_reading_a_chunked_body_past_the_limit(service_redis_url, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-stream")
    gateway = start_gateway(root, service_redis_url, {"conv-test": tiny_models["conv"]}, DAE_MAX_UPLOAD_MB="1")
    chunk = b"%x\r\n" % 65536 + b" " * 65536 + b"\r\n"
    try:
        with socket.create_connection(("127.0.0.1", gateway.process.port), timeout=5) as connection:
            connection.sendall(b"POST /reconstruct HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 20)  # 1.25 MiB
            head = connection.recv(65536).split(b"\r\n\r\n")[0].lower()
            assert head.startswith(b"http/1.1 413") and b"connection: close" in head
            with pytest.raises(OSError):  # reset or broken pipe: nobody reads the rest
                for _ in range(2000):  # 125 MiB more, far beyond any socket buffer
                    connection.sendall(chunk)
    finally:
        gateway.process.stop()
        shutil.rmtree(root, ignore_errors=True)


HONEST_BUDGET_MIB = 64  # with the arena on, this model alone held ~100 MiB more after the batch
HONEST_HEALTHZ_MAX_S = 0.5


def test_an_honest_batch_of_16_noisy_512px_images_is_served_within_the_memory_budget(
    service_redis_url, wide_conv, tmp_path_factory
):
    """16 x 512² to a conv model with the default architecture's widths: 200; the gateway's RSS growth (sessions,
    and whatever the runs left behind) is back within DAE_INFERENCE_MEMORY_BUDGET_MIB once the delayed trim has run
    (TRIM_DELAY_S after the answer), and does not grow from one such request to the next."""
    root = tmp_path_factory.mktemp("hostile-honest")
    gateway = start_gateway(root, service_redis_url, {"wide-conv": wide_conv},
                            DAE_INFERENCE_MEMORY_BUDGET_MIB=str(HONEST_BUDGET_MIB))
    noisy = [png_b64(RNG.integers(0, 256, (512, 512), dtype=np.uint8)) for _ in range(16)]
    body = json.dumps({"model": "wide-conv", "images": [{"image": image} for image in noisy]}).encode()
    try:
        before = proc_status(gateway.pid)["VmRSS"]
        untrimmed, growth = [], []
        poller = HealthPoller(gateway.process.url, gateway.root)
        with poller, httpx.Client(base_url=gateway.process.url, timeout=120) as client:
            for _ in range(2):
                started = time.perf_counter()
                response = client.post("/reconstruct", content=body, headers={"content-type": "application/json"})
                seconds = time.perf_counter() - started
                assert response.status_code == 200, response.text
                untrimmed.append(proc_status(gateway.pid)["VmRSS"] - before)
                results = response.json()["results"]
                assert len(results) == 16 and all(result["shape"] == [512, 512, 1] for result in results)
                deadline = time.monotonic() + TRIM_DELAY_S + 2.0  # the trim runs TRIM_DELAY_S after the answer
                while (proc_status(gateway.pid)["VmRSS"] - before >= HONEST_BUDGET_MIB * MIB
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
                growth.append(proc_status(gateway.pid)["VmRSS"] - before)
        memory = proc_status(gateway.pid)
        print(f"\nhonest batch 16x512² ({len(body) / 1e6:.1f} MB in, {len(response.content) / 1e6:.1f} MB out): "
              f"200 in {seconds * 1000:.0f} ms; RSS {before / MIB:.0f} MiB before, growth "
              f"{growth[0] / MIB:.0f} then {growth[1] / MIB:.0f} MiB (budget {HONEST_BUDGET_MIB} MiB; right after the "
              f"answers, before the trim: {untrimmed[0] / MIB:.0f} and {untrimmed[1] / MIB:.0f} MiB), peak "
              f"{memory['VmHWM'] / MIB:.0f} MiB; /healthz {poller.summary()}")
        assert growth[0] < HONEST_BUDGET_MIB * MIB
        assert growth[1] < HONEST_BUDGET_MIB * MIB
        assert growth[1] - growth[0] < 8 * MIB  # the second request reuses what the first left, nothing piles up
        # The 100 ms promise is the bomb's (refused from headers). A served 51 MB answer is encoded in pieces off
        # the loop, but each piece holds the GIL: on 2 loaded cores /healthz waited up to ~170 ms (CI, 2026-12-02).
        assert set(poller.statuses) == {200} and max(poller.latencies) < HONEST_HEALTHZ_MAX_S, poller.summary()
    finally:
        gateway.process.stop()
        shutil.rmtree(root, ignore_errors=True)

