"""The denoising architectures (unet, residual) through /reconstruct: any image size in and out, the same numbers
as Keras, and the answer says which noise the model was trained for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from core.store import ModelStore
from dae.spec import TrainingSpec
from tests.service.tiny_models import TinyModel, publish_tiny_model

ARCHITECTURES = {
    "unet": {"type": "unet", "filters": [4, 8, 8]},  # two poolings: inputs padded to multiples of 4
    "residual": {"type": "residual", "filters": [4, 4, 4]},
}


def _publish(store: ModelStore, name: str, architecture: dict, directory: Path) -> tuple[str, object]:
    """Build the architecture with random weights, export it (verified against Keras) and publish it."""
    import keras

    from dae.export import export_onnx
    from dae.training import build_training_model

    spec = TrainingSpec.model_validate({"name": name, "dataset": "digits", "architecture": architecture,
                                        "noise": {"level": [0.1, 0.4]}, "epochs": 1})
    keras.utils.set_random_seed(0)
    model = build_training_model(spec, (8, 8, 1))
    onnx_path = directory / f"{name}.onnx"
    export_onnx(model, onnx_path, real_images=np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32))
    card = publish_tiny_model(store, TinyModel(onnx_path, spec, (8, 8, 1), model.count_params()), name)
    return card.id, model


@pytest.mark.parametrize("kind", sorted(ARCHITECTURES))
def test_any_size_is_denoised_like_keras_and_the_training_range_is_reported(client, store, kind, tmp_path):
    model_id, keras_model = _publish(store, f"{kind}-test", ARCHITECTURES[kind], tmp_path)
    rng = np.random.default_rng(1)
    for height, width in [(8, 8), (10, 14), (28, 28)]:
        pixels = rng.random((height, width)).astype(np.float32)
        answer = client.post("/reconstruct", params={"format": "array", "error_format": "none", "heatmap": "false"},
                             json={"model": model_id, "pixels": pixels.tolist()})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        denoised = np.asarray(body["results"][0]["denoised"], np.float32).reshape(height, width)
        expected = np.clip(keras_model.predict(pixels[None, :, :, None], verbose=0)[0, :, :, 0], 0, 1)
        if kind == "residual" or (height % 4 == 0 and width % 4 == 0):
            # Without padding the ONNX session computes what Keras does (the residual stack never pads).
            np.testing.assert_allclose(denoised, expected, atol=1e-4)
        else:
            assert denoised.shape == (height, width) and np.isfinite(denoised).all()
        assert body["model"]["trained_noise"] == {"type": "gaussian", "min_level": 0.1, "max_level": 0.4,
                                                  "blind": True, "clip": True}
