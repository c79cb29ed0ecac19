"""publish_training_result: all five artifacts, a complete card, atomic refusal on a failed export; the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.store import ModelStore, model_id_for_job, new_model_id  # noqa: E402
from dae import export  # noqa: E402
from dae.data import load_dataset  # noqa: E402
from dae.errors import ExportFailed  # noqa: E402
from dae.models import build_autoencoder  # noqa: E402
from dae.publish import publish_training_result  # noqa: E402
from dae.spec import EpochMetrics, ModelCard, TrainingSpec  # noqa: E402
from dae.training import TrainingResult  # noqa: E402
from worker import train_cli  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ARTIFACTS = ["card.json", "history.png", "model.keras", "model.onnx", "samples.png"]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def hand_made_result(spec: TrainingSpec, digits) -> TrainingResult:
    """A TrainingResult as fit_autoencoder returns it, with a freshly built (untrained) model."""
    keras.utils.set_random_seed(spec.seed)
    model = build_autoencoder(spec, digits.image_shape)
    history = [
        EpochMetrics(
            epoch=epoch, epochs=2, loss=0.1 / epoch, val_loss=0.12 / epoch, learning_rate=1e-3, elapsed_s=epoch
        )
        for epoch in (1, 2)
    ]
    return TrainingResult(
        model=model,
        history=history,
        stop_reason="completed",
        epochs_completed=2,
        resumed_from_epoch=None,
        training_seconds=2.5,
        data=digits,
    )


def test_publish_writes_all_artifacts_and_a_complete_card(store_dir: Path, digits) -> None:
    store = ModelStore(store_dir)
    spec = TrainingSpec(dataset="digits", architecture={"type": "conv", "filters": [4, 8]}, noise={"level": 0.3}, epochs=2,
                        seed=3)
    result = hand_made_result(spec, digits)
    card = publish_training_result(result, spec, store, model_id=model_id_for_job("j_0123456789abcdef"), job_id="j_0123456789abcdef")

    model_dir = store.models_dir / card.id
    assert sorted(os.listdir(model_dir)) == ARTIFACTS
    for png in ("history.png", "samples.png"):
        assert (model_dir / png).read_bytes()[:8] == PNG_MAGIC
    assert ModelCard.model_validate_json((model_dir / "card.json").read_text()) == card
    assert store.read_card("digits-conv") == card
    assert os.listdir(store.tmp_dir) == []  # the staging directory became the model directory

    assert (card.name, card.version, card.job_id) == ("digits-conv", 1, "j_0123456789abcdef")
    assert card.spec == spec
    assert card.input_shape == [None, None, 1] and card.trained_shape == [8, 8, 1]
    assert card.parameters == result.model.count_params() > 0
    assert card.history == result.history and card.stop_reason == "completed"
    assert card.training_seconds == 2.5
    assert 0.0 <= card.onnx_max_abs_diff <= 1e-4
    assert card.dataset == {"id": "digits", "fingerprint": digits.fingerprint, "train": 1500, "test": 297}
    assert {"tensorflow", "keras", "onnxruntime", "numpy", "dae"} <= set(card.library_versions)
    assert card.created_at.tzinfo is not None
    # Evaluation: training noise + sweep (deduplicated) x (noisy, model, tv, nl_means).
    assert len(card.evaluation) == 16
    assert {row.noise for row in card.evaluation} == {"gaussian:0.1", "gaussian:0.2", "gaussian:0.3", "gaussian:0.5"}
    assert {row.method for row in card.evaluation} == {"noisy", "model", "tv", "nl_means"}
    assert all(np.isfinite([row.psnr, row.ssim, row.l1, row.mse]).all() for row in card.evaluation)
    layer_names = [layer.layer for layer in card.sparsity.layers]
    assert "code" in layer_names and len(layer_names) == 5  # 2 encoder convs, 2 deconvs, the output conv
    assert 0.0 <= card.sparsity.code_zero_fraction <= 1.0

    # model.keras reloads in safe mode and agrees with the published ONNX file.
    reloaded = keras.saving.load_model(model_dir / "model.keras", safe_mode=True)
    images = digits.test[:5]
    onnx_output = export.onnx_predictor(model_dir / "model.onnx")(images)
    assert np.max(np.abs(keras.ops.convert_to_numpy(reloaded(images)) - onnx_output)) <= 1e-4


def test_publish_dense_model_under_its_spec_name(store_dir: Path, digits) -> None:
    store = ModelStore(store_dir)
    assert store.reserve_version("tiny-dense") == 1  # e.g. taken by a concurrent job whose export failed
    spec = TrainingSpec(
        name="tiny-dense", dataset="digits", architecture={"type": "dense", "hidden_units": [16], "latent_dim": 4}
    )
    card = publish_training_result(hand_made_result(spec, digits), spec, store, model_id=new_model_id())
    assert (card.name, card.version, card.input_shape) == ("tiny-dense", 2, [8, 8, 1])
    assert store.read_card("tiny-dense").id == card.id
    assert [layer.layer for layer in card.sparsity.layers] == [
        "encoder_dense_1",
        "code",
        "decoder_dense_1",
        "decoder_output",
    ]
    card_document = json.loads(store.artifact_path("tiny-dense:2", "card.json").read_text())
    assert card_document["spec"]["architecture"]["type"] == "dense"
    assert len(store.artifact_path(card.id, "card.json").read_bytes()) < 64_000  # small: lists read many of them


def test_failed_export_publishes_nothing(store_dir: Path, digits, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ModelStore(store_dir)
    spec = TrainingSpec(dataset="digits", architecture={"type": "dense", "hidden_units": [8], "latent_dim": 4})
    original_reference = export._keras_reference
    monkeypatch.setattr(export, "_keras_reference", lambda model, images: original_reference(model, images) + 2e-4)
    with pytest.raises(ExportFailed, match="does not reproduce the Keras output"):
        publish_training_result(hand_made_result(spec, digits), spec, store, model_id=model_id_for_job("j_00000000000000aa"), job_id="j_00000000000000aa")
    assert store.list_models() == ([], 0)
    assert not store.models_dir.exists() or os.listdir(store.models_dir) == []
    assert os.listdir(store.tmp_dir) == []  # the staging directory was removed
    assert store.reserve_version("digits-dense") == 1  # no version was used up


def test_cli_spec_overrides(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(
        json.dumps({"dataset": "natural_patches", "noise": {"type": "masking", "level": 0.4}, "epochs": 9})
    )
    arguments = train_cli.build_parser().parse_args(
        [
            "--spec-json",
            str(spec_file),
            "--epochs",
            "2",
            "--noise-level",
            "0.2",
            "--architecture",
            "dense",
            "--name",
            "cli",
        ]
    )
    spec = train_cli.spec_from_arguments(arguments)
    assert (spec.dataset, spec.epochs, spec.name) == ("natural_patches", 2, "cli")
    assert (spec.noise.type, spec.noise.level, spec.architecture.type) == ("masking", 0.2, "dense")
    blind = train_cli.spec_from_arguments(
        train_cli.build_parser().parse_args(["--noise-level", "0.05,0.5", "--architecture", "unet", "--filters", "8,16"])
    )
    assert (blind.noise.level, blind.architecture.type, blind.architecture.filters) == ([0.05, 0.5], "unet", [8, 16])
    assert train_cli.main(["--epochs", "0", "--store", str(tmp_path / "store")]) == 2  # invalid spec, no training


def test_cli_trains_and_publishes(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exit_code = train_cli.main(
        [
            "--store", str(store_dir),
            "--dataset", "digits",
            "--epochs", "2",
            "--architecture", "dense",
            "--max-train-images", "400",
            "--batch-size", "64",
            "--name", "cli-digits",
        ]
    )  # fmt: skip
    output = capsys.readouterr().out
    assert exit_code == 0, output
    card = ModelStore(store_dir).read_card("cli-digits")
    assert f"model id: {card.id}" in output and "epoch 2/2" in output and "nl_means" in output
    assert len(card.history) == 2 and card.dataset["train"] == 400
    assert sorted(os.listdir(store_dir / "models" / card.id)) == ARTIFACTS
