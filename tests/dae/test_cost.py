"""Job cost: parameters equal the real Keras model's, activations follow its layers, limits refuse oversized jobs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from dae.cost import (
    DEFAULT_MAX_MODEL_PARAMS,
    DEFAULT_MAX_TRAINING_MEMORY_MIB,
    MIB,
    JobCost,
    check_job_cost,
    estimate_job_cost,
)
from dae.data import BUILTIN_DATASETS
from dae.errors import InvalidSpec
from dae.spec import TrainingSpec
from service.errors import status_of

FASHION = (28, 28, 1)
DEFAULT_LIMITS = {"max_params": DEFAULT_MAX_MODEL_PARAMS, "max_training_memory_mib": DEFAULT_MAX_TRAINING_MEMORY_MIB}
HUGE_DENSE = {"architecture": {"type": "dense", "hidden_units": [8192] * 8}, "max_train_images": None}
HUGE_CONV = {
    "architecture": {"type": "conv", "filters": [1024] * 4, "kernel_size": 11}, "batch_size": 4096, "max_train_images": None,
}


def _spec(**fields) -> TrainingSpec:
    return TrainingSpec.model_validate(fields)


#: The conv DAE that was the default job before issue 16 (its numbers below are pinned on purpose), on all images.
CONV_JOB = {"architecture": {"type": "conv"}, "max_train_images": None}


def _layer_output_values(model, image_shape: tuple[int, int, int]) -> int:
    """Σ over model.layers (input layer included) of each layer's output size for one image, run for real."""
    import keras  # noqa: PLC0415 - only these tests need Keras

    probe = keras.Model(model.inputs, [layer.output for layer in model.layers])
    outputs = probe([np.zeros((1, *image_shape), np.float32)])
    return sum(int(np.prod(output.shape)) for output in outputs)


ARCHITECTURES = [
    ({"type": "dense", "hidden_units": [16], "latent_dim": 4}, (28, 28, 1)),
    ({"type": "dense", "hidden_units": [], "latent_dim": 7}, (8, 8, 1)),
    ({"type": "dense", "hidden_units": [33, 17, 9], "latent_dim": 5}, (7, 9, 3)),
    ({"type": "dense"}, (28, 28, 1)),
    ({"type": "conv"}, (28, 28, 1)),  # default: [32, 64], kernel 3; 28 is a multiple of 4 (no padding)
    ({"type": "conv", "filters": [4, 8, 16], "kernel_size": 3}, (28, 28, 1)),  # padded to 32
    ({"type": "conv", "filters": [3], "kernel_size": 1}, (9, 9, 3)),
    ({"type": "conv", "filters": [5, 7], "kernel_size": 5}, (13, 17, 3)),  # odd sizes, padded to 16x20
    ({"type": "conv", "filters": [2, 3, 4, 5], "kernel_size": 7}, (16, 21, 1)),
    ({"type": "conv", "filters": [6, 2], "kernel_size": 11}, (8, 8, 1)),
    ({"type": "unet"}, (28, 28, 1)),  # default filters [16, 32, 64]: two poolings, 2 convolutions per level
    ({"type": "unet", "filters": [4, 8, 16], "kernel_size": 5}, (13, 17, 3)),  # padded to 16x20
    ({"type": "unet", "filters": [3, 5], "convs_per_level": 1, "skip_connections": False}, (9, 7, 1)),
    ({"type": "unet", "filters": [4, 6, 8], "convs_per_level": 3, "batch_norm": True}, (8, 8, 2)),
    ({"type": "unet", "filters": [5], "batch_norm": True}, (7, 5, 1)),  # one level: no pooling
    ({"type": "residual", "filters": [8, 8, 8, 8]}, (28, 28, 1)),
    ({"type": "residual", "filters": [3, 5, 7], "kernel_size": 5, "batch_norm": True}, (11, 9, 3)),
    ({"type": "residual", "filters": [4]}, (8, 8, 1)),
]


@pytest.mark.parametrize(("architecture", "image_shape"), ARCHITECTURES)
def test_parameters_and_activations_match_the_built_keras_model(architecture, image_shape):
    from dae.models import build_autoencoder  # noqa: PLC0415

    spec = _spec(architecture=architecture, batch_size=48)
    model = build_autoencoder(spec, image_shape)
    cost = estimate_job_cost(spec, image_shape)
    assert cost.parameters == model.count_params()
    assert cost.weights_bytes == cost.gradients_bytes == 4 * model.count_params()
    # The definition: every layer's output (input layer included), for batch_size images, in float32.
    assert cost.activations_bytes == _layer_output_values(model, image_shape) * 48 * 4
    assert cost.training_images_bytes == 0


def test_regularization_changes_no_parameter_count():
    from dae.models import build_autoencoder  # noqa: PLC0415

    penalty = {"kernel": {"l1": 0.01, "l2": 0.1}, "bias": {"l2": 0.1}, "activity": {"l1": 0.001}}
    for l1_method in ("penalty", "proximal"):
        spec = _spec(
            architecture={"type": "conv", "filters": [4, 8]},
            regularization={"encoder": penalty, "decoder": penalty, "l1_method": l1_method},
        )
        model = build_autoencoder(spec, (12, 12, 3))
        assert estimate_job_cost(spec, (12, 12, 3)).parameters == model.count_params() == 1395


@pytest.mark.parametrize(
    ("optimizer", "slots"),
    [
        ({"type": "adam"}, 2),
        ({"type": "rmsprop", "momentum": 0.9}, 2),
        ({"type": "rmsprop", "momentum": 0.0}, 1),
        ({"type": "sgd", "momentum": 0.9}, 1),
        ({"type": "sgd", "momentum": 0.0}, 0),
    ],
)
def test_optimizer_state_counts_the_variables_keras_creates(optimizer, slots):
    from dae.models import build_autoencoder  # noqa: PLC0415
    from dae.training import build_optimizer  # noqa: PLC0415

    spec = _spec(architecture={"type": "dense", "hidden_units": [8], "latent_dim": 3}, optimizer=optimizer)
    model = build_autoencoder(spec, (4, 4, 1))
    keras_optimizer = build_optimizer(spec.optimizer, total_steps=10)
    keras_optimizer.build(model.trainable_variables)
    # Optimizer variables beyond its scalars (iterations, learning rate) are the per-weight slots.
    slot_values = sum(int(np.prod(v.shape)) for v in keras_optimizer.variables if len(v.shape) > 0)
    cost = estimate_job_cost(spec, (4, 4, 1))
    assert cost.optimizer_slots == slots
    assert cost.optimizer_state_bytes == slot_values * 4 == slots * model.count_params() * 4


def test_training_images_are_capped_by_max_train_images():
    assert estimate_job_cost(_spec(**CONV_JOB), FASHION, train_images=60_000).training_images_bytes == 60_000 * 784 * 4
    capped = estimate_job_cost(_spec(max_train_images=1000), FASHION, train_images=60_000)
    assert capped.training_images_bytes == 1000 * 784 * 4
    assert estimate_job_cost(_spec(max_train_images=1000), FASHION, train_images=10).training_images_bytes == 10 * 784 * 4


def test_conv_job_estimate_in_numbers():
    cost = estimate_job_cost(_spec(**CONV_JOB), FASHION, train_images=60_000)
    assert cost.parameters == 74_497
    assert cost.optimizer_state_bytes == 2 * 4 * 74_497
    # noisy 784 + pad 784 + 14·14·32 + 7·7·64 + 14·14·64 + 28·28·32 + output 784 + crop 784 + denoised 784
    assert cost.activations_bytes == (5 * 784 + 6272 + 3136 + 12544 + 25088) * 64 * 4
    assert cost.training_memory_bytes == 4 * (4 * 74_497 + 50_960 * 64 + 60_000 * 784)
    assert 190 < cost.training_memory_mib < 195


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"architecture": {"type": "dense"}},
        {"dataset": "digits"},
        {"dataset": "natural_patches"},
        {"architecture": {"type": "conv"}, "batch_size": 4096},  # conv at the largest batch (the U-Net: ~2.4 GiB)
        TrainingSpec.model_config["json_schema_extra"]["examples"][0],  # the POST /jobs example
    ],
)
def test_default_and_example_jobs_pass_the_default_limits_with_a_wide_margin(fields):
    spec = _spec(**fields)
    dataset = BUILTIN_DATASETS[spec.dataset]
    cost = check_job_cost(spec, dataset.image_shape, train_images=dataset.train_count, **DEFAULT_LIMITS)
    assert cost.parameters * 50 < DEFAULT_MAX_MODEL_PARAMS
    assert cost.training_memory_mib * 4 < DEFAULT_MAX_TRAINING_MEMORY_MIB


def test_oversized_dense_spec_is_refused_with_the_estimate_and_the_field():
    with pytest.raises(InvalidSpec) as raised:
        check_job_cost(_spec(**HUGE_DENSE), FASHION, train_images=60_000, **DEFAULT_LIMITS)
    message = raised.value.message
    assert status_of(raised.value) == 422  # what the gateway answers
    assert message.startswith("The job is too large for a worker. Expected at most 50,000,000 parameters")
    assert "Received: architecture.hidden_units=[8192, 8192, 8192, 8192, 8192, 8192, 8192, 8192]" in message
    assert "953,025,328 parameters; training memory ~14,754.4 MiB" in message
    assert "optimizer state 7,271.0 (adam, 2 per weight)" in message
    assert "above DAE_MAX_MODEL_PARAMS and DAE_MAX_TRAINING_MEMORY_MIB" in message
    assert message.endswith("Lower architecture.hidden_units, architecture.latent_dim.")


def test_oversized_conv_spec_is_refused_with_the_estimate_and_the_fields():
    cost = estimate_job_cost(_spec(**HUGE_CONV), FASHION, train_images=60_000)
    assert cost.parameters == 888_399_873
    assert cost.activations_bytes > 25 * 2**30
    with pytest.raises(InvalidSpec) as raised:
        check_job_cost(_spec(**HUGE_CONV), FASHION, train_images=60_000, **DEFAULT_LIMITS)
    message = raised.value.message
    assert "888,399,873 parameters; training memory ~41,004.1 MiB" in message
    assert "activations of one batch 27,268.8 (batch_size=4096)" in message
    assert "above DAE_MAX_MODEL_PARAMS and DAE_MAX_TRAINING_MEMORY_MIB" in message
    # The model's fields first (too many parameters), then what else the memory needs: the batch's activations.
    assert message.endswith("Lower architecture.filters, architecture.kernel_size, batch_size.")
    # Under a higher parameter limit, only memory is over, and the largest term (activations) comes first.
    with pytest.raises(InvalidSpec) as raised:
        check_job_cost(_spec(**HUGE_CONV), FASHION, max_params=10**9, max_training_memory_mib=4096)
    message = raised.value.message
    assert "at most 4,096.0 MiB of estimated training memory (DAE_MAX_TRAINING_MEMORY_MIB)" in message
    assert "training memory ~40,824.7 MiB" in message and "training images 0.0 MiB" in message
    assert "above DAE_MAX_TRAINING_MEMORY_MIB." in message
    assert message.endswith("Lower batch_size, architecture.filters, architecture.kernel_size.")


def test_memory_message_names_only_the_terms_that_must_shrink():
    with pytest.raises(InvalidSpec) as raised:
        check_job_cost(_spec(**CONV_JOB), FASHION, train_images=60_000, max_params=10**6, max_training_memory_mib=100)
    assert raised.value.message.endswith("above DAE_MAX_TRAINING_MEMORY_MIB. Lower max_train_images.")
    with pytest.raises(InvalidSpec) as raised:
        check_job_cost(_spec(**CONV_JOB), FASHION, train_images=60_000, max_params=10**6, max_training_memory_mib=10)
    assert raised.value.message.endswith("Lower max_train_images, batch_size, architecture.filters.")


def test_limits_are_inclusive_at_the_boundary():
    spec = _spec(architecture={"type": "conv", "filters": [4, 8]}, batch_size=16)
    cost = estimate_job_cost(spec, FASHION, train_images=500)
    at_limit = {"max_params": cost.parameters, "max_training_memory_mib": cost.training_memory_bytes / MIB}
    assert check_job_cost(spec, FASHION, train_images=500, **at_limit) == cost
    with pytest.raises(InvalidSpec, match=r"DAE_MAX_MODEL_PARAMS"):
        check_job_cost(spec, FASHION, train_images=500, **{**at_limit, "max_params": cost.parameters - 1})
    just_below = (cost.training_memory_bytes - 1) / MIB
    with pytest.raises(InvalidSpec, match=r"DAE_MAX_TRAINING_MEMORY_MIB"):
        check_job_cost(spec, FASHION, train_images=500, **{**at_limit, "max_training_memory_mib": just_below})
    # One more training image crosses the memory limit; one image fewer stays under it.
    assert check_job_cost(spec, FASHION, train_images=499, **at_limit).training_memory_bytes < cost.training_memory_bytes
    with pytest.raises(InvalidSpec, match=r"max_train_images"):
        check_job_cost(spec, FASHION, train_images=501, **at_limit)


def test_default_parameter_limit_boundary():
    below = _spec(architecture={"type": "dense", "hidden_units": [4096, 4096, 1024]})
    above = _spec(architecture={"type": "dense", "hidden_units": [4096, 4096, 2048]})
    assert check_job_cost(below, FASHION, **DEFAULT_LIMITS).parameters == 48_450_352
    assert estimate_job_cost(above, FASHION).parameters == 56_906_544
    with pytest.raises(InvalidSpec, match=r"DAE_MAX_MODEL_PARAMS"):
        check_job_cost(above, FASHION, **DEFAULT_LIMITS)


def test_too_deep_conv_and_bad_inputs_are_refused():
    with pytest.raises(InvalidSpec, match=r"at most 3 levels"):
        estimate_job_cost(_spec(architecture={"type": "conv", "filters": [4, 4, 4, 4]}), (8, 8, 1))
    with pytest.raises(ValueError, match=r"Expected \(H, W, C\)"):
        estimate_job_cost(_spec(), (28, 28))
    with pytest.raises(ValueError, match=r"max_params >= 1"):
        check_job_cost(_spec(), FASHION, max_params=0, max_training_memory_mib=1)


def test_job_cost_is_frozen():
    cost = estimate_job_cost(_spec(), FASHION)
    assert isinstance(cost, JobCost)
    with pytest.raises(AttributeError):
        cost.parameters = 1  # type: ignore[misc]


def test_import_does_not_load_tensorflow_or_keras():
    code = (
        "import sys, dae.cost; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'tf_keras')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"
