"""Denoising quality of candidate models against classical denoisers on Fashion-MNIST, over the noise levels.

    .venv/bin/python -m bench.quality [--candidates default,unet-16-32,...] [--test-images 500] [--seed 0] [--skip-bm3d]
    .venv/bin/python -m bench.quality --candidate 'mine={"architecture": {"type": "residual"}}'

Prints issue 16's table: PSNR (dB) at gaussian σ = 0.1 / 0.2 / 0.3 / 0.5 (clipped to [0, 1]) on the first
--test-images images of the canonical t10k test split, for the noisy input, NL-means (its σ estimated from each
image, as the model cards do), TV (Chambolle, same estimate), BM3D (the optional `bm3d` package, given the true σ;
skipped when it is not importable) and each candidate model, with its training seconds (fit loop; the job's wall time
adds ~3-5 s of export and evaluation). Every method sees the same noisy images. A candidate is TrainingSpec() (the
default job, `default`) with fields overridden; CANDIDATES lists the ones measured in bench/README.md. The last lines
check the default job against issue 16's acceptance 1: above the better of NL-means and TV at every σ and >= 4.5 dB
above NL-means at σ = 0.3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from dae.data import load_dataset
from dae.evaluation.baselines import denoise_bm3d_batch, denoise_nl_means_batch, denoise_tv_batch
from dae.evaluation.metrics import image_quality
from dae.evaluation.report import keras_predictor
from dae.noise import add_noise
from dae.spec import NoiseSpec, TrainingSpec

SIGMAS = (0.1, 0.2, 0.3, 0.5)
#: Acceptance 1 of issue 16: the default model's margin over NL-means at σ = 0.3.
NL_MEANS_MARGIN_AT_03_DB = 4.5

#: Candidates measured for the default job (bench/README.md): overrides of TrainingSpec()'s fields.
CANDIDATES: dict[str, dict[str, Any]] = {
    "default": {},
    "unet-16-32-64-8x20k": {"epochs": 8, "max_train_images": 20_000},
    "conv-0.3": {"architecture": {"type": "conv"}, "noise": {"level": 0.3}, "max_runtime_s": 280, "epochs": 6},
    "unet-32-64-blind": {"architecture": {"type": "unet", "filters": [32, 64]}},
    "unet-16-32-blind": {"architecture": {"type": "unet", "filters": [16, 32]}},
    "residual-5x32-blind": {"architecture": {"type": "residual", "filters": [32] * 5}},
}


def candidate_spec(overrides: dict[str, Any], base: dict[str, Any] | None = None) -> TrainingSpec:
    """`base` (default: TrainingSpec(), the default job) with `overrides` merged in (nested dicts merge one level
    deep; another architecture type starts from that type's defaults)."""
    document: dict[str, Any] = dict(base) if base is not None else TrainingSpec().model_dump(mode="json")
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            if key == "architecture" and "type" in value and value["type"] != document[key]["type"]:
                document[key] = {}  # another type: its own defaults, not the default type's filters
            document[key] = {**document[key], **value}
        else:
            document[key] = value
    return TrainingSpec.model_validate(document)


def _parse_candidate(text: str) -> tuple[str, dict[str, Any]]:
    name, _, overrides = text.partition("=")
    if not name or not overrides:
        raise argparse.ArgumentTypeError(f"Expected NAME=JSON. Received: {text!r}")
    value = json.loads(overrides)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"Expected a JSON object after NAME=. Received: {overrides!r}")
    return name, value


def main() -> int:
    """Baselines once, then each candidate: train, denoise, score; print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default="default", help=f"comma-separated names of {sorted(CANDIDATES)}")
    parser.add_argument("--candidate", type=_parse_candidate, action="append", default=[], metavar="NAME=JSON",
                        help="another candidate: TrainingSpec() with these fields (repeatable)")
    parser.add_argument("--test-images", type=int, default=500, help="first N t10k images to score (default 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the evaluation noise")
    parser.add_argument("--skip-bm3d", action="store_true",
                        help="do not run BM3D even when it is importable (~0.3 s per 28x28 image on 2 cores)")
    arguments = parser.parse_args()

    chosen = [name for name in arguments.candidates.split(",") if name]
    unknown = [name for name in chosen if name not in CANDIDATES]
    if unknown:
        parser.error(f"Expected candidates among {sorted(CANDIDATES)}. Received: {unknown}")
    candidates = [(name, CANDIDATES[name]) for name in chosen] + list(arguments.candidate)
    specs = [(name, candidate_spec(overrides)) for name, overrides in candidates]

    test = load_dataset("fashion_mnist", seed=0).test[: arguments.test_images]
    noisy = {sigma: add_noise(test, NoiseSpec(type="gaussian", level=sigma, clip=True), seed=[arguments.seed, index])
             for index, sigma in enumerate(SIGMAS)}
    table: dict[str, tuple[list[float], str]] = {}

    def score(label: str, denoise: Any, seconds_note: str = "") -> list[float]:
        started = time.perf_counter()
        psnrs = [image_quality(test, np.clip(denoise(noisy[sigma], sigma), 0.0, 1.0))["psnr"] for sigma in SIGMAS]
        note = seconds_note or f"{time.perf_counter() - started:.1f} s for {len(SIGMAS) * len(test)} images"
        table[label] = (psnrs, note)
        print(f"{label:<24} " + " ".join(f"{value:6.2f}" for value in psnrs) + f"   {note}", flush=True)
        return psnrs

    print(f"Fashion-MNIST t10k[:{len(test)}], gaussian σ = {', '.join(map(str, SIGMAS))} (clipped), PSNR dB", flush=True)
    score("noisy input", lambda images, _sigma: images)
    nl_means = score("NL-means (estimated σ)", lambda images, _sigma: denoise_nl_means_batch(images))
    tv = score("TV (estimated σ)", lambda images, _sigma: denoise_tv_batch(images))
    if arguments.skip_bm3d:
        print("BM3D skipped: --skip-bm3d", flush=True)
    elif denoise_bm3d_batch(noisy[SIGMAS[0]][:1], SIGMAS[0]) is not None:
        score("BM3D (true σ)", lambda images, sigma: denoise_bm3d_batch(images, sigma))
    else:
        print("BM3D skipped: the optional `bm3d` package is not importable", flush=True)

    from dae.training import fit_autoencoder  # noqa: PLC0415 - imports TensorFlow

    for name, spec in specs:
        architecture = spec.architecture
        shape = architecture.hidden_units if architecture.type == "dense" else architecture.filters
        print(f"\n{name}: {architecture.type} {shape} bn={architecture.batch_norm} noise {spec.noise.level} "
              f"epochs {spec.epochs} batch {spec.batch_size} lr {spec.optimizer.learning_rate} "
              f"max_train_images {spec.max_train_images} max_runtime_s {spec.max_runtime_s:g}", flush=True)
        data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=spec.max_train_images)
        result = fit_autoencoder(spec, data)
        predict = keras_predictor(result.model)
        note = (f"trained {result.training_seconds:.0f} s, {result.epochs_completed} epochs on {len(data.train)} "
                f"images ({result.stop_reason})")
        psnrs = score(name, lambda images, _sigma, predict=predict: predict(images), note)
        if name == "default":
            best_classical = [max(a, b) for a, b in zip(nl_means, tv, strict=True)]
            above = all(model > best for model, best in zip(psnrs, best_classical, strict=True))
            margin = psnrs[SIGMAS.index(0.3)] - nl_means[SIGMAS.index(0.3)]
            verdict = "meets" if above and margin >= NL_MEANS_MARGIN_AT_03_DB else "misses"
            print(f"default: above the better classical at every σ: {above}; NL-means margin at σ=0.3 {margin:+.2f} dB "
                  f"(>= {NL_MEANS_MARGIN_AT_03_DB}); {verdict} acceptance 1 (also needs <= 300 s job wall time)")

    print("\n| method | " + " | ".join(f"σ={sigma}" for sigma in SIGMAS) + " | notes |")
    print("|---|" + "---|" * len(SIGMAS) + "---|")
    for label, (psnrs, note) in table.items():
        print(f"| {label} | " + " | ".join(f"{value:.2f}" for value in psnrs) + f" | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
