"""ONNX export of a trained autoencoder, checked against Keras before anyone may serve it.

The export goes through Keras (`model.export(path, format="onnx")`, tf2onnx underneath). The batch dimension is
dynamic; for fully convolutional models H and W are dynamic too. The check runs the ONNX file in onnxruntime
and compares it with the Keras model on random images and on real images (and, for conv models, on a second,
different image size): the largest absolute difference must be <= tolerance (1e-4), else ExportFailed is raised and
the file is removed, so a model whose serving artifact disagrees with its Keras twin is never published.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dae.errors import ExportFailed

logger = logging.getLogger(__name__)

ONNX_TOLERANCE = 1e-4
_CHECK_IMAGES = 16
#: Conversions tried before a wrong output shape is final: tf2onnx 1.17's transpose optimizer, in about one export in
#: a hundred (it depends on the graph's generated names), ends a residual graph with a 5-D Reshape and drops the
#: Squeeze after it; the next conversion, with new names, is right (bench/README.md, 2026-12-03).
CONVERSION_ATTEMPTS = 3


class OutputShapeMismatch(ExportFailed):
    """The ONNX file's output shape is not the Keras model's (the converter's fault: converting again may help)."""


def _keras_reference(model: Any, images: np.ndarray) -> np.ndarray:
    """The Keras output the ONNX file must reproduce (one function, so tests can probe the tolerance edge)."""
    import keras  # noqa: PLC0415

    # An eager call: predict_on_batch would retrace its tf.function for every new image size.
    return np.asarray(keras.ops.convert_to_numpy(model(images, training=False)), dtype=np.float32)


def onnx_session(path: Path, threads: int = 1) -> Any:
    """An onnxruntime CPU session for `path`."""
    import onnxruntime  # noqa: PLC0415

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def onnx_predictor(path: Path, threads: int = 1, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """A `predict(images)` callable over an ONNX model file (usable with dae.evaluation.evaluate_denoiser)."""
    session = onnx_session(path, threads)
    input_name = session.get_inputs()[0].name

    def predict(images: np.ndarray) -> np.ndarray:
        batch = np.asarray(images, dtype=np.float32)
        outputs = [
            session.run(None, {input_name: batch[start : start + batch_size]})[0]
            for start in range(0, len(batch), batch_size)
        ]
        return np.concatenate(outputs).astype(np.float32, copy=False)

    return predict


def _is_dynamic(dimension: Any) -> bool:
    return not isinstance(dimension, int) or dimension < 0


def _check_images(model: Any, real_images: np.ndarray | None, seed: int) -> list[tuple[str, np.ndarray]]:
    """(label, batch) pairs to compare: random and real images at the model's size, plus another size for conv."""
    input_shape = tuple(model.inputs[0].shape)  # (None, H, W, C); H and W are None for conv models
    channels = int(input_shape[3])
    is_fully_convolutional = input_shape[1] is None or input_shape[2] is None
    if real_images is not None and len(real_images):
        real = np.asarray(real_images[:_CHECK_IMAGES], dtype=np.float32)
        height, width = real.shape[1], real.shape[2]
    elif not is_fully_convolutional:
        real = None
        height, width = int(input_shape[1]), int(input_shape[2])
    else:
        raise ValueError(
            "A fully convolutional model has no fixed image size. Expected real_images to check the export with. "
            "Received: real_images=None"
        )
    rng = np.random.default_rng(seed)
    batches = [("random", rng.random((_CHECK_IMAGES, height, width, channels), dtype=np.float32))]
    if real is not None:
        batches.append(("real", real))
    if is_fully_convolutional:
        # Another size, odd on one side, so padding/cropping and the dynamic H, W are exercised.
        other = (height + 5, width + 2)
        batches.append((f"random {other[0]}x{other[1]}", rng.random((4, *other, channels), dtype=np.float32)))
        if real is not None:
            cropped = real[:, : max(3, height - 3), : max(3, width - 1), :]
            batches.append((f"real cropped {cropped.shape[1]}x{cropped.shape[2]}", np.ascontiguousarray(cropped)))
    return batches


def export_onnx(
    model: Any,
    path: Path,
    *,
    real_images: np.ndarray | None = None,
    tolerance: float = ONNX_TOLERANCE,
    seed: int = 0,
) -> float:
    """Export `model` to ONNX at `path` and verify it; returns the largest |ONNX − Keras| measured.

    Raises ExportFailed (and removes `path`) when the export fails, its dims are not dynamic where they should be,
    or any check batch differs by more than `tolerance`; a wrong output shape is converted again first, up to
    CONVERSION_ATTEMPTS conversions.
    """
    path = Path(path)
    batches = _check_images(model, real_images, seed)
    # Keras needs the model built and called once before exporting (traces the serving function).
    _keras_reference(model, batches[0][1][:1])
    for attempt in range(1, CONVERSION_ATTEMPTS + 1):
        _convert(model, path)
        try:
            max_difference = _verify(model, path, batches, tolerance)
            break
        except BaseException as error:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            if not isinstance(error, OutputShapeMismatch) or attempt == CONVERSION_ATTEMPTS:
                raise
            logger.warning("conversion %d of %d gave a wrong output shape (%s); converting again", attempt,
                           CONVERSION_ATTEMPTS, error)
    logger.info("exported %s (max |onnx - keras| = %.3g)", path, max_difference)
    return max_difference


def _convert(model: Any, path: Path) -> None:
    """Keras' ONNX export of `model` to `path` (tf2onnx's prints silenced); ExportFailed when it raises."""
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            model.export(str(path), format="onnx", verbose=False)
    except Exception as error:  # tf2onnx raises many types
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise ExportFailed(
            f"The ONNX export failed. Expected a convertible Keras model. Received: {type(error).__name__}: {error}"
        ) from error


def _verify(model: Any, path: Path, batches: list[tuple[str, np.ndarray]], tolerance: float) -> float:
    try:
        session = onnx_session(path)
    except Exception as error:
        raise ExportFailed(
            f"onnxruntime cannot load the exported model. Expected a valid ONNX file. Received: {error}"
        ) from error
    model_input = session.get_inputs()[0]
    keras_shape = tuple(model.inputs[0].shape)
    for axis, (onnx_dimension, keras_dimension) in enumerate(zip(model_input.shape, keras_shape, strict=False)):
        should_be_dynamic = axis == 0 or keras_dimension is None
        if should_be_dynamic and not _is_dynamic(onnx_dimension):
            raise ExportFailed(
                f"The ONNX input has a fixed size on axis {axis}. Expected a dynamic dimension (the Keras input is "
                f"{keras_shape}). Received: ONNX input shape {model_input.shape}"
            )
    max_difference = 0.0
    for label, images in batches:
        try:
            onnx_output = session.run(None, {model_input.name: images})[0]
        except Exception as error:
            raise ExportFailed(
                f"onnxruntime failed on the {label} check images of shape {images.shape}. Expected the ONNX model to "
                f"accept them. Received: {type(error).__name__}: {error}"
            ) from error
        reference = _keras_reference(model, images)
        if onnx_output.shape != reference.shape:
            raise OutputShapeMismatch(
                f"ONNX and Keras disagree on the output shape for {label} images. Expected {reference.shape}. "
                f"Received: {onnx_output.shape}"
            )
        difference = float(np.max(np.abs(onnx_output.astype(np.float64) - reference.astype(np.float64))))
        if not np.isfinite(difference) or difference > tolerance:
            raise ExportFailed(
                f"The ONNX model does not reproduce the Keras output on {label} images. Expected max |ONNX - Keras| "
                f"<= {tolerance:g}. Received: {difference:.3g}"
            )
        max_difference = max(max_difference, difference)
    return max_difference
