"""Regularizers: penalty values, how the spec maps to them (penalty vs proximal L1), serialization."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from dae.models import build_autoencoder, layers_in_group
from dae.regularizers import ElasticNet, build_group_regularizers, build_regularizer
from dae.spec import PenaltySpec, RegularizationSpec, TrainingSpec

WEIGHTS = np.random.default_rng(3).normal(0.0, 0.5, (7, 5)).astype(np.float32)


@pytest.mark.parametrize(("l1", "l2"), [(0.01, 0.0), (0.0, 0.02), (0.03, 0.005)])
def test_elastic_net_penalty_value(l1, l2):
    expected = l1 * np.abs(WEIGHTS).sum() + l2 * np.square(WEIGHTS).sum()
    assert float(ElasticNet(l1=l1, l2=l2)(WEIGHTS)) == pytest.approx(float(expected), rel=1e-5)
    assert expected > 0


def test_elastic_net_rejects_negative_strengths():
    with pytest.raises(ValueError, match=r"Received: l1=-0.1"):
        ElasticNet(l1=-0.1)
    with pytest.raises(ValueError, match=r"Received: l2=nan"):
        ElasticNet(l2=float("nan"))


def test_elastic_net_config_round_trips():
    regularizer = ElasticNet(l1=0.25, l2=0.5)
    restored = keras.regularizers.deserialize(keras.regularizers.serialize(regularizer))
    assert isinstance(restored, ElasticNet)
    assert (restored.l1, restored.l2) == (0.25, 0.5)


def test_files_naming_the_former_elastic_net_class_load_it_as_keras_l1l2():
    # What a .keras file saved before ElasticNet became keras.regularizers.L1L2 holds for a regularizer.
    saved = {"module": "dae.regularizers", "class_name": "ElasticNet", "config": {"l1": 0.25, "l2": 0.5},
             "registered_name": "dae>ElasticNet"}  # fmt: skip
    restored = keras.regularizers.deserialize(saved)
    assert type(restored) is keras.regularizers.L1L2
    assert (restored.l1, restored.l2) == (0.25, 0.5)


def test_build_regularizer_returns_none_when_nothing_applies():
    assert build_regularizer(PenaltySpec()) is None
    assert build_regularizer(PenaltySpec(l1=0.1), include_l1=False) is None
    only_l2 = build_regularizer(PenaltySpec(l1=0.1, l2=0.2), include_l1=False)
    assert (only_l2.l1, only_l2.l2) == (0.0, 0.2)


def _regularization(l1_method: str) -> RegularizationSpec:
    penalty = {"l1": 0.1, "l2": 0.2}
    return RegularizationSpec.model_validate(
        {
            "encoder": {"kernel": penalty, "bias": penalty, "activity": penalty},
            "decoder": {"kernel": {"l1": 0.3}, "activity": {"l2": 0.4}},
            "l1_method": l1_method,
        }
    )


def test_penalty_method_keeps_every_l1():
    encoder = build_group_regularizers(_regularization("penalty"), "encoder")
    decoder = build_group_regularizers(_regularization("penalty"), "decoder")
    assert (encoder.kernel.l1, encoder.kernel.l2) == (0.1, 0.2)
    assert (encoder.bias.l1, encoder.bias.l2) == (0.1, 0.2)
    assert (encoder.activity.l1, encoder.activity.l2) == (0.1, 0.2)
    assert (decoder.kernel.l1, decoder.kernel.l2) == (0.3, 0.0)
    assert decoder.bias is None
    assert (decoder.activity.l1, decoder.activity.l2) == (0.0, 0.4)


def test_proximal_method_drops_weight_l1_but_keeps_activity_l1():
    encoder = build_group_regularizers(_regularization("proximal"), "encoder")
    decoder = build_group_regularizers(_regularization("proximal"), "decoder")
    assert (encoder.kernel.l1, encoder.kernel.l2) == (0.0, 0.2)
    assert (encoder.bias.l1, encoder.bias.l2) == (0.0, 0.2)
    assert (encoder.activity.l1, encoder.activity.l2) == (0.1, 0.2)
    assert decoder.kernel is None  # its only penalty was an L1, now applied by soft-thresholding
    with pytest.raises(ValueError, match=r"Received: group='middle'"):
        build_group_regularizers(_regularization("proximal"), "middle")


def test_model_losses_equal_the_numpy_penalties_of_the_spec():
    spec = TrainingSpec.model_validate(
        {
            "architecture": {"type": "dense", "hidden_units": [6], "latent_dim": 3},
            "regularization": {
                "encoder": {"kernel": {"l1": 0.01, "l2": 0.02}, "bias": {"l2": 0.5}, "activity": {"l1": 0.03}},
                "decoder": {"kernel": {"l2": 0.04}, "activity": {"l2": 0.05}},
            },
        }
    )
    model = build_autoencoder(spec, (4, 4, 1))
    for layer in model.layers:  # non-zero biases so the bias penalty is visible
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(np.full(layer.bias.shape, 0.1, dtype=np.float32))
    images = np.random.default_rng(0).random((3, 4, 4, 1), dtype=np.float32)
    output = model(images).numpy()
    code = keras.Model(model.input, model.get_layer("code").output)(images).numpy()

    expected = 0.0
    for layer in layers_in_group(model, "encoder"):
        kernel, bias = layer.kernel.numpy(), layer.bias.numpy()
        expected += 0.01 * np.abs(kernel).sum() + 0.02 * np.square(kernel).sum() + 0.5 * np.square(bias).sum()
    for layer in layers_in_group(model, "decoder"):
        expected += 0.04 * np.square(layer.kernel.numpy()).sum()
    # Keras divides activity penalties by the batch size: a per-image penalty.
    expected += 0.03 * np.abs(code).sum() / len(images) + 0.05 * np.square(output).sum() / len(images)

    total = sum(float(loss) for loss in model.losses)
    assert total == pytest.approx(float(expected), rel=1e-5)
    assert len(model.losses) == 2 * 2 + 2 + 2  # encoder kernel+bias ×2 layers, decoder kernels ×2, 2 activities
