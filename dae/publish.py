"""Turn a finished training run into a published model: artifacts, evaluation, model card, atomic publish.

Everything is written into a private staging directory of the store first: model.keras, model.onnx (exported and
verified against Keras; ExportFailed publishes nothing), history.png, samples.png, and finally card.json via the
store's publish_model (core.store.ModelStore), which renames the directory into models/<id> in one step. The evaluation table is computed
with the verified ONNX file, i.e. with exactly the artifact the gateway serves; its model-independent rows (noisy,
TV, NL-means) are computed meanwhile, in dae.evaluation's helper process when the worker started one.

TensorFlow/Keras are imported lazily (through dae.export and dae.evaluation's Keras helpers) when a result is published.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

import dae
from dae.evaluation.helper import reference_rows_later
from dae.evaluation.metrics import psnr_per_image, sparsity_report
from dae.evaluation.report import evaluate_denoiser, noise_label, select_test_images
from dae.export import export_onnx, onnx_predictor
from dae.noise import add_noise
from dae.spec import EpochMetrics, ModelCard, NoiseSpec, TrainingSpec

if TYPE_CHECKING:
    from dae.training import TrainingResult

logger = logging.getLogger(__name__)

SAMPLE_IMAGES = 8
_LIBRARIES = {
    "tensorflow": "tensorflow-cpu",
    "keras": "keras",
    "onnxruntime": "onnxruntime",
    "tf2onnx": "tf2onnx",
    "numpy": "numpy",
    "scikit-image": "scikit-image",
}


class ModelPublisher(Protocol):
    """Where a model is staged and published, as one owner (core.store.ModelStore is one)."""

    owner: str

    def staging_dir(self) -> Path: ...

    def discard_staging(self, staging: Path) -> None: ...

    def reserve_version(self, name: str) -> int: ...

    def publish_model(self, staging: Path, card: ModelCard) -> ModelCard: ...


def default_model_name(spec: TrainingSpec) -> str:
    """The name a model gets when its spec has none: "<dataset>-<architecture type>"."""
    return spec.name or f"{spec.dataset}-{spec.architecture.type}"


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shaped a model (for the model card)."""
    versions = {"dae": dae.__version__}
    for label, distribution in _LIBRARIES.items():
        for candidate in (distribution, label):
            try:
                versions[label] = importlib.metadata.version(candidate)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def publish_training_result(
    result: TrainingResult, spec: TrainingSpec, store: ModelPublisher, *, model_id: str, job_id: str | None = None,
    before_publish: Callable[[], None] | None = None,
) -> ModelCard:
    """Write all artifacts of a training run into the store and publish its model card as `model_id`; returns it.

    A worker passes the id derived from the job (core.store.model_id_for_job), so one job never publishes two models.
    `before_publish` runs right before the model becomes visible (a worker checks it still owns the job there).

    Raises ExportFailed (nothing published, no version used) when the ONNX file does not match the Keras model.
    """
    model = result.model
    data = result.data
    staging = store.staging_dir()
    seconds: dict[str, float] = {}  # per step, logged: where a job's time after training goes
    try:
        clock = time.perf_counter()
        # The rows that do not need the model start first, in the helper process if this one has one.
        reference = reference_rows_later(data.test, spec.noise, seed=spec.seed)
        model.save(staging / "model.keras")
        clock = _lap(seconds, "save", clock)
        onnx_max_abs_diff = export_onnx(model, staging / "model.onnx", real_images=data.test, seed=spec.seed)
        clock = _lap(seconds, "export", clock)
        sparsity = sparsity_report(model, data.test)
        clock = _lap(seconds, "sparsity", clock)
        # One job at a time per process: onnxruntime may use the cores (the helper, if busy, shares them).
        predict = onnx_predictor(staging / "model.onnx", threads=min(4, os.cpu_count() or 1))
        write_history_plot(result.history, staging / "history.png", title=default_model_name(spec))
        sample_clean = select_test_images(data.test, spec.seed)[:SAMPLE_IMAGES]
        write_samples_plot(sample_clean, spec.noise, predict, staging / "samples.png", seed=spec.seed)
        clock = _lap(seconds, "plots", clock)
        # Last, so the helper has had the export and the plots to finish the reference rows.
        evaluation = evaluate_denoiser(
            predict,
            data.test,
            spec.noise,
            seed=spec.seed,
            reference=lambda: _timed(reference, seconds, "evaluation: waiting for the reference rows"),
        )
        _lap(seconds, "evaluation", clock)

        if before_publish is not None:
            before_publish()
        name = default_model_name(spec)
        # Reserved only once every artifact is in place, so failed exports do not use up versions.
        version = store.reserve_version(name)
        is_conv = spec.architecture.is_fully_convolutional  # conv, unet, residual: any H and W
        height, width, channels = data.image_shape
        card = ModelCard(
            id=model_id,
            name=name,
            version=version,
            owner=store.owner,
            job_id=job_id,
            created_at=datetime.now(UTC),
            spec=spec,
            input_shape=[None, None, channels] if is_conv else [height, width, channels],
            trained_shape=[height, width, channels],
            parameters=int(model.count_params()),
            history=list(result.history),
            stop_reason=result.stop_reason,
            evaluation=evaluation,
            sparsity=sparsity,
            dataset={
                "id": data.dataset_id,
                "fingerprint": data.fingerprint,
                "train": int(len(data.train)),
                "test": int(len(data.test)),
            },
            library_versions=library_versions(),
            training_seconds=float(result.training_seconds),
            onnx_max_abs_diff=onnx_max_abs_diff,
        )
        published = store.publish_model(staging, card)
    except BaseException:
        store.discard_staging(staging)
        raise
    logger.info(
        "model %s published as %s v%d; seconds: %s", published.id, published.name, published.version,
        ", ".join(f"{step} {value:.2f}" for step, value in seconds.items()),
    )
    return published


def _timed(function: Any, seconds: dict[str, float], step: str) -> Any:
    """function(), its time recorded as `step` (here: how long the evaluation waited for the reference rows)."""
    started = time.perf_counter()
    value = function()
    seconds[step] = time.perf_counter() - started
    return value


def _lap(seconds: dict[str, float], step: str, since: float) -> float:
    """Record the time since `since` as `step`; returns now."""
    now = time.perf_counter()
    seconds[step] = now - since
    return now


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend switch)
# ---------------------------------------------------------------------------------------------


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def write_history_plot(history: list[EpochMetrics], path: Path, *, title: str = "") -> None:
    """loss and val_loss per epoch as a PNG."""
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    figure = _figure(6, 4)
    axes = figure.add_subplot(1, 1, 1)
    epochs = [entry.epoch for entry in history]
    axes.plot(epochs, [entry.loss for entry in history], marker="o", label="loss")
    validation = [(entry.epoch, entry.val_loss) for entry in history if entry.val_loss is not None]
    if validation:
        axes.plot([epoch for epoch, _ in validation], [value for _, value in validation], marker="o", label="val_loss")
    if not history:
        axes.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlabel("epoch")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel("loss")
    axes.set_title(f"training history {title}".strip())
    axes.grid(True, alpha=0.3)
    if history:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, format="png")


def _strip(images: np.ndarray, gap: int) -> np.ndarray:
    """Images (N, H, W, C) side by side, `gap` NaN columns between them (drawn as background): (H, N·W + gaps, C)."""
    count, height, width, channels = images.shape
    strip = np.full((height, count * width + (count - 1) * gap, channels), np.nan, dtype=np.float32)
    for index in range(count):
        left = index * (width + gap)
        strip[:, left : left + width] = images[index]
    return strip


def write_samples_plot(clean: np.ndarray, noise: NoiseSpec, predict: Any, path: Path, *, seed: int = 0) -> None:
    """A PNG with rows clean, noisy, denoised (clipped) and the |error| heatmap of the denoised image.

    Each row is one image strip (one axes per row, not one per image: much faster to draw).
    """
    from matplotlib import colormaps  # noqa: PLC0415

    clean = np.asarray(clean, dtype=np.float32)
    noisy = add_noise(clean, noise, seed=[seed, 0])
    denoised = np.clip(np.asarray(predict(noisy), dtype=np.float32), 0.0, 1.0)
    error = np.abs(denoised - clean).mean(axis=-1, keepdims=True)
    noisy_psnr = psnr_per_image(clean, noisy)
    denoised_psnr = psnr_per_image(clean, denoised)
    count, height, width, _ = clean.shape
    gap = max(1, width // 8)
    figure = _figure(max(4.0, 1.1 * count + 1.5), 5.5)
    rows = [
        ("clean", clean, None),
        ("noisy", noisy, noisy_psnr),
        ("denoised", denoised, denoised_psnr),
        ("|error|", error, None),
    ]
    for row_index, (label, images, psnrs) in enumerate(rows):
        axes = figure.add_subplot(len(rows), 1, row_index + 1)
        strip = _strip(images, gap)
        if label == "|error|":
            heatmap = colormaps["magma"].with_extremes(bad="white")
            shown = axes.imshow(
                np.ma.masked_invalid(strip[..., 0]), cmap=heatmap, vmin=0.0, vmax=0.5, interpolation="nearest"
            )
            figure.colorbar(shown, ax=axes, fraction=0.02, pad=0.01)
        elif strip.shape[-1] == 1:
            gray = colormaps["gray"].with_extremes(bad="white")
            axes.imshow(np.ma.masked_invalid(strip[..., 0]), cmap=gray, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            axes.imshow(np.nan_to_num(strip, nan=1.0), interpolation="nearest")
        axes.set_yticks([])
        axes.set_ylabel(label)
        if psnrs is not None:
            axes.set_xticks([index * (width + gap) + (width - 1) / 2 for index in range(count)])
            axes.set_xticklabels([f"{value:.1f} dB" for value in psnrs], fontsize=7)
            axes.tick_params(axis="x", length=0)
        else:
            axes.set_xticks([])
    figure.suptitle(
        f"{noise_label(noise)} noise; PSNR under each noisy/denoised image; |error| scale 0-0.5", fontsize=9
    )
    figure.savefig(path, format="png")
