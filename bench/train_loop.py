"""The training loop alone, without the service: `dae.training.fit_autoencoder` against bench/train.py's bare Keras
script, interleaved in one process so that a busy machine slows both alike.

    .venv/bin/python -m bench.train_loop [--rounds 3] [--epochs 3] [--max-train-images 10000]
    .venv/bin/python -m bench.train_loop --old-loop /tmp/training_old.py   # also an older dae/training.py

Each round trains the same spec (bench/train.py's: TrainingSpec() defaults, the given epochs and image budget) with
each side, in an order that rotates per round; printed: each run's images/s of the train batches per epoch, their
harmonic mean over epochs 2+ (epoch 1 traces the train step), and per round the ratio fit_autoencoder / bare.
fit_autoencoder runs as a job runs it (a checkpoint directory, a cancel poll). `--old-loop` loads a module file
that defines fit_autoencoder and TrainingHooks with the same signatures, e.g. the loop before issue 14:
`git show bb9bf19:dae/training.py > /tmp/training_old.py`.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.harness import format_table, load_average
from bench.train import build_spec, run_bare_keras
from dae.spec import TrainingSpec


def _load_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_training_loop", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _steady(rates: list[float]) -> float:
    later = rates[1:] or rates
    return len(later) / sum(1 / rate for rate in later)


def run_training_module(module: ModuleType, spec: TrainingSpec, data: Any) -> list[float]:
    """images/s per epoch of `module.fit_autoencoder`, with a checkpoint directory and a cancel poll."""
    rates: list[float] = []
    with tempfile.TemporaryDirectory(prefix="dae-bench-loop-") as directory:
        hooks = module.TrainingHooks(on_epoch=lambda metrics: rates.append(metrics.images_per_s),
                                     should_cancel=lambda: False, checkpoint_dir=Path(directory))  # fmt: skip
        module.fit_autoencoder(spec, data, hooks=hooks)
    return rates


def run_bare(spec: TrainingSpec) -> list[float]:
    """images/s per epoch of bench/train.py's bare Keras script."""
    epochs, images, _ = run_bare_keras(spec)
    return [images / (end - start) for start, end in epochs]


def main() -> int:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    parser.add_argument("--max-train-images", type=int, default=10_000, help="training images (default 10000)")
    parser.add_argument("--architecture", choices=["conv", "dense"], help="default: TrainingSpec()'s (conv)")
    parser.add_argument("--old-loop", type=Path, help="an older dae/training.py to time as a third side")
    arguments = parser.parse_args()
    spec = build_spec(arguments)

    import dae.training  # noqa: PLC0415 - imports TensorFlow
    from dae.data import load_dataset  # noqa: PLC0415

    data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=spec.max_train_images)
    sides: dict[str, Callable[[], list[float]]] = {
        "fit_autoencoder": lambda: run_training_module(dae.training, spec, data),
        "bare Keras": lambda: run_bare(spec),
    }
    if arguments.old_loop is not None:
        old = _load_module(arguments.old_loop)
        sides["old loop"] = lambda: run_training_module(old, spec, data)
    print(f"bench/train_loop.py: {spec.architecture.type} DAE on {spec.dataset}, {spec.epochs} epochs, "
          f"max_train_images={spec.max_train_images}; load average at start: {load_average()}")  # fmt: skip
    names = list(sides)
    rows, ratios = [], []
    for round_index in range(arguments.rounds):
        shift = round_index % len(names)
        steady: dict[str, float] = {}
        for name in names[shift:] + names[:shift]:
            rates = sides[name]()
            steady[name] = _steady(rates)
            print(f"  round {round_index + 1} {name}: " + ", ".join(f"{rate:,.0f}" for rate in rates) + " images/s")
        ratios.append(steady["fit_autoencoder"] / steady["bare Keras"])
        rows.append([str(round_index + 1)] + [f"{steady[name]:,.0f}" for name in names] + [f"{ratios[-1]:.2f}"])
    print(format_table(["round", *names, "fit_autoencoder / bare"], rows))
    print(
        f"median ratio fit_autoencoder / bare Keras, epochs 2+: {statistics.median(ratios):.2f}; "
        f"load average at end: {load_average()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
