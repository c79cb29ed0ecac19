"""U-Net and residual (DnCNN-style) denoisers: any size in and out, output = input − predicted noise, layer groups,
.keras round trips in safe mode, Keras and ONNX equal, and a short fit() that learns."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from dae import export
from dae.data import DatasetSplits, load_dataset
from dae.errors import ExportFailed, InvalidSpec
from dae.evaluation import sparsity_report
from dae.models import build_autoencoder, layers_in_group
from dae.proximal import proximal_targets
from dae.spec import TrainingSpec
from dae.training import DenoisingAutoencoder, build_training_model, fit_autoencoder

UNET = {"type": "unet", "filters": [4, 8, 8]}  # two poolings: padded to multiples of 4
UNET_BN = {"type": "unet", "filters": [4, 6], "convs_per_level": 1, "batch_norm": True, "skip_connections": False}
RESIDUAL = {"type": "residual", "filters": [6, 6, 6]}
RESIDUAL_BN = {"type": "residual", "filters": [6, 6, 6, 6], "batch_norm": True, "kernel_size": 5}
ARCHITECTURES = {"unet": UNET, "unet_bn": UNET_BN, "residual": RESIDUAL, "residual_bn": RESIDUAL_BN}
SIZES = [(8, 8), (28, 28), (30, 34), (64, 48), (5, 7)]


def _spec(architecture: dict, **fields) -> TrainingSpec:
    return TrainingSpec.model_validate({"architecture": architecture, **fields})


def _randomize_batch_norm(model: keras.Model, seed: int) -> None:
    """Non-trivial moving statistics and scales, as after training (fresh ones are the identity)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = (weight.shape for weight in layer.get_weights())
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma).astype(np.float32), rng.normal(0, 0.1, beta).astype(np.float32),
                rng.normal(0, 0.2, mean).astype(np.float32), rng.uniform(0.5, 2.0, variance).astype(np.float32),
            ])


@pytest.fixture(scope="module")
def models() -> dict[str, keras.Model]:
    built = {}
    for index, (name, architecture) in enumerate(ARCHITECTURES.items()):
        keras.utils.set_random_seed(index)
        built[name] = build_autoencoder(_spec(architecture), (8, 8, 1))
        _randomize_batch_norm(built[name], index)
    return built


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_any_size_in_gives_the_same_size_out(models, name):
    model = models[name]
    assert tuple(model.input.shape) == (None, None, None, 1)
    rng = np.random.default_rng(0)
    for size in SIZES:
        images = rng.random((2, *size, 1), dtype=np.float32)
        output = keras.ops.convert_to_numpy(model(images))
        assert output.shape == images.shape and np.isfinite(output).all()


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_output_is_the_input_minus_the_predicted_noise(models, name):
    model = models[name]
    assert model.layers[-1].name == "denoised" and model.get_layer("subtract_noise") is not None
    images = np.random.default_rng(1).random((3, 30, 34, 1), dtype=np.float32)
    noise_layer = model.get_layer("crop_to_input" if "unet" in name else "decoder_noise")
    noise = keras.ops.convert_to_numpy(keras.Model(model.input, noise_layer.output)(images))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)), images - noise, atol=1e-6)
    # A network whose noise prediction is zero is the identity.
    kernel, bias = model.get_layer("decoder_noise").get_weights()
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.get_layer("decoder_noise").set_weights([np.zeros_like(kernel), np.zeros_like(bias)])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(clone(images)), images)


def test_unet_structure_levels_skips_and_padding():
    model = build_autoencoder(_spec({**UNET, "filters": [4, 8, 16]}), (16, 16, 3))
    assert model.get_layer("pad_to_multiple").multiple == 4
    pools = [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert pools == ["encoder_pool_2", "encoder_pool_3"]
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Concatenate)] == [
        "decoder_skip_2", "decoder_skip_1"
    ]
    code = keras.Model(model.input, model.get_layer("code").output)
    assert code(np.zeros((1, 16, 16, 3), np.float32)).shape == (1, 4, 4, 16)  # the bottleneck
    assert model.get_layer("decoder_skip_1").output.shape[-1] == 8  # 4 upsampled + 4 from the encoder
    no_skips = build_autoencoder(_spec({**UNET, "skip_connections": False}), (16, 16, 3))
    assert not [layer for layer in no_skips.layers if isinstance(layer, keras.layers.Concatenate)]
    assert model.count_params() > no_skips.count_params()
    one_level = build_autoencoder(_spec({"type": "unet", "filters": [4]}), (5, 5, 1))
    assert one_level.get_layer("pad_to_multiple").multiple == 1


def test_residual_structure_stays_at_full_resolution_with_batch_norm_after_the_first_convolution():
    model = build_autoencoder(_spec(RESIDUAL_BN), (8, 8, 2))
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert [layer.strides for layer in convs] == [(1, 1)] * 5 and [layer.filters for layer in convs] == [6] * 4 + [2]
    assert [layer.use_bias for layer in convs] == [True, False, False, False, True]
    assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)] == [
        "encoder_bn_2", "decoder_bn_3", "decoder_bn_4"
    ]
    assert isinstance(model.get_layer("code"), keras.layers.Activation)  # after the normalisation
    assert not any(isinstance(layer, keras.layers.MaxPooling2D) for layer in model.layers)


@pytest.mark.parametrize(
    ("architecture", "encoder", "decoder"),
    [
        (
            {"type": "unet", "filters": [4, 8], "convs_per_level": 2},
            ["encoder_conv_1_1", "encoder_conv_1_2", "encoder_conv_2_1", "code"],
            ["decoder_up_1", "decoder_conv_1_1", "decoder_conv_1_2", "decoder_noise"],
        ),
        (
            {"type": "unet", "filters": [4, 8], "convs_per_level": 1, "batch_norm": True},
            ["encoder_conv_1_1", "encoder_conv_2_1", "encoder_bn_2_1"],
            ["decoder_up_1", "decoder_conv_1_1", "decoder_bn_1_1", "decoder_noise"],
        ),
        (
            {"type": "residual", "filters": [4, 4, 4, 4, 4]},  # ceil(5/2) = 3 hidden convolutions in the encoder
            ["encoder_conv_1", "encoder_conv_2", "code"],
            ["decoder_conv_4", "decoder_conv_5", "decoder_noise"],
        ),
        ({"type": "residual", "filters": [4]}, ["code"], ["decoder_noise"]),
    ],
)
def test_regularizer_groups_cover_the_documented_layers(architecture, encoder, decoder):
    spec = _spec(
        architecture,
        regularization={
            "encoder": {"kernel": {"l1": 0.1}, "bias": {"l2": 0.2}, "activity": {"l1": 0.3}},
            "decoder": {"kernel": {"l2": 0.4}, "activity": {"l2": 0.5}},
        },
    )
    model = build_autoencoder(spec, (8, 8, 1))
    assert [layer.name for layer in layers_in_group(model, "encoder")] == encoder
    assert [layer.name for layer in layers_in_group(model, "decoder")] == decoder
    for group, strengths in (("encoder", {"l1": 0.1, "l2": 0.0}), ("decoder", {"l1": 0.0, "l2": 0.4})):
        for layer in layers_in_group(model, group):
            if isinstance(layer, keras.layers.Conv2D):
                assert layer.kernel_regularizer.get_config() == strengths, layer.name
    assert model.get_layer("code").activity_regularizer.get_config() == {"l1": 0.3, "l2": 0.0}
    assert model.get_layer("denoised").activity_regularizer.get_config() == {"l1": 0.0, "l2": 0.5}
    every_weighted = {layer.name for layer in model.layers if layer.weights}
    assert every_weighted == set(encoder) | set(decoder)  # every layer with weights is in exactly one group


def test_proximal_l1_and_the_sparsity_report_work_with_batch_norm():
    spec = _spec(RESIDUAL_BN, regularization={"encoder": {"kernel": {"l1": 0.1}}, "l1_method": "proximal"})
    model = build_autoencoder(spec, (8, 8, 1))
    targets = proximal_targets(model, spec.regularization)
    assert len(targets) == 2  # the kernels of encoder_conv_1 and encoder_conv_2 (batch norms have none)
    report = sparsity_report(model, np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32))
    assert [layer.layer for layer in report.layers] == ["encoder_conv_1", "encoder_conv_2", "decoder_conv_3",
                                                          "decoder_conv_4", "decoder_noise"]
    assert 0.0 <= report.code_zero_fraction <= 1.0


@pytest.mark.parametrize("name", ["unet", "residual_bn"])
def test_round_trip_through_a_keras_file_in_safe_mode(models, name, tmp_path: Path):
    network = models[name]
    model = DenoisingAutoencoder(inputs=network.input, outputs=network.output, name=network.name)
    path = tmp_path / "model.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert type(restored) is DenoisingAutoencoder
    images = np.random.default_rng(3).random((2, 30, 34, 1), dtype=np.float32)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(restored(images)), keras.ops.convert_to_numpy(model(images)))
    assert [layer.name for layer in restored.layers] == [layer.name for layer in model.layers]


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_onnx_export_equals_keras_at_every_size(models, name, tmp_path: Path):
    model = models[name]
    path = tmp_path / f"{name}.onnx"
    real = load_dataset("digits").test[:8]
    assert export.export_onnx(model, path, real_images=real) <= 1e-5
    dims = export.onnx_session(path).get_inputs()[0].shape
    assert [isinstance(dim, int) for dim in dims] == [False, False, False, True]
    predict = export.onnx_predictor(path)
    rng = np.random.default_rng(4)
    for size in SIZES:
        images = rng.random((2, *size, 1), dtype=np.float32)
        np.testing.assert_allclose(predict(images), keras.ops.convert_to_numpy(model(images)), atol=1e-5)


@pytest.mark.parametrize(
    "architecture",
    [{"type": "unet", "filters": [8, 16], "convs_per_level": 1}, {"type": "residual", "filters": [8, 8, 8],
                                                                  "batch_norm": True}],
)
def test_a_short_fit_lowers_the_loss(architecture):
    full = load_dataset("digits")
    data = DatasetSplits(full.dataset_id, full.train[:256], full.test[:32], full.fingerprint)
    spec = TrainingSpec.model_validate({
        "dataset": "digits", "architecture": architecture, "noise": {"level": [0.1, 0.4]}, "epochs": 3,
        "batch_size": 32, "optimizer": {"learning_rate": 3e-3},
    })
    result = fit_autoencoder(spec, data)
    losses = [epoch.loss for epoch in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result.history[-1].val_loss is not None and result.history[-1].val_loss < result.history[0].val_loss


def test_build_training_model_keeps_the_architecture():
    model = build_training_model(_spec(UNET), (8, 8, 1))
    assert isinstance(model, DenoisingAutoencoder) and model.get_layer("subtract_noise") is not None


def test_spec_limits_and_properties_of_the_new_architectures():
    assert _spec({"type": "unet", "filters": [4, 8, 16]}).architecture.downsampling_factor == 4
    assert _spec({"type": "unet", "filters": [4]}).architecture.downsampling_factor == 1
    assert _spec(RESIDUAL).architecture.downsampling_factor == 1
    assert _spec({"type": "conv", "filters": [4, 8]}).architecture.downsampling_factor == 4
    assert [_spec({"type": kind}).architecture.is_fully_convolutional for kind in ("dense", "conv", "unet", "residual")
            ] == [False, True, True, True]
    assert len(_spec({"type": "residual", "filters": [4] * 20}).architecture.filters) == 20
    for architecture, fragment in [
        ({"type": "residual", "filters": [4] * 21}, "at most 20 items"),
        ({"type": "unet", "filters": [4] * 7}, "Expected at most 6 entries. Received: filters="),
        ({"type": "conv", "filters": [4] * 7}, "Expected at most 6 entries. Received: filters="),
        ({"type": "unet", "output_activation": "sigmoid"}, "Expected output_activation='linear'"),
        ({"type": "residual", "output_activation": "sigmoid"}, "Received: output_activation='sigmoid'"),
        ({"type": "unet", "convs_per_level": 5}, "less than or equal to 4"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            _spec(architecture)
    with pytest.raises(InvalidSpec, match=r"Expected at most 4 levels for this dataset. Received: filters=\[4, 4, 4, 4, 4\]"):
        build_autoencoder(_spec({"type": "unet", "filters": [4] * 5}), (8, 8, 1))
    build_autoencoder(_spec({"type": "unet", "filters": [4] * 4}), (8, 8, 1))  # 3 poolings: 8 -> 1


def test_a_blind_unet_is_published_as_a_fully_convolutional_model_with_the_range_on_its_card(store_dir: Path):
    from core.store import ModelStore, model_id_for_job  # noqa: PLC0415 - only this test publishes
    from dae.publish import publish_training_result  # noqa: PLC0415
    from dae.training import TrainingResult  # noqa: PLC0415

    digits = load_dataset("digits")
    spec = TrainingSpec.model_validate({
        "dataset": "digits", "architecture": {"type": "unet", "filters": [4, 8], "batch_norm": True},
        "noise": {"level": [0.1, 0.4]}, "epochs": 1,
    })
    keras.utils.set_random_seed(0)
    model = build_training_model(spec, digits.image_shape)
    _randomize_batch_norm(model, 0)
    result = TrainingResult(model=model, history=[], stop_reason="completed", epochs_completed=1,
                            resumed_from_epoch=None, training_seconds=1.0, data=digits)
    card = publish_training_result(result, spec, ModelStore(store_dir), model_id=model_id_for_job("j_0123456789abcd16"))
    assert card.input_shape == [None, None, 1] and card.parameters == model.count_params()
    assert card.onnx_max_abs_diff is not None and card.onnx_max_abs_diff <= 1e-5
    assert (card.trained_noise.min_level, card.trained_noise.max_level, card.trained_noise.blind) == (0.1, 0.4, True)
    model_rows = [row.noise for row in card.evaluation if row.method == "model"]
    assert model_rows == ["gaussian:0.1", "gaussian:0.2", "gaussian:0.25", "gaussian:0.3", "gaussian:0.4",
                          "gaussian:0.5"]
    stored = json.loads((store_dir / "models" / card.id / "card.json").read_text())
    assert stored["trained_noise"]["blind"] is True and stored["spec"]["noise"]["level"] == [0.1, 0.4]


@pytest.mark.parametrize(
    "architecture", [{"type": "unet", "filters": [1024] * 6, "kernel_size": 11}, {"type": "residual", "filters": [1024] * 20}]
)
def test_oversized_new_architectures_are_refused_at_submission(architecture):
    from dae.cost import DEFAULT_MAX_MODEL_PARAMS, DEFAULT_MAX_TRAINING_MEMORY_MIB, check_job_cost  # noqa: PLC0415

    limits = {"max_params": DEFAULT_MAX_MODEL_PARAMS, "max_training_memory_mib": DEFAULT_MAX_TRAINING_MEMORY_MIB}
    with pytest.raises(InvalidSpec, match=r"Expected at most 50,000,000 parameters .* Lower architecture.filters"):
        check_job_cost(_spec(architecture), (32, 32, 1), **limits)
    check_job_cost(_spec({"type": architecture["type"]}, noise={"level": [0.05, 0.5]}), (28, 28, 1), **limits)


class _ConverterWithWrongRank:
    """model.export as tf2onnx 1.17 sometimes behaves: the first `wrong` conversions write a graph with the wrong
    output shape (here flattened; tf2onnx's transpose optimizer adds a leading axis), later ones the real export."""

    def __init__(self, model: keras.Model, wrong: int, tmp_path: Path):
        inputs = keras.Input((None, None, 1))
        flattened = keras.layers.Reshape((-1,))(model(inputs))  # any graph whose output shape differs will do
        bad = keras.Model(inputs, flattened)
        bad(np.zeros((1, 8, 8, 1), np.float32))
        self.bad_path = tmp_path / "wrong-rank.onnx"
        bad.export(str(self.bad_path), format="onnx", verbose=False)
        self.real_export = model.export
        self.wrong = wrong
        self.calls = 0

    def __call__(self, filepath: str, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.wrong:
            Path(filepath).write_bytes(self.bad_path.read_bytes())
        else:
            self.real_export(filepath, **kwargs)


def test_a_wrong_output_shape_is_converted_again(models, tmp_path: Path, monkeypatch):
    model = models["residual"]
    converter = _ConverterWithWrongRank(model, wrong=export.CONVERSION_ATTEMPTS - 1, tmp_path=tmp_path)
    monkeypatch.setattr(model, "export", converter)
    path = tmp_path / "residual.onnx"
    assert export.export_onnx(model, path, real_images=load_dataset("digits").test[:8]) <= 1e-5
    assert converter.calls == export.CONVERSION_ATTEMPTS
    images = np.random.default_rng(5).random((2, 10, 14, 1), dtype=np.float32)
    np.testing.assert_allclose(export.onnx_predictor(path)(images), keras.ops.convert_to_numpy(model(images)),
                               atol=1e-5)


def test_a_wrong_output_shape_every_time_fails_the_export_and_leaves_no_file(models, tmp_path: Path, monkeypatch):
    model = models["residual"]
    converter = _ConverterWithWrongRank(model, wrong=export.CONVERSION_ATTEMPTS, tmp_path=tmp_path)
    monkeypatch.setattr(model, "export", converter)
    path = tmp_path / "residual.onnx"
    with pytest.raises(ExportFailed, match="disagree on the output shape"):
        export.export_onnx(model, path, real_images=load_dataset("digits").test[:8])
    assert converter.calls == export.CONVERSION_ATTEMPTS and not path.exists()
