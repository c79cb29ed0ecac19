"""Command line: train a denoising autoencoder and publish it to a model store, without the gateway or a queue.

    python -m worker.train_cli --dataset fashion_mnist --epochs 3 --max-train-images 5000 --store var/store

A spec file (--spec-json, the same JSON the REST API takes) is the starting point; the flags override its fields.
Prints the per-epoch progress, then the model id, the card path and the evaluation table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.datasets import DatasetStore
from core.store import ModelStore, model_id_for_job, new_model_id
from dae.errors import DaeError
from dae.spec import EpochMetrics, TrainingSpec

DEFAULT_STORE = Path("var/store")


def _noise_level(text: str) -> float | list[float]:
    """`0.3` -> 0.3; `0.05,0.5` -> [0.05, 0.5] (the spec checks the values)."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected a number or MIN,MAX. Received: {text!r}") from None
    return values[0] if len(values) == 1 else values


def _int_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"Expected comma-separated integers. Received: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments."""
    parser = argparse.ArgumentParser(prog="python -m worker.train_cli", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", type=Path, default=DEFAULT_STORE, help=f"model store directory (default {DEFAULT_STORE})"
    )
    parser.add_argument("--spec-json", type=Path, help="a TrainingSpec as JSON; the flags below override its fields")
    parser.add_argument("--dataset", help="fashion_mnist, mnist, digits, natural_patches or an uploaded ds_... id")
    parser.add_argument("--name", help="model name (versions 1, 2, ... per name)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-train-images", type=int)
    parser.add_argument("--max-runtime-s", type=float)
    parser.add_argument("--architecture", choices=["dense", "conv", "unet", "residual"], help="architecture.type")
    parser.add_argument("--filters", type=_int_list, help="architecture.filters, comma-separated (e.g. 16,32)")
    parser.add_argument("--noise-type", choices=["gaussian", "salt_pepper", "masking", "speckle"])
    parser.add_argument(
        "--noise-level", type=_noise_level, help="noise.level: a number, or MIN,MAX for a blind range (e.g. 0.05,0.5)"
    )
    parser.add_argument(
        "--loss", choices=["mae", "mse", "huber", "l1_l2", "lp", "binary_crossentropy"], help="loss.type"
    )
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--job-id", help="job id recorded in the model card (default none)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    return parser


def spec_from_arguments(arguments: argparse.Namespace) -> TrainingSpec:
    """The TrainingSpec of the spec file (or the defaults) with the flags applied."""
    document: dict[str, Any] = {}
    if arguments.spec_json is not None:
        document = json.loads(arguments.spec_json.read_text(encoding="utf-8"))
        if not isinstance(document, dict):
            raise ValueError(f"Expected a JSON object in {arguments.spec_json}. Received: {type(document).__name__}")
    top_level = {
        "dataset": arguments.dataset,
        "name": arguments.name,
        "epochs": arguments.epochs,
        "batch_size": arguments.batch_size,
        "seed": arguments.seed,
        "max_train_images": arguments.max_train_images,
        "max_runtime_s": arguments.max_runtime_s,
    }
    document.update({key: value for key, value in top_level.items() if value is not None})
    nested = {
        ("architecture", "type"): arguments.architecture,
        ("architecture", "filters"): arguments.filters,
        ("noise", "type"): arguments.noise_type,
        ("noise", "level"): arguments.noise_level,
        ("loss", "type"): arguments.loss,
        ("optimizer", "learning_rate"): arguments.learning_rate,
    }
    for (section, key), value in nested.items():
        if value is not None:
            document.setdefault(section, {})[key] = value
    return TrainingSpec.model_validate(document)


def _print_epoch(metrics: EpochMetrics) -> None:
    validation = f" val_loss {metrics.val_loss:.5f}" if metrics.val_loss is not None else ""
    eta = f" eta {metrics.eta_s:.0f}s" if metrics.eta_s is not None else ""
    print(
        f"epoch {metrics.epoch}/{metrics.epochs} loss {metrics.loss:.5f}{validation} lr {metrics.learning_rate:.2e} "
        f"{metrics.elapsed_s:.1f}s{eta}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit status."""
    arguments = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        spec = spec_from_arguments(arguments)
    except (ValidationError, ValueError, OSError) as error:
        print(f"invalid spec: {error}", file=sys.stderr)
        return 2

    # Heavy imports (TensorFlow) only after the arguments are known to be valid.
    from dae.evaluation.report import format_evaluation  # noqa: PLC0415
    from dae.publish import publish_training_result  # noqa: PLC0415
    from dae.training import TrainingHooks, fit_autoencoder  # noqa: PLC0415

    store = ModelStore(arguments.store)
    print(
        f"training {spec.architecture.type} DAE on {spec.dataset} for {spec.epochs} epochs; store {store.root}",
        flush=True,
    )
    try:
        result = fit_autoencoder(spec, store=DatasetStore(arguments.store), hooks=TrainingHooks(on_epoch=_print_epoch))
        model_id = model_id_for_job(arguments.job_id) if arguments.job_id else new_model_id()
        card = publish_training_result(result, spec, store, model_id=model_id, job_id=arguments.job_id)
    except DaeError as error:
        print(f"{type(error).__name__}: {error.message}", file=sys.stderr)
        return 1
    print(f"stop reason: {result.stop_reason}; trained {result.training_seconds:.1f}s")
    print(f"model id: {card.id} ({card.name} v{card.version})")
    print(f"card: {store.artifact_path(card.id, 'card.json')}")
    print(f"onnx max |onnx - keras|: {card.onnx_max_abs_diff:.3g}")
    print(format_evaluation(card.evaluation))
    return 0


if __name__ == "__main__":
    sys.exit(main())
