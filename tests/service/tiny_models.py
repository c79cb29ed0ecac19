"""Tiny ONNX models for the gateway tests and the helpers that publish them and encode test images.

The models are built with Keras (tests may import TensorFlow; the gateway may not), exported to ONNX and published
into a store through the ModelStore API with a ModelCard, as training would.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from core.store import ModelStore, new_model_id
from dae.spec import EpochMetrics, ModelCard, TrainingSpec

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DENSE_SHAPE = (8, 8, 1)
CONV_FILTERS = [4, 8]  # two stride-2 levels: H and W must be multiples of 4 inside the model


@dataclass(frozen=True)
class TinyModel:
    """An exported ONNX file and the spec/shape its card describes."""

    onnx_path: Path
    spec: TrainingSpec
    trained_shape: tuple[int, int, int]
    parameters: int


def _build_dense(shape: tuple[int, int, int]):
    import keras

    height, width, channels = shape
    inputs = keras.Input(shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dense(8, activation="relu", name="code")(x)
    x = keras.layers.Dense(16, activation="relu")(x)
    x = keras.layers.Dense(height * width * channels)(x)
    outputs = keras.layers.Reshape(shape)(x)
    return keras.Model(inputs, outputs)


def _build_conv(channels: int):
    import keras

    inputs = keras.Input((None, None, channels))
    x = keras.layers.Conv2D(CONV_FILTERS[0], 3, strides=2, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(CONV_FILTERS[1], 3, strides=2, padding="same", activation="relu", name="code")(x)
    x = keras.layers.Conv2DTranspose(CONV_FILTERS[0], 3, strides=2, padding="same", activation="relu")(x)
    outputs = keras.layers.Conv2DTranspose(channels, 3, strides=2, padding="same")(x)
    return keras.Model(inputs, outputs)


def build_tiny_models(directory: Path) -> dict[str, TinyModel]:
    """A dense 8x8x1 and a conv (factor 4) DAE with random weights, exported to ONNX into `directory`."""
    import keras

    keras.utils.set_random_seed(0)
    models = {}
    dense = _build_dense(DENSE_SHAPE)
    conv = _build_conv(1)
    specs = {
        "dense": TrainingSpec.model_validate(
            {"dataset": "digits", "epochs": 1, "architecture": {"type": "dense", "hidden_units": [16], "latent_dim": 8}}
        ),
        "conv": TrainingSpec.model_validate(
            {"dataset": "digits", "epochs": 1, "architecture": {"type": "conv", "filters": CONV_FILTERS}}
        ),
    }
    for kind, model in (("dense", dense), ("conv", conv)):
        model.predict(np.zeros((1, *DENSE_SHAPE), np.float32), verbose=0)
        path = directory / f"{kind}.onnx"
        model.export(str(path), format="onnx", verbose=False)
        models[kind] = TinyModel(path, specs[kind], DENSE_SHAPE, int(model.count_params()))
    return models


def tiny_png(size: int, path: Path) -> None:
    """A small placeholder PNG (the training plots of a real model)."""
    Image.fromarray(np.full((size, size), 128, np.uint8)).save(path)


def publish_tiny_model(store: ModelStore, model: TinyModel, name: str) -> ModelCard:
    """Publish a tiny model into the store the way dae.publish does: staging dir, card, atomic rename; it belongs
    to the store view's owner."""
    staging = store.staging_dir()
    shutil.copyfile(model.onnx_path, staging / "model.onnx")
    tiny_png(16, staging / "history.png")
    tiny_png(16, staging / "samples.png")
    is_conv = model.spec.architecture.is_fully_convolutional
    height, width, channels = model.trained_shape
    card = ModelCard(
        id=new_model_id(),
        owner=store.owner,
        name=name,
        version=store.reserve_version(name),
        created_at=datetime.now(UTC),
        spec=model.spec,
        input_shape=[None, None, channels] if is_conv else [height, width, channels],
        trained_shape=list(model.trained_shape),
        parameters=model.parameters,
        history=[EpochMetrics(epoch=1, epochs=1, loss=0.1, val_loss=0.1, learning_rate=1e-3, elapsed_s=0.1)],
    )
    return store.publish_model(staging, card)


def png_base64(pixels: np.ndarray) -> str:
    """base64 PNG of float pixels in [0, 1] (H×W gray or H×W×3 RGB), rounded to 8 bits."""
    buffer = io.BytesIO()
    Image.fromarray(np.rint(np.asarray(pixels) * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG bytes of float pixels in [0, 1]."""
    return base64.b64decode(png_base64(pixels))


def run_onnx(onnx_path: Path, images: np.ndarray) -> np.ndarray:
    """The reference: onnxruntime on (N, H, W, C) float32 directly, clipped to [0, 1]."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    output = session.run(None, {session.get_inputs()[0].name: images.astype(np.float32)})[0]
    return np.clip(output, 0.0, 1.0)
