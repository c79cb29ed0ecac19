"""POST /reconstruct: outputs checked against onnxruntime run directly, every input form, and every bad input."""

from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.config import Settings
from service.imaging.codec import float32_base64
from service.main import create_app
from service.reconstruct.schemas import EXAMPLE_PNG_8X8, ReconstructResponse
from tests.service.tiny_models import png_base64, png_bytes, run_onnx

RNG = np.random.default_rng(7)


def gray(height: int = 8, width: int = 8) -> np.ndarray:
    """A random gray image already on the 8-bit grid (so PNG round trips are exact)."""
    return np.rint(RNG.random((height, width)) * 255).astype(np.float32) / np.float32(255)


def decode_png(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


def f32(text: str, shape: tuple[int, ...]) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), "<f4").reshape(shape)


def test_json_png_input_matches_onnxruntime_and_the_error_map_is_input_minus_denoised(client, dense_card, tiny_models):
    image = gray()
    response = client.post("/reconstruct", params={"format": "array"}, json={"model": "dense-test", "image": png_base64(image)})
    assert response.status_code == 200, response.text
    body = response.json()
    ReconstructResponse.model_validate(body)  # the documented response model
    # Which model answered, and the noise it was trained for (its card's trained_noise).
    assert body["model"] == {"id": dense_card.id, "name": "dense-test", "version": 1,
                             "trained_noise": dense_card.trained_noise.model_dump(mode="json")}
    result = body["results"][0]
    denoised = np.array(result["denoised"], np.float32)
    expected = run_onnx(tiny_models["dense"].onnx_path, image[None, :, :, None])[0]
    np.testing.assert_allclose(denoised, expected, atol=1e-6)
    assert 0.0 <= denoised.min() and denoised.max() <= 1.0  # clipped
    error_map = np.array(result["error_map"], np.float32)
    np.testing.assert_allclose(error_map, np.abs(image - denoised[:, :, 0]), atol=1e-6)
    assert result["shape"] == [8, 8, 1]
    assert result["error_stats"]["mean"] == pytest.approx(float(error_map.mean()), abs=1e-6)
    assert result["error_stats"]["max"] == pytest.approx(float(error_map.max()), abs=1e-6)
    assert result["error_stats"]["p99"] == pytest.approx(float(np.percentile(error_map, 99)), abs=1e-6)
    assert body["mean_error"] == pytest.approx(result["error_stats"]["mean"])
    png = decode_png(result["denoised_png"])
    np.testing.assert_array_equal(png, np.floor(denoised[:, :, 0] * 255 + 0.5).astype(np.uint8))
    heatmap = Image.open(io.BytesIO(base64.b64decode(result["error_heatmap_png"])))
    assert heatmap.size == (8, 8)


def test_pixels_array_and_png_inputs_give_the_same_result(client, dense_card):
    image = gray()
    uint8 = base64.b64encode(np.rint(image * 255).astype(np.uint8).tobytes()).decode()
    bodies = [
        {"image": png_base64(image)},
        {"pixels": image.tolist()},
        {"pixels": image[:, :, None].tolist()},
        {"array": {"data": float32_base64(image), "shape": [8, 8]}},
        {"array": {"data": uint8, "shape": [8, 8, 1], "dtype": "uint8"}},
    ]
    maps = []
    for body in bodies:
        response = client.post("/reconstruct", params={"error_format": "f32"}, json={"model": dense_card.id, **body})
        assert response.status_code == 200, (body.keys(), response.text)
        maps.append(f32(response.json()["results"][0]["error_map_f32"], (8, 8)))
    for other in maps[1:]:
        np.testing.assert_allclose(other, maps[0], atol=1e-6)


def test_batches_keep_input_order_and_a_4d_array_is_a_batch(client, conv_card, dense_card, tiny_models):
    images = [gray(8, 8), gray(5, 7), gray(8, 8)]
    response = client.post(
        "/reconstruct",
        params={"format": "f32", "error_format": "none", "heatmap": "false"},
        json={"model": "conv-test", "images": [{"pixels": image.tolist()} for image in images]},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [result["shape"] for result in results] == [[8, 8, 1], [5, 7, 1], [8, 8, 1]]
    for image, result in zip(images, results, strict=True):
        assert set(result) == {"shape", "denoised_f32", "error_stats"}
        padded = np.pad(image, ((0, (-image.shape[0]) % 4), (0, (-image.shape[1]) % 4)), mode="reflect")
        expected = run_onnx(tiny_models["conv"].onnx_path, padded[None, :, :, None])[0, : image.shape[0], : image.shape[1]]
        np.testing.assert_allclose(f32(result["denoised_f32"], tuple(result["shape"])), expected, atol=1e-6)

    stack = np.stack([gray(), gray(), gray()])[..., None]
    batch = client.post(
        "/reconstruct",
        params={"error_format": "json", "heatmap": "false"},
        json={"model": "dense-test", "array": {"data": float32_base64(stack), "shape": [3, 8, 8, 1]}},
    )
    assert batch.status_code == 200, batch.text
    expected = run_onnx(tiny_models["dense"].onnx_path, stack)
    maps = [np.array(result["error_map"]) for result in batch.json()["results"]]
    assert len(maps) == 3
    for index, error_map in enumerate(maps):
        np.testing.assert_allclose(error_map, np.abs(stack[index] - expected[index])[:, :, 0], atol=1e-6)


def test_compact_formats(client, dense_card):
    image = gray()
    response = client.post(
        "/reconstruct",
        params={"format": "f32", "error_format": "png"},
        json={"model": dense_card.id, "image": png_base64(image)},
    )
    result = response.json()["results"][0]
    assert "denoised_png" not in result and "error_map" not in result
    denoised = f32(result["denoised_f32"], (8, 8, 1))
    error_png = decode_png(result["error_map_png"])
    np.testing.assert_array_equal(error_png, np.floor(np.abs(image - denoised[:, :, 0]) * 255 + 0.5).astype(np.uint8))
    assert client.post("/reconstruct", params={"format": "jpeg"}, json={"model": dense_card.id}).status_code == 422


def test_accept_image_png_returns_only_the_png_with_the_mean_error_header(client, dense_card):
    image = png_base64(gray())
    json_answer = client.post("/reconstruct", json={"model": dense_card.id, "image": image}).json()
    response = client.post("/reconstruct", json={"model": dense_card.id, "image": image}, headers={"Accept": "image/png"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert float(response.headers["x-mean-l1-error"]) == pytest.approx(json_answer["mean_error"], rel=1e-5)
    assert base64.b64encode(response.content).decode() == json_answer["results"][0]["denoised_png"]
    batch = client.post(
        "/reconstruct",
        json={"model": dense_card.id, "images": [{"image": image}, {"image": image}]},
        headers={"Accept": "image/png"},
    )
    assert batch.status_code == 406


def test_clean_reference_adds_psnr_ssim_and_the_error_vs_clean(client, dense_card):
    clean = gray()
    noisy = np.clip(clean + 0.2 * RNG.standard_normal(clean.shape), 0, 1)
    response = client.post(
        "/reconstruct",
        params={"format": "array"},
        json={"model": dense_card.id, "pixels": noisy.tolist(), "clean": {"image": png_base64(clean)}},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    denoised = np.array(result["denoised"], np.float64)[:, :, 0]
    expected_psnr = 10 * np.log10(1 / np.mean((clean - denoised) ** 2))
    assert result["clean"]["psnr"] == pytest.approx(expected_psnr, abs=1e-3)
    assert result["clean"]["input_psnr"] == pytest.approx(10 * np.log10(1 / np.mean((clean - noisy) ** 2)), abs=1e-3)
    assert -1.0 <= result["clean"]["ssim"] <= 1.0
    np.testing.assert_allclose(np.array(result["clean"]["error_map"]), np.abs(clean - denoised), atol=1e-6)

    mismatch = client.post("/reconstruct", json={"model": dense_card.id, "pixels": noisy.tolist(), "clean": [{"pixels": clean.tolist()}] * 2})
    assert mismatch.status_code == 422 and "Expected 1 clean image" in mismatch.json()["detail"]
    wrong_size = client.post("/reconstruct", json={"model": dense_card.id, "pixels": noisy.tolist(), "clean": {"pixels": gray(4, 4).tolist()}})
    assert wrong_size.status_code == 422 and "clean[0]" in wrong_size.json()["detail"]


def test_add_noise_is_seeded_and_the_model_sees_the_noisy_image(client, dense_card, tiny_models):
    clean = gray()
    body = {"model": dense_card.id, "image": png_base64(clean), "add_noise": {"type": "gaussian", "level": 0.3, "seed": 3}}
    first = client.post("/reconstruct", params={"format": "f32", "error_format": "f32"}, json=body).json()["results"][0]
    again = client.post("/reconstruct", params={"format": "f32", "error_format": "f32"}, json=body).json()["results"][0]
    other = client.post(
        "/reconstruct", params={"format": "f32"}, json={**body, "add_noise": {**body["add_noise"], "seed": 4}}
    ).json()["results"][0]
    assert first["noisy_png"] == again["noisy_png"] and first["denoised_f32"] == again["denoised_f32"]
    assert first["noisy_png"] != other["noisy_png"]
    noisy = decode_png(first["noisy_png"]).astype(np.float32) / 255
    assert np.abs(noisy - clean).mean() > 0.05  # it really was corrupted
    denoised = f32(first["denoised_f32"], (8, 8, 1))[:, :, 0]
    error_map = f32(first["error_map_f32"], (8, 8))
    np.testing.assert_allclose(error_map, np.abs(noisy - denoised), atol=1 / 255)  # noisy_png is 8-bit rounded
    bad = client.post("/reconstruct", json={**body, "add_noise": {"type": "blur", "level": 0.3}})
    assert bad.status_code == 422 and "add_noise.type" in bad.json()["detail"]


def test_rgb_input_to_a_gray_model_uses_luminance(client, dense_card, tiny_models):
    rgb = np.rint(RNG.random((8, 8, 3)) * 255).astype(np.float32) / np.float32(255)
    response = client.post("/reconstruct", params={"format": "array"}, json={"model": dense_card.id, "image": png_base64(rgb)})
    assert response.status_code == 200, response.text
    luminance = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    expected = run_onnx(tiny_models["dense"].onnx_path, luminance[None, :, :, None])[0]
    np.testing.assert_allclose(np.array(response.json()["results"][0]["denoised"]), expected, atol=1e-5)


def test_multipart_upload_with_optional_noise(client, dense_card, tiny_models):
    image = gray()
    response = client.post(
        "/reconstruct",
        params={"format": "array"},
        data={"model": "dense-test"},
        files={"file": ("digit.png", png_bytes(image), "image/png")},
    )
    assert response.status_code == 200, response.text
    result = response.json()["results"][0]
    expected = run_onnx(tiny_models["dense"].onnx_path, image[None, :, :, None])[0]
    np.testing.assert_allclose(np.array(result["denoised"]), expected, atol=1e-6)
    np.testing.assert_allclose(np.array(result["error_map"]), np.abs(image - expected[:, :, 0]), atol=1e-6)

    noisy = client.post(
        "/reconstruct",
        data={"model": "dense-test", "noise_type": "salt_pepper", "noise_level": "0.5", "noise_seed": "1"},
        files={"file": ("digit.png", png_bytes(image), "image/png"), "clean": ("clean.png", png_bytes(image), "image/png")},
    )
    assert noisy.status_code == 200, noisy.text
    assert "noisy_png" in noisy.json()["results"][0] and "clean" in noisy.json()["results"][0]

    for data, files, fragment in [
        ({"model": "dense-test"}, None, "'file'"),
        ({}, {"file": ("d.png", png_bytes(image), "image/png")}, "'model'"),
        ({"model": "dense-test", "file": "not a file"}, None, "must be a file"),
        ({"model": "dense-test", "noise_type": "gaussian", "noise_level": "lots"}, {"file": ("d.png", png_bytes(image), "image/png")}, "noise_level"),
        ({"model": "dense-test"}, {"file": ("d.txt", b"hello", "text/plain")}, "not a readable image"),
    ]:
        bad = client.post("/reconstruct", data=data, files=files) if files else client.post(
            "/reconstruct", data=data, files={"dummy": ("x", b"", "text/plain")}
        )
        assert bad.status_code == 422, (data, bad.text)
        assert fragment in bad.json()["detail"]


def test_the_swagger_example_works_against_a_dense_digits_model(client, store, tiny_models):
    from tests.service.tiny_models import publish_tiny_model

    publish_tiny_model(store, tiny_models["dense"], "digits-demo")
    response = client.post("/reconstruct", json={"model": "digits-demo", "image": EXAMPLE_PNG_8X8})
    assert response.status_code == 200, response.text


BAD_BODIES = [
    (b"{not json", "not valid JSON"),
    (b'{"model": "dense-test", "pixels": [[NaN, 0.5]]}', "NaN or infinity"),
    (b'{"model": "dense-test", "pixels": [[Infinity, 0.5]]}', "NaN or infinity"),
    (b'{"model": "dense-test", "pixels": [[1e999, 0.5]]}', "NaN or infinity"),
    (b'{"model": "dense-test", "image": 123}', "body.image"),
    (b'{"model": "dense-test", "pixels": "zeros"}', "body.pixels"),
    (b'{"model": "dense-test", "pixels": [[0.1, [0.2]]]}', "ragged"),
    (b'{"model": "dense-test", "pixels": [["a"]]}', "numbers"),
    (b'{"model": "dense-test"}', "Nothing to reconstruct"),
    (b'{"image": "abc"}', "body.model"),
    (b'{"model": "dense-test", "image": "%%%"}', "not valid base64"),
    (b'{"model": "dense-test", "image": "aGVsbG8="}', "not a readable image"),
    (b'{"model": "dense-test", "pixels": [[0.5]], "images": [{"pixels": [[0.5]]}]}', "not both"),
    (b'{"model": "dense-test", "images": []}', "body.images"),
    (b'{"model": "dense-test", "images": [{}]}', "exactly one source"),
    (b'{"model": "dense-test", "pixels": [[0.5]], "extra": 1}', "extra"),
    (b'{"model": "dense-test", "array": {"data": "AAAA", "shape": [2, 2]}}', "Expected 16 bytes"),
    (b'{"model": "dense-test", "array": {"data": "AAAA", "shape": [0, 2]}}', "body.array.shape"),
    (b'[1, 2]', "body"),
]


@pytest.mark.parametrize("body, fragment", BAD_BODIES)
def test_bad_json_bodies_are_422_with_a_message(client, dense_card, body, fragment):
    response = client.post("/reconstruct", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


def test_truncated_png_wrong_shapes_and_unknown_models(client, dense_card):
    raw = png_bytes(RNG.random((8, 8)))
    truncated = base64.b64encode(raw[: len(raw) - 20]).decode()
    response = client.post("/reconstruct", json={"model": dense_card.id, "image": truncated})
    assert response.status_code == 422 and "truncated" in response.json()["detail"]

    wrong = client.post("/reconstruct", json={"model": dense_card.id, "pixels": gray(9, 9).tolist()})
    assert wrong.status_code == 422
    assert "Expected 8x8x1. Received: 9x9" in wrong.json()["detail"]

    for ref in ("nobody", "m_000000000000", "../../etc/passwd", "dense-test:7", "x" * 200):
        missing = client.post("/reconstruct", json={"model": ref, "pixels": gray().tolist()})
        assert missing.status_code == 404, ref
        assert "Received:" in missing.json()["detail"]
    too_long = client.post("/reconstruct", json={"model": "x" * 201, "pixels": gray().tolist()})
    assert too_long.status_code == 422

    wrong_type = client.post("/reconstruct", content=b"model=x", headers={"content-type": "text/plain"})
    assert wrong_type.status_code == 415


def test_limits_on_image_side_and_batch_size_are_413(settings, store, tiny_models):
    from tests.service.tiny_models import publish_tiny_model

    publish_tiny_model(store, tiny_models["conv"], "conv-test")
    limited = Settings(**{**settings.model_dump(), "max_image_side": 16, "max_batch_images": 3})
    with TestClient(create_app(limited)) as client:
        huge = client.post("/reconstruct", json={"model": "conv-test", "image": png_base64(np.zeros((17, 4)))})
        assert huge.status_code == 413 and "at most 16 pixels" in huge.json()["detail"]
        huge_pixels = client.post("/reconstruct", json={"model": "conv-test", "pixels": np.zeros((4, 17)).tolist()})
        assert huge_pixels.status_code == 413
        many = client.post("/reconstruct", json={"model": "conv-test", "images": [{"pixels": [[0.5]]}] * 4})
        assert many.status_code == 413 and "at most 3" in many.json()["detail"]
        stacked = client.post(
            "/reconstruct",
            json={"model": "conv-test", "array": {"data": float32_base64(np.zeros((4, 2, 2, 1))), "shape": [4, 2, 2, 1]}},
        )
        assert stacked.status_code == 413


def test_concurrent_requests_are_micro_batched(settings, store, tiny_models):
    from tests.service.tiny_models import publish_tiny_model

    publish_tiny_model(store, tiny_models["dense"], "dense-test")
    slow_window = Settings(**{**settings.model_dump(), "inference_batch_timeout_ms": 200.0})
    app = create_app(slow_window)
    with TestClient(app) as client:
        body = {"model": "dense-test", "pixels": gray().tolist()}
        assert client.post("/reconstruct", json=body).status_code == 200  # loads the model
        barrier = threading.Barrier(6)
        statuses = []

        def call():
            barrier.wait()
            statuses.append(client.post("/reconstruct", json=body).status_code)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        sizes = list(app.state.resources.inference.stats.recent_batch_sizes)
        metrics = client.get("/metrics").text
    assert statuses == [200] * 6
    assert sizes[0] == 1 and sum(sizes[1:]) == 6 and max(sizes[1:]) >= 3  # several requests shared a run
    counted = [line for line in metrics.splitlines() if line.startswith("dae_reconstruct_batch_size_count")]
    assert counted == [f"dae_reconstruct_batch_size_count {float(len(sizes))}"]


def test_a_full_queue_answers_503_with_retry_after(settings, store, tiny_models):
    from tests.service.tiny_models import publish_tiny_model

    publish_tiny_model(store, tiny_models["dense"], "dense-test")
    tight = Settings(**{**settings.model_dump(), "inference_queue_max_values": 64, "retry_after_s": 2})  # one 8x8
    app = create_app(tight)
    with TestClient(app) as client:
        body = {"model": "dense-test", "pixels": gray().tolist()}
        assert client.post("/reconstruct", json=body).status_code == 200
        engine = app.state.resources.inference
        gate = threading.Event()
        engine.executor.submit(gate.wait)  # the inference thread is busy
        first: list = []
        holder = threading.Thread(target=lambda: first.append(client.post("/reconstruct", json=body)))
        holder.start()
        deadline = time.monotonic() + 5
        while engine.queued_images == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        rejected = client.post("/reconstruct", json=body)
        gate.set()
        holder.join()
    assert rejected.status_code == 503
    assert rejected.headers["retry-after"] == "2"
    assert "queue is full" in rejected.json()["detail"]
    assert first[0].status_code == 200
