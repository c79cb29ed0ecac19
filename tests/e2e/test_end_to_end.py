"""Through real processes: submit a job over HTTP, follow its events, reconstruct with the new model."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

EPOCHS = 8
# Big and long enough to beat the noise clearly (measured: +2.5 dB at σ=0.3), still ~5 s of training.
SPEC = {
    "name": "e2e-digits",
    "dataset": "digits",
    "architecture": {"type": "dense", "hidden_units": [64], "latent_dim": 16},
    "noise": {"type": "gaussian", "level": 0.2},
    "optimizer": {"learning_rate": 0.003},
    "epochs": EPOCHS,
    "batch_size": 32,
}


def _read_sse(lines) -> list[dict]:
    """Parse a text/event-stream into [{event, id, data}] until the server closes it."""
    events, current = [], {}
    for line in lines:
        if not line:
            if current:
                events.append(current)
                current = {}
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            current["data"] = json.loads(value)
        elif field in ("event", "id"):
            current[field] = value
    if current:
        events.append(current)
    return events


@pytest.fixture(scope="module")
def trained(stack: Stack) -> dict:
    """Submit the job, follow its event stream to the end, return the final job record."""
    response = stack.client.post("/jobs", json=SPEC)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert response.headers["location"] == f"/jobs/{job['id']}"

    with stack.client.stream("GET", f"/jobs/{job['id']}/events", timeout=180) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = _read_sse(stream.iter_lines())

    epochs = [event["data"]["epoch"] for event in events if event.get("event") == "epoch"]
    assert epochs == list(range(1, EPOCHS + 1)), f"one event per epoch, in order; got {events}"
    assert events[-1]["event"] == "state" and events[-1]["data"]["state"] == "succeeded", events[-1]

    record = stack.client.get(f"/jobs/{job['id']}").json()
    assert record["state"] == "succeeded"
    assert [entry["epoch"] for entry in record["history"]] == list(range(1, EPOCHS + 1))
    assert record["model_id"]
    return record


def _digit(index: int) -> np.ndarray:
    return (load_digits().images[index] / 16.0).astype(np.float32)


def _png_base64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_model_card_describes_the_trained_model(stack: Stack, trained: dict) -> None:
    card = stack.client.get(f"/models/{trained['model_id']}").json()
    assert card["name"] == "e2e-digits" and card["job_id"] == trained["id"]
    assert card["trained_shape"] == [8, 8, 1] and card["input_shape"] == [8, 8, 1]
    assert len(card["history"]) == EPOCHS
    methods = {row["method"] for row in card["evaluation"]}
    assert {"noisy", "model"} <= methods
    assert card["onnx_max_abs_diff"] <= 1e-4
    for artifact in ("history.png", "samples.png"):
        image = stack.client.get(f"/models/{trained['model_id']}/{artifact}")
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")


def test_reconstruct_json_error_map_is_input_minus_denoised(stack: Stack, trained: dict) -> None:
    pixels = _digit(0)
    response = stack.client.post(
        "/reconstruct", params={"format": "array"}, json={"model": "e2e-digits", "pixels": pixels.tolist()}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["id"] == trained["model_id"]
    (result,) = body["results"]
    denoised = np.asarray(result["denoised"], dtype=np.float32)
    assert denoised.shape == (8, 8, 1)
    assert denoised.min() >= 0 and denoised.max() <= 1
    expected = np.abs(pixels - denoised[..., 0])
    error_map = np.asarray(result["error_map"], dtype=np.float32)
    np.testing.assert_allclose(error_map, expected, atol=1e-6)
    assert result["error_stats"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert result["error_stats"]["max"] == pytest.approx(float(expected.max()), abs=1e-6)
    assert base64.b64decode(result["denoised_png"]).startswith(b"\x89PNG")


def test_reconstruct_multipart_upload_matches_json(stack: Stack, trained: dict) -> None:
    pixels = np.round(_digit(5) * 255) / 255  # what survives the 8-bit PNG upload
    png = base64.b64decode(_png_base64(pixels))
    uploaded = stack.client.post(
        "/reconstruct", params={"format": "array"},
        data={"model": trained["model_id"]}, files={"file": ("digit.png", png, "image/png")},
    )
    assert uploaded.status_code == 200, uploaded.text
    as_json = stack.client.post(
        "/reconstruct", params={"format": "array"}, json={"model": trained["model_id"], "pixels": pixels.tolist()}
    )
    upload_result, json_result = uploaded.json()["results"][0], as_json.json()["results"][0]
    np.testing.assert_allclose(upload_result["denoised"], json_result["denoised"], atol=1e-6)
    expected = np.abs(pixels - np.asarray(upload_result["denoised"])[..., 0])
    np.testing.assert_allclose(upload_result["error_map"], expected, atol=1e-5)


def test_trained_model_denoises_better_than_the_noise(stack: Stack, trained: dict) -> None:
    """With a clean reference and server-side noise, the model's output is closer to clean than its input was."""
    clean = [_digit(index) for index in range(1500, 1516)]
    response = stack.client.post("/reconstruct", json={
        "model": "e2e-digits",
        "images": [{"image": _png_base64(image)} for image in clean],
        "clean": [{"image": _png_base64(image)} for image in clean],
        "add_noise": {"type": "gaussian", "level": 0.3, "seed": 7},
    })
    assert response.status_code == 200, response.text
    comparisons = [result["clean"] for result in response.json()["results"]]
    gain = np.mean([c["psnr"] - c["input_psnr"] for c in comparisons])
    assert gain > 1.0, f"mean PSNR gain over the noisy input was only {gain:.2f} dB"


def test_png_accept_header_returns_the_image(stack: Stack, trained: dict) -> None:
    response = stack.client.post(
        "/reconstruct", headers={"Accept": "image/png"}, json={"model": "e2e-digits", "image": _png_base64(_digit(3))}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert float(response.headers["x-mean-l1-error"]) >= 0
    assert Image.open(io.BytesIO(response.content)).size == (8, 8)
