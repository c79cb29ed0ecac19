"""ONNX export: equal to Keras within 1e-4 (dense and conv), dynamic sizes, and the refusal path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from dae import export  # noqa: E402
from dae.data import load_dataset  # noqa: E402
from dae.errors import ExportFailed  # noqa: E402
from dae.models import build_autoencoder  # noqa: E402
from dae.spec import TrainingSpec  # noqa: E402

DENSE = {"type": "dense", "hidden_units": [16], "latent_dim": 4}
CONV = {"type": "conv", "filters": [4, 8]}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def build(architecture: dict, image_shape: tuple[int, int, int], seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    return build_autoencoder(TrainingSpec(dataset="digits", architecture=architecture), image_shape)


def keras_output(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(model(images, training=False))


def test_dense_export_matches_keras_with_dynamic_batch(tmp_path: Path, digits) -> None:
    model = build(DENSE, digits.image_shape)
    path = tmp_path / "dense.onnx"
    max_difference = export.export_onnx(model, path, real_images=digits.test)
    assert 0.0 <= max_difference <= 1e-4
    session = export.onnx_session(path)
    dims = session.get_inputs()[0].shape
    assert not isinstance(dims[0], int) and dims[1:] == [8, 8, 1]  # dynamic batch, fixed image size
    predict = export.onnx_predictor(path)
    for batch in (digits.test[:1], digits.test[:7]):
        assert np.max(np.abs(predict(batch) - keras_output(model, batch))) <= 1e-4


def test_conv_export_matches_keras_and_accepts_other_sizes(tmp_path: Path, digits) -> None:
    model = build(CONV, digits.image_shape, seed=1)
    path = tmp_path / "conv.onnx"
    max_difference = export.export_onnx(model, path, real_images=digits.test)
    assert 0.0 <= max_difference <= 1e-4
    session = export.onnx_session(path)
    dims = session.get_inputs()[0].shape
    assert [isinstance(dim, int) for dim in dims] == [False, False, False, True]  # N, H, W dynamic; C fixed
    predict = export.onnx_predictor(path)
    rng = np.random.default_rng(0)
    for shape in ((2, 8, 8, 1), (3, 13, 21, 1), (1, 32, 4, 1)):
        images = rng.random(shape, dtype=np.float32)
        onnx_images = predict(images)
        assert onnx_images.shape == shape
        assert np.max(np.abs(onnx_images - keras_output(model, images))) <= 1e-4


def test_conv_export_of_rgb_model(tmp_path: Path) -> None:
    model = build(CONV, (12, 12, 3), seed=2)
    images = np.random.default_rng(1).random((4, 12, 12, 3), dtype=np.float32)
    assert export.export_onnx(model, tmp_path / "rgb.onnx", real_images=images) <= 1e-4


@pytest.mark.parametrize(("offset", "passes"), [(0.5e-4, True), (1.5e-4, False)])
def test_the_check_is_tight_at_the_tolerance(
    tmp_path: Path, digits, monkeypatch: pytest.MonkeyPatch, offset: float, passes: bool
) -> None:
    # Shift only the reference the check compares with: just inside 1e-4 passes, just outside is refused.
    model = build(DENSE, digits.image_shape)
    original_reference = export._keras_reference
    monkeypatch.setattr(export, "_keras_reference", lambda m, images: original_reference(m, images) + offset)
    path = tmp_path / "model.onnx"
    if passes:
        assert export.export_onnx(model, path, real_images=digits.test) == pytest.approx(offset, abs=1e-5)
        assert path.exists()
    else:
        with pytest.raises(ExportFailed, match=r"Expected max \|ONNX - Keras\| <= 0.0001. Received: 0.00015"):
            export.export_onnx(model, path, real_images=digits.test)
        assert not path.exists()  # nothing left behind to be published


def test_a_conv_model_needs_real_images_to_pick_a_size(tmp_path: Path) -> None:
    model = build(CONV, (8, 8, 1))
    with pytest.raises(ValueError, match="real_images"):
        export.export_onnx(model, tmp_path / "conv.onnx")
