"""Reconstruction losses against NumPy references, their validation and their serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from pydantic import ValidationError

from dae.losses import (
    BinaryCrossentropyLoss,
    HuberLoss,
    L1L2Loss,
    L1Loss,
    L2Loss,
    LpLoss,
    build_loss,
)
from dae.spec import LossSpec, TrainingSpec

RNG = np.random.default_rng(42)
Y_TRUE = RNG.random((5, 6, 7, 2), dtype=np.float32)
# Errors on both sides of 0 and of the Huber deltas used below.
Y_PRED = (Y_TRUE + RNG.normal(0.0, 0.6, Y_TRUE.shape)).astype(np.float32)
ERROR = Y_PRED.astype(np.float64) - Y_TRUE.astype(np.float64)


def _huber_reference(error: np.ndarray, delta: float) -> float:
    absolute = np.abs(error)
    return float(np.mean(np.where(absolute <= delta, 0.5 * error**2, delta * (absolute - 0.5 * delta))))


REFERENCES = [
    (L1Loss(), float(np.mean(np.abs(ERROR)))),
    (L2Loss(), float(np.mean(ERROR**2))),
    (HuberLoss(delta=0.3), _huber_reference(ERROR, 0.3)),
    (HuberLoss(delta=1.0), _huber_reference(ERROR, 1.0)),
    (L1L2Loss(alpha=0.25), float(0.25 * np.mean(np.abs(ERROR)) + 0.75 * np.mean(ERROR**2))),
    (LpLoss(p=0.5, epsilon=1e-3), float(np.mean((ERROR**2 + 1e-6) ** 0.25))),
    (LpLoss(p=1.5, epsilon=1e-6), float(np.mean((ERROR**2 + 1e-12) ** 0.75))),
    (LpLoss(p=2.0, epsilon=1e-2), float(np.mean(ERROR**2 + 1e-4))),
]


@pytest.mark.parametrize(("loss", "expected"), REFERENCES, ids=lambda value: getattr(value, "name", ""))
def test_loss_matches_numpy_reference(loss, expected):
    value = float(loss(Y_TRUE, Y_PRED))
    assert value == pytest.approx(expected, rel=1e-5)
    assert expected > 0.01  # the reference is not trivially zero


def test_losses_average_per_image_then_over_the_batch():
    per_image = L1Loss(reduction=None)(Y_TRUE, Y_PRED).numpy()
    assert per_image.shape == (5,)
    np.testing.assert_allclose(per_image, np.mean(np.abs(ERROR), axis=(1, 2, 3)), rtol=1e-5)


def test_binary_crossentropy_matches_numpy_on_probabilities():
    probabilities = np.clip(Y_PRED, 0.05, 0.95)
    expected = np.mean(-(Y_TRUE * np.log(probabilities) + (1 - Y_TRUE) * np.log(1 - probabilities)))
    assert float(BinaryCrossentropyLoss()(Y_TRUE, probabilities)) == pytest.approx(float(expected), rel=1e-4)


def test_binary_crossentropy_on_a_sigmoid_output_uses_the_logits():
    # A saturated sigmoid: computed from probabilities the loss would be clipped near -log(1e-7) = 16.1.
    logits = tf.constant(np.full((2, 4, 4, 1), 40.0, dtype=np.float32))
    target = np.zeros((2, 4, 4, 1), dtype=np.float32)
    value = float(BinaryCrossentropyLoss()(target, keras.activations.sigmoid(logits)))
    assert value == pytest.approx(40.0, rel=1e-4)


def test_lp_gradient_is_finite_at_zero_error_even_below_p_one():
    y_pred = tf.Variable(Y_TRUE)
    with tf.GradientTape() as tape:
        value = LpLoss(p=0.5, epsilon=1e-6)(Y_TRUE, y_pred)
    gradient = tape.gradient(value, y_pred).numpy()
    assert np.all(np.isfinite(gradient)) and np.all(gradient == 0.0)


def test_l1_is_never_negative():
    # No signed "L1": predicting far above the target costs, it never pays.
    assert float(L1Loss()(Y_TRUE, Y_TRUE + 100.0)) == pytest.approx(100.0, rel=1e-5)


@pytest.mark.parametrize(
    ("loss_spec", "loss_class", "parameters"),
    [
        (LossSpec(type="mae"), L1Loss, {}),
        (LossSpec(type="mse"), L2Loss, {}),
        (LossSpec(type="huber", delta=0.2), HuberLoss, {"delta": 0.2}),
        (LossSpec(type="l1_l2", alpha=0.7), L1L2Loss, {"alpha": 0.7}),
        (LossSpec(type="lp", p=0.8, epsilon=1e-4), LpLoss, {"p": 0.8, "epsilon": 1e-4}),
        (LossSpec(type="binary_crossentropy"), BinaryCrossentropyLoss, {}),
    ],
)
def test_build_loss_maps_every_spec_type(loss_spec, loss_class, parameters):
    loss = build_loss(loss_spec)
    assert type(loss) is loss_class
    config = loss.get_config()
    for key, value in parameters.items():
        assert config[key] == pytest.approx(value)


@pytest.mark.parametrize(
    ("make_loss", "message"),
    [
        (lambda: HuberLoss(delta=0.0), r"Received: delta=0.0"),
        (lambda: L1L2Loss(alpha=1.5), r"Received: alpha=1.5"),
        (lambda: LpLoss(p=0.0), r"Received: p=0.0"),
        (lambda: LpLoss(p=2.5), r"Received: p=2.5"),
        (lambda: LpLoss(epsilon=0.0), r"Received: epsilon=0.0"),
    ],
)
def test_invalid_loss_parameters_are_rejected_with_the_received_value(make_loss, message):
    with pytest.raises(ValueError, match=message):
        make_loss()


@pytest.mark.parametrize("loss", [loss for loss, _ in REFERENCES] + [BinaryCrossentropyLoss()], ids=lambda x: x.name)
def test_loss_config_round_trips(loss):
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    assert float(restored(Y_TRUE, np.clip(Y_PRED, 0.01, 0.99))) == pytest.approx(
        float(loss(Y_TRUE, np.clip(Y_PRED, 0.01, 0.99))), rel=1e-6
    )


def test_cross_entropy_needs_a_sigmoid_output():
    with pytest.raises(ValidationError, match=r"Received: output_activation='linear'"):
        TrainingSpec.model_validate({"loss": {"type": "binary_crossentropy"}})
    sigmoid = TrainingSpec.model_validate(
        {"loss": {"type": "binary_crossentropy"}, "architecture": {"type": "conv", "output_activation": "sigmoid"}}
    )
    assert sigmoid.loss.type == "binary_crossentropy"
