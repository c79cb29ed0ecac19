"""fit_autoencoder on tiny data: metrics, schedules, resume, cancellation, timeout, early stopping, failures."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from typing_extensions import override

from dae.data import DatasetSplits, load_dataset
from dae.errors import InvalidSpec, TrainingFailed
from dae.models import build_autoencoder
from dae.spec import EpochMetrics, OptimizerSpec, TrainingSpec
from dae.training import (
    CHECKPOINT_STATE_FILE,
    TrainingHooks,
    build_learning_rate,
    build_optimizer,
    check_output_not_collapsed,
    fit_autoencoder,
    split_train_validation,
)

TRAIN_IMAGES = 256
BATCH_SIZE = 32
STEPS_PER_EPOCH = math.ceil(TRAIN_IMAGES * 0.9 / BATCH_SIZE)  # 231 training images after a 10% validation split


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    """A few hundred 8x8 digits."""
    full = load_dataset("digits")
    return DatasetSplits(full.dataset_id, full.train[:TRAIN_IMAGES], full.test[:64], full.fingerprint)


def _spec(**fields) -> TrainingSpec:
    base = {
        "dataset": "digits",
        "architecture": {"type": "conv", "filters": [8, 16]},
        "noise": {"level": 0.2},
        "epochs": 3,
        "batch_size": BATCH_SIZE,
        "validation_split": 0.1,
    }
    return TrainingSpec.model_validate({**base, **fields})


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_validation_split_is_seeded_disjoint_and_keeps_a_training_image():
    train, validation = split_train_validation(100, 0.2, seed=3)
    again_train, again_validation = split_train_validation(100, 0.2, seed=3)
    _, other_validation = split_train_validation(100, 0.2, seed=4)
    assert len(validation) == 20 and len(train) == 80
    assert set(train).isdisjoint(validation) and set(train) | set(validation) == set(range(100))
    assert np.array_equal(validation, again_validation) and np.array_equal(train, again_train)
    assert not np.array_equal(validation, other_validation)
    assert [len(part) for part in split_train_validation(2, 0.4, seed=0)] == [1, 1]
    assert [len(part) for part in split_train_validation(1, 0.4, seed=0)] == [1, 0]
    assert [len(part) for part in split_train_validation(50, 0.0, seed=0)] == [50, 0]


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", lambda _step: 0.1),
        ("inverse_time", lambda step: 0.1 / (1 + 0.5 * step / 10)),
        ("exponential", lambda step: 0.1 * 0.5 ** (step / 10)),
        ("cosine", lambda step: 0.1 * 0.5 * (1 + math.cos(math.pi * min(step, 40) / 40))),
    ],
)
def test_schedules_give_the_documented_learning_rates(schedule, expected):
    spec = OptimizerSpec(learning_rate=0.1, schedule=schedule, decay_rate=0.5, decay_steps=10)
    learning_rate = build_learning_rate(spec, total_steps=40)
    for step in (0, 1, 7, 20, 39, 40):
        value = learning_rate if isinstance(learning_rate, float) else float(learning_rate(step))
        assert value == pytest.approx(expected(step), rel=1e-5, abs=1e-8), f"step {step}"
    if schedule == "cosine":
        assert float(learning_rate(40)) == 0.0


@pytest.mark.parametrize(
    ("optimizer_type", "keras_class"),
    [("adam", keras.optimizers.Adam), ("sgd", keras.optimizers.SGD), ("rmsprop", keras.optimizers.RMSprop)],
)
def test_optimizers_with_momentum_and_clipnorm(optimizer_type, keras_class):
    optimizer = build_optimizer(OptimizerSpec(type=optimizer_type, momentum=0.8, clipnorm=2.0), total_steps=10)
    assert type(optimizer) is keras_class
    assert optimizer.clipnorm == 2.0
    if optimizer_type != "adam":
        assert optimizer.momentum == pytest.approx(0.8)


def test_collapse_check_rejects_outputs_that_ignore_the_input_and_accepts_a_real_model():
    spec = _spec(architecture={"type": "dense", "hidden_units": [8], "latent_dim": 4})
    model = build_autoencoder(spec, (8, 8, 1))
    images = np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32)
    zeros = [np.zeros_like(weight) for weight in model.get_weights()]
    model.set_weights(zeros)  # outputs 0 everywhere
    with pytest.raises(TrainingFailed, match=r"collapsed to a constant image"):
        check_output_not_collapsed(model, images, images)
    output_bias = model.get_layer("decoder_output").bias
    output_bias.assign(np.random.default_rng(1).random(output_bias.shape, dtype=np.float32))  # a fixed image
    with pytest.raises(TrainingFailed, match=r"is the same image whatever the input"):
        check_output_not_collapsed(model, images, images)
    model.set_weights([np.random.default_rng(1).normal(0, 0.3, w.shape).astype(np.float32) for w in zeros])
    check_output_not_collapsed(model, images, images)


# ---------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------


def test_a_run_reports_every_epoch_and_learns(digits):
    reported: list[EpochMetrics] = []
    spec = _spec(optimizer={"learning_rate": 0.01, "schedule": "inverse_time", "decay_rate": 1.0, "decay_steps": 8})
    result = fit_autoencoder(spec, digits, hooks=TrainingHooks(on_epoch=reported.append))

    assert result.stop_reason == "completed" and result.epochs_completed == 3
    assert result.resumed_from_epoch is None and result.data is digits
    assert reported == result.history and [m.epoch for m in reported] == [1, 2, 3]
    assert all(m.epochs == 3 and m.images_per_s > 0 for m in reported)
    assert [m.eta_s for m in reported][-1] == 0.0 and reported[0].eta_s > 0
    elapsed = [m.elapsed_s for m in reported]
    assert elapsed == sorted(elapsed) and result.training_seconds >= elapsed[-1]
    for metrics in reported:  # the rate of the next step: lr0 / (1 + rate·step / decay_steps)
        step = metrics.epoch * STEPS_PER_EPOCH
        assert metrics.learning_rate == pytest.approx(0.01 / (1 + step / 8), rel=1e-5)
    assert reported[-1].val_loss < reported[0].val_loss
    assert reported[-1].loss < reported[0].loss
    assert int(result.model.optimizer.iterations) == 3 * STEPS_PER_EPOCH
    denoised = result.model.predict_on_batch(digits.test[:4])
    assert denoised.shape == (4, 8, 8, 1) and np.all(np.isfinite(denoised))


def test_cancelled_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(digits, tmp_path: Path):
    spec = _spec(optimizer={"schedule": "cosine"})
    checkpoint_dir = tmp_path / "checkpoint"
    cancel = {"requested": False}

    def cancel_after_first_epoch(metrics: EpochMetrics) -> None:
        cancel["requested"] = metrics.epoch >= 1

    first = fit_autoencoder(
        spec,
        digits,
        hooks=TrainingHooks(
            on_epoch=cancel_after_first_epoch, should_cancel=lambda: cancel["requested"], checkpoint_dir=checkpoint_dir
        ),
    )
    assert first.stop_reason == "cancelled" and first.epochs_completed == 1 and len(first.history) == 1
    state = json.loads((checkpoint_dir / CHECKPOINT_STATE_FILE).read_text())
    assert state["epoch"] == 1 and sorted(p.name for p in checkpoint_dir.iterdir()) == [
        "model-0001.keras",
        CHECKPOINT_STATE_FILE,
    ]

    resumed_epochs: list[int] = []
    resumed = fit_autoencoder(
        spec,
        digits,
        hooks=TrainingHooks(on_epoch=lambda m: resumed_epochs.append(m.epoch), checkpoint_dir=checkpoint_dir),
    )
    assert resumed.stop_reason == "completed" and resumed.resumed_from_epoch == 1
    assert resumed_epochs == [2, 3]
    assert [m.epoch for m in resumed.history] == [1, 2, 3] and resumed.history[0] == first.history[0]
    assert resumed.epochs_completed == 3
    # Optimizer state survived: its step counter and the cosine schedule continue where they were.
    assert int(resumed.model.optimizer.iterations) == 3 * STEPS_PER_EPOCH
    assert resumed.history[-1].learning_rate == pytest.approx(0.0, abs=1e-9)

    uninterrupted = fit_autoencoder(spec, digits)
    for one, other in zip(resumed.model.get_weights(), uninterrupted.model.get_weights(), strict=True):
        np.testing.assert_allclose(one, other, atol=1e-4)
    assert resumed.history[-1].val_loss == pytest.approx(uninterrupted.history[-1].val_loss, rel=1e-3)

    # A finished checkpoint resumes to the same kind of result without training again.
    again = fit_autoencoder(spec, digits, hooks=TrainingHooks(checkpoint_dir=checkpoint_dir))
    assert again.stop_reason == "completed" and again.resumed_from_epoch == 3 and len(again.history) == 3


def test_cancellation_stops_within_the_epoch(digits):
    polls = {"count": 0}

    def cancel_on_third_poll() -> bool:
        polls["count"] += 1
        return polls["count"] >= 3

    hooks = TrainingHooks(should_cancel=cancel_on_third_poll, cancel_poll_s=0.0)  # poll after every batch
    result = fit_autoencoder(_spec(), digits, hooks=hooks)
    assert result.stop_reason == "cancelled"
    assert result.epochs_completed == 0 and result.history == []
    # Polled at the epoch start, then after batches 1 and 2: two steps of the first epoch ran.
    assert int(result.model.optimizer.iterations) == 2 < STEPS_PER_EPOCH


def test_timeout_before_the_first_epoch_fails_with_a_reason(digits):
    with pytest.raises(TrainingFailed, match=r"before the first epoch finished \(max_runtime_s=0.001\)"):
        fit_autoencoder(_spec(max_runtime_s=0.001), digits)


class ScriptedValidationLoss(keras.callbacks.Callback):
    """Replaces each epoch's val_loss with the next scripted value (extra callbacks run before the run's own)."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = iter(values)

    @override
    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs["val_loss"] = next(self.values)


def test_early_stopping_restores_the_best_epoch(digits, tmp_path: Path):
    checkpoint_dir = tmp_path / "checkpoint"
    hooks = TrainingHooks(checkpoint_dir=checkpoint_dir, callbacks=[ScriptedValidationLoss([0.5, 0.4, 0.6, 0.7, 0.8])])
    result = fit_autoencoder(_spec(epochs=5, early_stopping_patience=1), digits, hooks=hooks)
    assert result.stop_reason == "early_stopped" and result.epochs_completed == 3
    assert [m.val_loss for m in result.history] == [0.5, 0.4, 0.6]
    best = keras.saving.load_model(checkpoint_dir / "model-0002.keras", safe_mode=True)
    for one, other in zip(result.model.get_weights(), best.get_weights(), strict=True):
        np.testing.assert_array_equal(one, other)


def test_nan_loss_fails_with_the_epoch_and_learning_rate(digits):
    spec = _spec(epochs=5, optimizer={"type": "sgd", "learning_rate": 10.0, "momentum": 0.9})
    finished: list[int] = []
    with pytest.raises(TrainingFailed) as failure:
        fit_autoencoder(spec, digits, hooks=TrainingHooks(on_epoch=lambda m: finished.append(m.epoch)))
    failed_epoch = len(finished) + 1  # the first epoch that did not finish
    assert failed_epoch <= 5
    expected = (
        rf"^(val_)?loss became (NaN|infinite) at epoch {failed_epoch}; lower the learning rate "
        r"\(received learning_rate=10\)"
    )
    assert re.search(expected, failure.value.message), failure.value.message


def test_data_is_loaded_from_the_spec_when_not_given():
    result = fit_autoencoder(_spec(epochs=1, max_train_images=64, architecture={"type": "dense", "hidden_units": [8]}))
    assert result.data.dataset_id == "digits" and result.data.image_shape == (8, 8, 1)
    assert result.history[0].images_per_s > 0


def test_a_spec_the_images_cannot_take_is_rejected_before_training(digits):
    with pytest.raises(InvalidSpec, match=r"filters"):
        fit_autoencoder(_spec(architecture={"type": "conv", "filters": [4, 4, 4, 4]}), digits)
