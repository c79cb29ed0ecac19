"""Autoencoder builders: structure, any-size conv models, regularizers attached, and .keras round trips."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from dae.errors import InvalidSpec
from dae.losses import build_loss
from dae.models import CropToReference, PadToMultiple, build_autoencoder, layers_in_group
from dae.regularizers import ElasticNet
from dae.spec import TrainingSpec
from dae.training import build_optimizer

CONV = {"type": "conv", "filters": [4, 8], "kernel_size": 3}
DENSE = {"type": "dense", "hidden_units": [16], "latent_dim": 4}


def _spec(**fields) -> TrainingSpec:
    return TrainingSpec.model_validate(fields)


def test_conv_model_is_fully_convolutional_with_a_code_layer():
    model = build_autoencoder(_spec(architecture={**CONV, "filters": [4, 8, 16]}), (16, 16, 3))
    assert tuple(model.input.shape) == (None, None, None, 3)
    strided = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D) and layer.strides == (2, 2)]
    strided = [layer for layer in strided if not isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [layer.filters for layer in strided] == [4, 8, 16]
    assert strided[-1].name == "code"
    transposed = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2DTranspose)]
    assert [layer.filters for layer in transposed] == [16, 8, 4]
    code = keras.Model(model.input, model.get_layer("code").output)
    assert code(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 2, 2, 16)


@pytest.mark.parametrize("size", [(8, 8), (11, 13), (4, 30)])
def test_conv_model_returns_the_input_size_for_any_image_size(size):
    model = build_autoencoder(_spec(architecture=CONV), (8, 8, 1))
    images = np.random.default_rng(0).random((2, *size, 1), dtype=np.float32)
    assert model(images).shape == (2, *size, 1)


def test_dense_model_shapes_and_code_width():
    model = build_autoencoder(_spec(architecture=DENSE), (8, 6, 2))
    assert tuple(model.input.shape) == (None, 8, 6, 2)
    assert model.get_layer("code").units == 4
    assert [layer.units for layer in model.layers if isinstance(layer, keras.layers.Dense)] == [16, 4, 16, 96]
    assert model(np.zeros((3, 8, 6, 2), np.float32)).shape == (3, 8, 6, 2)


def test_output_activation_is_the_last_layer():
    model = build_autoencoder(_spec(architecture={**CONV, "output_activation": "sigmoid"}), (8, 8, 1))
    assert model.layers[-1].name == "denoised"
    output = model(np.random.default_rng(1).normal(0, 5, (2, 8, 8, 1)).astype(np.float32)).numpy()
    assert output.min() > 0.0 and output.max() < 1.0


def test_pad_and_crop_shapes():
    assert PadToMultiple(4).compute_output_shape((None, 9, None, 1)) == (None, 12, None, 1)
    padded = PadToMultiple(4)(np.arange(30, dtype=np.float32).reshape(1, 5, 6, 1))
    assert padded.shape == (1, 8, 8, 1)
    # Reflection at the bottom/right: row 5 mirrors row 3.
    np.testing.assert_array_equal(padded[0, 5, :6, 0], np.arange(18, 24, dtype=np.float32))
    cropped = CropToReference()([padded, np.zeros((1, 5, 6, 1), np.float32)])
    np.testing.assert_array_equal(cropped, np.arange(30, dtype=np.float32).reshape(1, 5, 6, 1))
    with pytest.raises(ValueError, match=r"Received: multiple=0"):
        PadToMultiple(0)


def test_spec_regularizers_are_attached_to_their_groups():
    spec = _spec(
        architecture=CONV,
        regularization={
            "encoder": {"kernel": {"l1": 0.1, "l2": 0.2}, "activity": {"l1": 0.3}},
            "decoder": {"bias": {"l2": 0.4}, "activity": {"l2": 0.5}},
        },
    )
    model = build_autoencoder(spec, (8, 8, 1))
    encoder, decoder = layers_in_group(model, "encoder"), layers_in_group(model, "decoder")
    assert [layer.name for layer in encoder] == ["encoder_conv_1", "code"]
    assert [layer.name for layer in decoder] == ["decoder_deconv_1", "decoder_deconv_2", "decoder_output"]
    for layer in encoder:
        assert (layer.kernel_regularizer.l1, layer.kernel_regularizer.l2) == (0.1, 0.2)
        assert layer.bias_regularizer is None
    for layer in decoder:
        assert layer.kernel_regularizer is None
        assert (layer.bias_regularizer.l1, layer.bias_regularizer.l2) == (0.0, 0.4)
    assert model.get_layer("code").activity_regularizer.l1 == 0.3
    assert model.get_layer("encoder_conv_1").activity_regularizer is None
    assert model.get_layer("denoised").activity_regularizer.l2 == 0.5


def test_proximal_spec_builds_kernels_without_an_l1_penalty():
    spec = _spec(
        architecture=DENSE,
        regularization={"encoder": {"kernel": {"l1": 0.1, "l2": 0.2}}, "l1_method": "proximal"},
    )
    model = build_autoencoder(spec, (4, 4, 1))
    for layer in layers_in_group(model, "encoder"):
        assert isinstance(layer.kernel_regularizer, ElasticNet)
        assert (layer.kernel_regularizer.l1, layer.kernel_regularizer.l2) == (0.0, 0.2)


def test_specs_the_images_cannot_take_are_rejected():
    with pytest.raises(InvalidSpec, match=r"filters"):
        build_autoencoder(_spec(architecture={**CONV, "filters": [4, 4, 4, 4]}), (8, 8, 1))
    with pytest.raises(ValueError, match=r"Received: image_shape=\(8, 8\)"):
        build_autoencoder(_spec(), (8, 8))


ROUND_TRIP_SPECS = {
    "conv-mse-elastic-penalty": {
        "architecture": CONV,
        "loss": {"type": "mse"},
        "regularization": {
            "encoder": {"kernel": {"l1": 1e-3, "l2": 1e-3}, "bias": {"l1": 1e-4}, "activity": {"l1": 1e-4}},
            "decoder": {"kernel": {"l2": 1e-3}, "activity": {"l1": 1e-5, "l2": 1e-5}},
        },
        "optimizer": {"type": "adam", "schedule": "cosine", "clipnorm": 1.0},
    },
    "conv-huber-proximal": {
        "architecture": CONV,
        "loss": {"type": "huber", "delta": 0.1},
        "regularization": {"encoder": {"kernel": {"l1": 1e-3, "l2": 1e-4}}, "l1_method": "proximal"},
        "optimizer": {"type": "sgd", "schedule": "inverse_time"},
    },
    "dense-mae": {"architecture": DENSE, "loss": {"type": "mae"}, "optimizer": {"type": "rmsprop"}},
    "dense-l1_l2": {"architecture": DENSE, "loss": {"type": "l1_l2", "alpha": 0.3}},
    "dense-lp-exponential": {
        "architecture": DENSE,
        "loss": {"type": "lp", "p": 0.7, "epsilon": 1e-3},
        "optimizer": {"schedule": "exponential"},
    },
    "conv-bce-sigmoid": {
        "architecture": {**CONV, "output_activation": "sigmoid"},
        "loss": {"type": "binary_crossentropy"},
        "regularization": {"decoder": {"kernel": {"l1": 1e-3}, "bias": {"l1": 1e-3}}, "l1_method": "proximal"},
    },
}


@pytest.mark.parametrize("name", list(ROUND_TRIP_SPECS))
def test_compiled_model_round_trips_through_keras_file_in_safe_mode(name, tmp_path: Path):
    spec = TrainingSpec.model_validate(ROUND_TRIP_SPECS[name])
    model = build_autoencoder(spec, (8, 8, 1))
    loss = build_loss(spec.loss)
    model.compile(optimizer=build_optimizer(spec.optimizer, total_steps=100), loss=loss)
    images = np.random.default_rng(5).random((4, 8, 8, 1), dtype=np.float32)
    with tf.GradientTape() as tape:  # one eager step, so optimizer state exists and is saved
        value = model.compute_loss(x=images, y=images, y_pred=model(images, training=True))
    model.optimizer.apply(tape.gradient(value, model.trainable_variables), model.trainable_variables)
    path = tmp_path / "model.keras"
    model.save(path)

    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(restored(images), model(images), atol=1e-6)
    assert type(restored.loss) is type(loss)
    assert restored.loss.get_config() == loss.get_config()
    assert int(restored.optimizer.iterations) == 1
    for original, reloaded in zip(model.layers, restored.layers, strict=True):
        assert type(original) is type(reloaded)
        for attribute in ("kernel_regularizer", "bias_regularizer", "activity_regularizer"):
            before, after = getattr(original, attribute, None), getattr(reloaded, attribute, None)
            assert (before is None) == (after is None)
            if before is not None:
                assert type(after) is ElasticNet and after.get_config() == before.get_config()
    # Penalties (weights and activities) of an eager call are the same before and after the round trip.
    model(images)
    restored(images)
    assert sum(float(value) for value in restored.losses) == pytest.approx(
        sum(float(value) for value in model.losses), rel=1e-6
    )


def test_conv_model_exports_to_onnx_that_accepts_other_sizes(tmp_path: Path):
    import onnxruntime

    model = build_autoencoder(_spec(architecture=CONV), (8, 8, 1))
    model(np.zeros((1, 8, 8, 1), np.float32))  # Keras exports only a model that has been called
    path = tmp_path / "model.onnx"
    model.export(str(path), format="onnx", verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    for shape in [(2, 8, 8, 1), (1, 13, 10, 1)]:  # 13 and 10 need padding (reflect) and cropping
        images = np.random.default_rng(2).random(shape, dtype=np.float32)
        output = session.run(None, {input_name: images})[0]
        assert output.shape == shape
        np.testing.assert_allclose(output, model(images), atol=1e-5)
