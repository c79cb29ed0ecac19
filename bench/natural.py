"""Whole natural photos: a blind model trained on `natural_patches` against NL-means and BM3D (issue 16).

    .venv/bin/python -m bench.natural [--job '{"epochs": 30}'] [--threads 1] [--skip-bm3d]

Trains NATURAL_JOB (the natural-photos job of bench/README.md; --job overrides its fields) with the library's fit, exports it
to ONNX as a job does, then denoises the three held-out photos at full size (camera 512×512, gravel 512×512, coffee
400×600 in gray; none of their pixels is in the training patches) at gaussian σ = 15, 25, 50 / 255, clipped to
[0, 1]. Prints PSNR (dB) per photo and the average for the noisy input, NL-means (σ estimated, as the model cards do),
BM3D (the optional `bm3d` package, true σ; its licence is non-commercial, so it is not a dependency: skipped when not
importable) and the model (onnxruntime, --threads intra-op threads), with each method's seconds per 512×512 photo
(median over the photos, scaled by pixels). The last lines check issue 16's acceptance 3 at σ = 25.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.quality import candidate_spec
from dae.data import load_dataset
from dae.data.bundled import NATURAL_TEST_IMAGES, bundled_gray_image
from dae.evaluation.baselines import denoise_bm3d_batch, denoise_nl_means_batch
from dae.evaluation.metrics import image_quality
from dae.export import export_onnx, onnx_session
from dae.noise import add_noise
from dae.spec import NoiseSpec

SIGMAS_255 = (15, 25, 50)
#: Acceptance 3 of issue 16 at σ = 25/255: the model's margin over NL-means (average over the photos) and its
#: speed-up over BM3D per photo.
NL_MEANS_MARGIN_DB = 1.0
BM3D_SPEEDUP = 100.0
PHOTO_PIXELS = 512 * 512

#: The natural-photos job: blind over σ 15..51 / 255 on the bundled patches, each patch's loss weighted by (min/σ)²;
#: a U-Net small enough to stay 100x faster than BM3D on a 512x512 photo (bench/README.md, 2026-12-03).
NATURAL_JOB: dict[str, Any] = {
    "name": "natural",
    "dataset": "natural_patches",
    "architecture": {"type": "unet", "filters": [8, 16, 32, 64]},
    "loss": {"type": "mse", "level_weighting": 2},
    "noise": {"type": "gaussian", "level": [0.058, 0.2]},
    "epochs": 15,
    "batch_size": 32,
    "optimizer": {"learning_rate": 0.002},
}


def _photo_noise(sigma_255: int) -> NoiseSpec:
    return NoiseSpec(type="gaussian", level=sigma_255 / 255.0, clip=True)


def _timed(denoise: Callable[[np.ndarray], np.ndarray], noisy: np.ndarray) -> tuple[np.ndarray, float]:
    """(denoised (1, H, W, 1), seconds per 512×512 photo)."""
    started = time.perf_counter()
    denoised = np.clip(np.asarray(denoise(noisy), dtype=np.float32), 0.0, 1.0)
    seconds = time.perf_counter() - started
    return denoised, seconds * PHOTO_PIXELS / (noisy.shape[1] * noisy.shape[2])


def main() -> int:
    """Train, export, then score every method on every photo and σ; print the table and the verdict."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", type=json.loads, default={}, help="JSON fields overriding NATURAL_JOB")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2: BM3D's "
                        "libbm4d uses both cores; NL-means uses one)")
    parser.add_argument("--skip-bm3d", action="store_true", help="do not run BM3D even when it is importable")
    parser.add_argument("--seed", type=int, default=0, help="seed of the photos' noise")
    arguments = parser.parse_args()

    spec = candidate_spec(arguments.job, base=NATURAL_JOB)
    photos = {name: bundled_gray_image(name)[np.newaxis, ..., np.newaxis] for name in NATURAL_TEST_IMAGES}
    print(f"job: {spec.model_dump(mode='json', include={'architecture', 'noise', 'epochs', 'batch_size'})}",
          flush=True)

    from dae.training import fit_autoencoder  # noqa: PLC0415 - imports TensorFlow

    data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=spec.max_train_images)
    result = fit_autoencoder(spec, data)
    print(f"trained {result.training_seconds:.0f} s, {result.epochs_completed} epochs on {len(data.train)} patches "
          f"({result.stop_reason})", flush=True)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "model.onnx"
        export_onnx(result.model, path, real_images=data.test[:8])
        session = onnx_session(path, threads=arguments.threads)
    input_name = session.get_inputs()[0].name

    def run_model(noisy: np.ndarray) -> np.ndarray:
        return session.run(None, {input_name: noisy})[0]

    model = f"model ({arguments.threads} thread{'s' if arguments.threads > 1 else ''})"
    methods: dict[str, Callable[[np.ndarray, float], Any]] = {
        "noisy input": lambda noisy, _sigma: noisy,
        "NL-means (estimated σ)": lambda noisy, _sigma: denoise_nl_means_batch(noisy),
        "BM3D (true σ)": denoise_bm3d_batch,
        model: lambda noisy, _sigma: run_model(noisy),
    }
    if arguments.skip_bm3d or denoise_bm3d_batch(np.zeros((1, 32, 32, 1), np.float32), 0.1) is None:
        print("BM3D skipped: " + ("--skip-bm3d" if arguments.skip_bm3d else "the `bm3d` package is not importable"))
        del methods["BM3D (true σ)"]
    run_model(photos[NATURAL_TEST_IMAGES[0]])  # warm-up: the first run plans the session's memory
    psnr: dict[str, dict[int, dict[str, float]]] = {method: {} for method in methods}
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for sigma_index, sigma_255 in enumerate(SIGMAS_255):
        for photo_index, (name, clean) in enumerate(photos.items()):
            noisy = add_noise(clean, _photo_noise(sigma_255), seed=[arguments.seed, sigma_index, photo_index])
            for method, denoise in methods.items():
                denoised, per_photo = _timed(lambda image, d=denoise, s=sigma_255 / 255.0: d(image, s), noisy)
                psnr[method].setdefault(sigma_255, {})[name] = image_quality(clean, denoised)["psnr"]
                seconds[method].append(per_photo)
            print(f"σ={sigma_255}/255 {name}: " + ", ".join(
                f"{method.split(' ')[0]} {psnr[method][sigma_255][name]:.2f}"
                for method in methods), flush=True)

    print("\n| method | " + " | ".join(f"σ={s}/255 ({', '.join(photos)}) → mean" for s in SIGMAS_255)
          + " | s per 512² photo |")
    print("|---|" + "---|" * len(SIGMAS_255) + "---|")
    means: dict[str, dict[int, float]] = {}
    for method, by_sigma in psnr.items():
        means[method] = {sigma: statistics.fmean(by_sigma[sigma].values()) for sigma in by_sigma}
        cells = [" / ".join(f"{by_sigma[s][n]:.2f}" for n in photos) + f" → **{means[method][s]:.2f}**"
                 for s in SIGMAS_255]
        timing = "" if method == "noisy input" else f"{statistics.median(seconds[method]):.3f}"
        print(f"| {method} | " + " | ".join(cells) + f" | {timing} |")

    margin = means[model][25] - means["NL-means (estimated σ)"][25]
    print(f"\nσ=25: model − NL-means {margin:+.2f} dB (>= {NL_MEANS_MARGIN_DB}: {margin >= NL_MEANS_MARGIN_DB})")
    if "BM3D (true σ)" in means:
        speedup = statistics.median(seconds["BM3D (true σ)"]) / statistics.median(seconds[model])
        print(f"σ=25: model − BM3D {means[model][25] - means['BM3D (true σ)'][25]:+.2f} dB; "
              f"{speedup:.0f}× faster per photo (>= {BM3D_SPEEDUP:g}: {speedup >= BM3D_SPEEDUP})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
