"""Denoising quality of the default conv DAE against classical denoisers on Fashion-MNIST (gaussian 0.3).

    .venv/bin/python -m bench.quality [--epochs N] [--max-train-images N] [--test-images N]

Trains dae.spec.TrainingSpec() (the defaults: conv DAE, fashion_mnist, gaussian 0.3 clipped) and prints PSNR/SSIM/L1
of the noisy input, the model, TV (Chambolle), NL-means and BM3D side by side on the first --test-images images of
the canonical t10k test split, all on the same noisy images (σ = 0.3 on [0, 1], clipped to [0, 1]). BM3D comes from
the optional PyPI package `bm3d` (given the true σ); without it the row is skipped with a note. The issue's target:
the model beats the best classical method by >= 3 dB PSNR after <= 5 minutes of training on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from dae.data import load_dataset
from dae.evaluation.baselines import denoise_bm3d_batch, denoise_nl_means_batch, denoise_tv_batch
from dae.evaluation.metrics import image_quality
from dae.evaluation.report import keras_predictor
from dae.noise import add_noise
from dae.spec import NoiseSpec, TrainingSpec

TARGET_MARGIN_DB = 3.0


def main() -> int:
    """Train, denoise, compare; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, help="override TrainingSpec().epochs")
    parser.add_argument("--max-train-images", type=int, help="train on a seeded subset of this many images")
    parser.add_argument("--test-images", type=int, default=500, help="first N t10k images to score (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    arguments = parser.parse_args()

    overrides = {"epochs": arguments.epochs, "max_train_images": arguments.max_train_images}
    spec = TrainingSpec(**{key: value for key, value in overrides.items() if value is not None})
    if spec.dataset != "fashion_mnist":
        print(f"note: TrainingSpec() defaults to dataset {spec.dataset!r}; this benchmark uses it as is")

    from dae.training import TrainingHooks, fit_autoencoder  # noqa: PLC0415 - imports TensorFlow

    data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=spec.max_train_images)
    print(
        f"spec: {spec.architecture.type} filters={spec.architecture.filters} loss={spec.loss.type} "
        f"noise={spec.noise.type}:{spec.noise.level} epochs={spec.epochs} batch={spec.batch_size} "
        f"train images={len(data.train)}",
        flush=True,
    )
    started = time.perf_counter()
    result = fit_autoencoder(
        spec,
        data,
        hooks=TrainingHooks(
            on_epoch=lambda epoch: print(
                f"  epoch {epoch.epoch}/{epoch.epochs} loss {epoch.loss:.5f} val_loss {epoch.val_loss} "
                f"{epoch.elapsed_s:.0f}s",
                flush=True,
            )
        ),
    )
    wall_seconds = time.perf_counter() - started
    print(
        f"training: {result.training_seconds:.1f}s in fit loop, {wall_seconds:.1f}s wall, "
        f"{result.epochs_completed} epochs, stop reason {result.stop_reason}",
        flush=True,
    )

    sigma = 0.3
    clean = data.test[: arguments.test_images]
    noisy = add_noise(clean, NoiseSpec(type="gaussian", level=sigma, clip=True), seed=arguments.seed)
    methods: dict[str, tuple[np.ndarray, float]] = {"noisy": (noisy, 0.0)}
    for label, denoise in (
        ("model", keras_predictor(result.model)),
        ("tv", denoise_tv_batch),
        ("nl_means", denoise_nl_means_batch),
    ):
        started = time.perf_counter()
        output = np.clip(denoise(noisy), 0.0, 1.0)
        methods[label] = (output, time.perf_counter() - started)
    started = time.perf_counter()
    bm3d_output = denoise_bm3d_batch(noisy, sigma)
    if bm3d_output is not None:
        methods["bm3d"] = (bm3d_output, time.perf_counter() - started)

    print(f"\nFashion-MNIST t10k[:{len(clean)}], gaussian sigma={sigma} (clipped to [0, 1])")
    print(f"{'method':<10} {'PSNR dB':>8} {'SSIM':>7} {'L1':>8} {'seconds':>8}")
    scores = {}
    for label, (output, seconds) in methods.items():
        quality = image_quality(clean, output)
        scores[label] = quality
        print(f"{label:<10} {quality['psnr']:8.2f} {quality['ssim']:7.4f} {quality['l1']:8.4f} {seconds:8.2f}")
    if bm3d_output is None:
        print("bm3d       skipped: the optional `bm3d` package is not installed (pip install bm3d)")
    classical = {label: scores[label]["psnr"] for label in ("tv", "nl_means", "bm3d") if label in scores}
    best_label = max(classical, key=classical.get)
    margin = scores["model"]["psnr"] - classical[best_label]
    verdict = "meets" if margin >= TARGET_MARGIN_DB and wall_seconds <= 300 else "misses"
    print(
        f"\nmodel - best classical ({best_label}) = {margin:+.2f} dB PSNR; training {wall_seconds:.0f}s wall. "
        f"{verdict} the target (>= {TARGET_MARGIN_DB:.0f} dB, <= 300 s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
