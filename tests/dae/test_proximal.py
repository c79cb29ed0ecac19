"""Proximal L1: the soft-threshold, its targets, one exact train step, and the seeds' sparsity experiment."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from dae.data import load_dataset
from dae.models import build_autoencoder, layers_in_group
from dae.proximal import ProximalL1Step, ProximalTarget, proximal_targets, soft_threshold
from dae.spec import TrainingSpec
from dae.training import DenoisingAutoencoder, build_training_model, compile_for_training, fit_autoencoder

DENSE = {"type": "dense", "hidden_units": [16], "latent_dim": 8}


def test_soft_threshold_matches_numpy():
    values = np.array([-1.0, -0.3, -0.1, 0.0, 0.05, 0.2, 0.7], dtype=np.float32)
    expected = np.sign(values) * np.maximum(np.abs(values) - 0.2, 0.0)
    np.testing.assert_allclose(soft_threshold(values, 0.2), expected, atol=1e-7)
    assert np.count_nonzero(np.asarray(soft_threshold(values, 0.2))) == 3


def _spec(regularization: dict, **fields) -> TrainingSpec:
    return TrainingSpec.model_validate({"architecture": DENSE, "regularization": regularization, **fields})


def test_targets_are_the_weights_whose_group_has_an_l1_in_proximal_mode():
    regularization = {"encoder": {"kernel": {"l1": 0.1}}, "decoder": {"bias": {"l1": 0.2}}, "l1_method": "proximal"}
    spec = _spec(regularization)
    model = build_autoencoder(spec, (4, 4, 1))
    targets = proximal_targets(model, spec.regularization)
    encoder_kernels = [layer.kernel.path for layer in layers_in_group(model, "encoder")]
    decoder_biases = [layer.bias.path for layer in layers_in_group(model, "decoder")]
    assert [(target.variable.path, target.strength) for target in targets] == [
        *((path, 0.1) for path in encoder_kernels),
        *((path, 0.2) for path in decoder_biases),
    ]
    penalty_spec = _spec({**regularization, "l1_method": "penalty"})
    assert proximal_targets(model, penalty_spec.regularization) == []
    assert not ProximalL1Step.for_model(model, penalty_spec.regularization)


def test_train_step_is_an_sgd_step_followed_by_soft_thresholding_with_the_scheduled_rate():
    strength = 0.05
    spec = _spec(
        {"encoder": {"kernel": {"l1": strength}}, "l1_method": "proximal"},
        optimizer={
            "type": "sgd",
            "momentum": 0.0,
            "learning_rate": 0.5,
            "schedule": "inverse_time",
            "decay_rate": 1.0,
            "decay_steps": 1,
        },
    )
    keras.utils.set_random_seed(0)
    model = build_training_model(spec, (4, 4, 1))
    compile_for_training(model, spec, total_steps=10)
    rng = np.random.default_rng(0)
    clean = rng.random((8, 4, 4, 1), dtype=np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    encoder_kernels = {layer.kernel.path for layer in layers_in_group(model, "encoder")}

    for step, learning_rate in enumerate([0.5, 0.5 / (1 + 1.0)]):  # lr0 / (1 + rate·step / decay_steps)
        variables = model.trainable_variables
        before = [variable.numpy() for variable in variables]
        with tf.GradientTape() as tape:
            loss = model.compute_loss(x=noisy, y=clean, y_pred=model(noisy, training=True))
        gradients = [gradient.numpy() for gradient in tape.gradient(loss, variables)]
        model.train_on_batch(noisy, clean)  # fit()'s train_step, on one batch
        for variable, weight, gradient in zip(variables, before, gradients, strict=True):
            expected = weight - learning_rate * gradient
            if variable.path in encoder_kernels:
                expected = np.sign(expected) * np.maximum(np.abs(expected) - learning_rate * strength, 0.0)
            np.testing.assert_allclose(variable.numpy(), expected, atol=1e-6, err_msg=f"step {step} {variable.path}")
    # Thresholds of 0.025 then 0.0125 put some of the 128 code weights (Glorot-uniform within ±0.5) exactly at 0.
    assert np.count_nonzero(model.get_layer("code").kernel.numpy() == 0.0) >= 1


def _zero_fraction(model) -> float:
    kernels = [layer.kernel.numpy() for group in ("encoder", "decoder") for layer in layers_in_group(model, group)]
    return float(sum(np.count_nonzero(kernel == 0.0) for kernel in kernels) / sum(kernel.size for kernel in kernels))


def test_seeds_experiment_proximal_l1_gives_exact_zeros_and_the_penalty_does_not():
    """Same λ, same data, same seed: only the proximal step leaves kernel weights exactly at 0.

    Plain SGD (no momentum), so both methods minimise the same L1-regularised objective: the penalty by
    subgradient steps, the proximal method by soft-thresholding. (Momentum would amplify the penalty's constant
    pull by 1/(1 - momentum) but not the threshold; Adam rescales the penalty's pull but not the threshold.)
    Calibration (1,500 digits, 3 epochs, batch 16, lr 1.0): l1=3e-4 left 23% of the kernel weights exactly 0
    with the proximal step, l1=1e-3 92%; the penalty left 0.0% at both, and both models stayed usable.
    """
    data = load_dataset("digits")
    strength = 5e-4
    fractions = {}
    for method in ("penalty", "proximal"):
        spec = TrainingSpec.model_validate(
            {
                "dataset": "digits",
                "architecture": {"type": "dense", "hidden_units": [], "latent_dim": 32},
                "regularization": {
                    "encoder": {"kernel": {"l1": strength}},
                    "decoder": {"kernel": {"l1": strength}},
                    "l1_method": method,
                },
                "optimizer": {"type": "sgd", "learning_rate": 1.0, "momentum": 0.0, "schedule": "constant"},
                "noise": {"level": 0.2},
                "epochs": 3,
                "batch_size": 16,
            }
        )
        result = fit_autoencoder(spec, data)  # also checks the model did not collapse
        fractions[method] = _zero_fraction(result.model)
    print(
        f"exactly-zero kernel weights at l1={strength}: penalty {fractions['penalty']:.4f}, "
        f"proximal {fractions['proximal']:.4f}"
    )
    assert fractions["proximal"] > 0.3
    assert fractions["penalty"] < 0.01


@pytest.mark.parametrize("learning_rate", [0.1, 0.01])
def test_proximal_step_applies_threshold_eta_times_lambda(learning_rate):
    values = np.array([0.5, -0.02, 0.004, -0.3], dtype=np.float32)
    variable = keras.Variable(values)
    ProximalL1Step([ProximalTarget(variable, 0.2)])(learning_rate)
    expected = np.sign(values) * np.maximum(np.abs(values) - learning_rate * 0.2, 0)
    np.testing.assert_allclose(variable.numpy(), expected, atol=1e-7)


def test_a_saved_model_reloads_in_safe_mode_and_trains_on_with_the_same_proximal_step(tmp_path):
    spec = _spec(
        {"encoder": {"kernel": {"l1": 0.05}}, "l1_method": "proximal"},
        optimizer={"type": "sgd", "momentum": 0.0, "learning_rate": 0.5, "schedule": "constant"},
    )
    keras.utils.set_random_seed(0)
    model = build_training_model(spec, (4, 4, 1))
    compile_for_training(model, spec, total_steps=10)
    rng = np.random.default_rng(1)
    clean = rng.random((8, 4, 4, 1), dtype=np.float32)
    noisy = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    model.train_on_batch(noisy, clean)
    model.save(tmp_path / "model.keras")
    model.train_on_batch(noisy, clean)

    restored = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True)
    assert type(restored) is DenoisingAutoencoder and restored.proximal_step is None  # the spec attaches it
    restored.attach_proximal_step(ProximalL1Step.for_model(restored, spec.regularization))
    restored.train_on_batch(noisy, clean)
    assert int(restored.optimizer.iterations) == 2
    for one, other in zip(restored.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(one, other, atol=1e-6)
    assert np.count_nonzero(restored.get_layer("code").kernel.numpy() == 0.0) >= 1
