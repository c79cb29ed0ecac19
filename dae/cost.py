"""The cost of a training job, estimated from its spec before anything is queued.

Pure arithmetic (no TensorFlow, no Keras): the gateway calls it at submission. It follows exactly the layers
`dae.models.build_autoencoder` creates (dense, conv, unet, residual), so `JobCost.parameters` equals the Keras
model's `count_params()` (batch normalisation's moving statistics included).

Training memory is estimated in float32 bytes as the sum of
- weights: parameters × 4;
- optimizer state: parameters × slots × 4 (adam 2; rmsprop 1, +1 with momentum; sgd 0, +1 with momentum);
- gradients: parameters × 4 (these two count batch normalisation's moving statistics too: a slight over-estimate);
- activations of one batch: Σ over every layer of the model (its input layer included) of the layer's output
  size for one image × batch_size × 4 (what the forward pass keeps for backprop);
- training images: min(dataset size, max_train_images) × H × W × C × 4 (dae.training holds them once as a
  float32 tensor); 0 when the image count is not given.
It leaves out what TensorFlow adds on top (its runtime, per-op scratch buffers, gradients of activations in
flight); the default memory limit keeps a wide margin for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from dae.errors import InvalidSpec
from dae.spec import TrainingSpec, check_spec_for_images

#: Default of DAE_MAX_MODEL_PARAMS: ~670x the default conv job (74,497) and ~100x the default dense one
#: (476,720); 50 M float32 parameters are 200 MB of weights, 800 MB with Adam state and gradients.
DEFAULT_MAX_MODEL_PARAMS = 50_000_000
#: Default of DAE_MAX_TRAINING_MEMORY_MIB: a training step's measured peak RSS growth was 1.3-2.1x the estimate
#: (dense and conv, 2 CPU cores), so 4 GiB estimated stays under ~9 GiB on a 24 GiB worker; the default job
#: estimates 193 MiB on Fashion-MNIST (977 MiB at batch_size=4096).
DEFAULT_MAX_TRAINING_MEMORY_MIB = 4096.0

BYTES_PER_VALUE = 4  # float32
MIB = 2**20


@dataclass(frozen=True)
class JobCost:
    """Parameters and estimated training memory (bytes) of one training job."""

    parameters: int
    optimizer_slots: int
    weights_bytes: int
    optimizer_state_bytes: int
    gradients_bytes: int
    activations_bytes: int
    training_images_bytes: int = 0

    @property
    def training_memory_bytes(self) -> int:
        """The sum of every term."""
        return (
            self.weights_bytes
            + self.optimizer_state_bytes
            + self.gradients_bytes
            + self.activations_bytes
            + self.training_images_bytes
        )

    @property
    def training_memory_mib(self) -> float:
        return self.training_memory_bytes / MIB


def optimizer_slots(spec: TrainingSpec) -> int:
    """Optimizer variables per weight, as Keras 3 creates them (dae.training.build_optimizer)."""
    optimizer = spec.optimizer
    if optimizer.type == "adam":
        return 2  # momentum and velocity
    if optimizer.type == "rmsprop":
        return 2 if optimizer.momentum > 0 else 1  # velocity (+ momentum)
    if optimizer.type == "sgd":
        return 1 if optimizer.momentum != 0 else 0  # momentum
    raise ValueError(
        f"Unknown optimizer. Expected one of adam, sgd, rmsprop. Received: optimizer.type={optimizer.type!r}"
    )


def _dense_layers(spec: TrainingSpec, values: int) -> tuple[int, int]:
    """(parameters, activation values per image) of dae.models._build_dense on images of `values` values."""
    architecture = spec.architecture
    widths = [*architecture.hidden_units, architecture.latent_dim, *reversed(architecture.hidden_units), values]
    parameters = 0
    fan_in = values
    for units in widths:  # Dense: kernel fan_in × units + bias units
        parameters += fan_in * units + units
        fan_in = units
    # noisy (input), flatten, every Dense (the last one is decoder_output), reshape, denoised (activation).
    activations = values + values + sum(widths) + values + values
    return parameters, activations


def _conv_layers(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, activation values per image) of dae.models._build_conv on images of `image_shape`."""
    architecture = spec.architecture
    height, width, channels = image_shape
    kernel_area = architecture.kernel_size**2
    factor = architecture.downsampling_factor
    # PadToMultiple: H and W up to the next multiple of 2**levels; each level halves them exactly.
    padded_height, padded_width = -(-height // factor) * factor, -(-width // factor) * factor
    parameters = 0
    activations = height * width * channels + padded_height * padded_width * channels  # noisy, pad_to_multiple
    fan_in = channels
    for level, filters in enumerate(architecture.filters, start=1):  # Conv2D stride 2: k² × fan_in × filters + bias
        parameters += kernel_area * fan_in * filters + filters
        activations += (padded_height >> level) * (padded_width >> level) * filters
        fan_in = filters
    levels = len(architecture.filters)
    for level, filters in enumerate(reversed(architecture.filters), start=1):  # Conv2DTranspose stride 2, same count
        parameters += kernel_area * fan_in * filters + filters
        activations += (padded_height >> (levels - level)) * (padded_width >> (levels - level)) * filters
        fan_in = filters
    parameters += kernel_area * fan_in * channels + channels  # decoder_output: Conv2D to C channels, stride 1
    activations += padded_height * padded_width * channels
    activations += 2 * height * width * channels  # crop_to_input, denoised (activation)
    return parameters, activations


def _conv_unit(spec: TrainingSpec, fan_in: int, filters: int, pixels: int, *, normalize: bool) -> tuple[int, int]:
    """(parameters, activation values per image) of dae.models._conv_unit at `pixels` = H × W."""
    kernel_area = spec.architecture.kernel_size**2
    if not normalize:  # Conv2D with bias and its activation: one layer
        return kernel_area * fan_in * filters + filters, pixels * filters
    # Conv2D without bias, BatchNormalization (gamma, beta, moving mean and variance), Activation.
    return kernel_area * fan_in * filters + 4 * filters, 3 * pixels * filters


def _unet_layers(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, activation values per image) of dae.models._build_unet on images of `image_shape`."""
    architecture = spec.architecture
    height, width, channels = image_shape
    kernel_area = architecture.kernel_size**2
    factor = architecture.downsampling_factor
    padded_height, padded_width = -(-height // factor) * factor, -(-width // factor) * factor

    def pixels(level: int) -> int:  # level 1 is full (padded) resolution; each next one pools by 2
        return (padded_height >> (level - 1)) * (padded_width >> (level - 1))

    parameters = 0
    activations = height * width * channels + padded_height * padded_width * channels  # noisy, pad_to_multiple
    fan_in = channels
    for level, filters in enumerate(architecture.filters, start=1):
        if level > 1:
            activations += pixels(level) * fan_in  # encoder_pool: the previous level's channels
        for unit in range(1, architecture.convs_per_level + 1):
            unit_parameters, unit_activations = _conv_unit(
                spec, fan_in, filters, pixels(level), normalize=architecture.batch_norm and (level, unit) != (1, 1)
            )
            parameters += unit_parameters
            activations += unit_activations
            fan_in = filters
    for level in range(len(architecture.filters) - 1, 0, -1):
        filters = architecture.filters[level - 1]
        parameters += kernel_area * fan_in * filters + filters  # decoder_up: Conv2DTranspose stride 2
        activations += pixels(level) * filters
        fan_in = filters
        if architecture.skip_connections:  # decoder_skip: the upsampled and the encoder's features
            fan_in = 2 * filters
            activations += pixels(level) * fan_in
        for _ in range(architecture.convs_per_level):
            unit_parameters, unit_activations = _conv_unit(
                spec, fan_in, filters, pixels(level), normalize=architecture.batch_norm
            )
            parameters += unit_parameters
            activations += unit_activations
            fan_in = filters
    parameters += kernel_area * fan_in * channels + channels  # decoder_noise
    activations += padded_height * padded_width * channels
    activations += 3 * height * width * channels  # crop_to_input, subtract_noise, denoised
    return parameters, activations


def _residual_layers(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> tuple[int, int]:
    """(parameters, activation values per image) of dae.models._build_residual on images of `image_shape`."""
    architecture = spec.architecture
    height, width, channels = image_shape
    values = height * width
    parameters = 0
    activations = values * channels  # noisy
    fan_in = channels
    for index, filters in enumerate(architecture.filters, start=1):
        unit_parameters, unit_activations = _conv_unit(
            spec, fan_in, filters, values, normalize=architecture.batch_norm and index > 1
        )
        parameters += unit_parameters
        activations += unit_activations
        fan_in = filters
    parameters += architecture.kernel_size**2 * fan_in * channels + channels  # decoder_noise
    activations += 3 * values * channels  # decoder_noise, subtract_noise, denoised
    return parameters, activations


def estimate_job_cost(
    spec: TrainingSpec, image_shape: tuple[int, int, int], *, train_images: int | None = None
) -> JobCost:
    """Parameters and training memory of `spec` on images of `image_shape` = (H, W, C).

    `train_images`: how many images the dataset has for training (capped here by spec.max_train_images);
    None leaves the training images out. Raises InvalidSpec when the spec cannot run on such images.
    """
    if len(image_shape) != 3 or any(int(size) < 1 for size in image_shape):
        raise ValueError(
            "estimate_job_cost needs the shape of one image. Expected (H, W, C) with positive sizes. "
            f"Received: image_shape={tuple(image_shape)}"
        )
    if train_images is not None and train_images < 0:
        raise ValueError(f"Expected train_images >= 0 or None. Received: train_images={train_images}")
    height, width, channels = (int(size) for size in image_shape)
    check_spec_for_images(spec, (height, width, channels))
    if spec.architecture.type == "dense":
        parameters, activation_values = _dense_layers(spec, height * width * channels)
    elif spec.architecture.type == "conv":
        parameters, activation_values = _conv_layers(spec, (height, width, channels))
    elif spec.architecture.type == "unet":
        parameters, activation_values = _unet_layers(spec, (height, width, channels))
    elif spec.architecture.type == "residual":
        parameters, activation_values = _residual_layers(spec, (height, width, channels))
    else:
        raise ValueError(
            "Unknown architecture. Expected 'dense', 'conv', 'unet' or 'residual'. "
            f"Received: architecture.type={spec.architecture.type!r}"
        )
    slots = optimizer_slots(spec)
    images = 0
    if train_images is not None:
        images = train_images if spec.max_train_images is None else min(train_images, spec.max_train_images)
    return JobCost(
        parameters=parameters,
        optimizer_slots=slots,
        weights_bytes=parameters * BYTES_PER_VALUE,
        optimizer_state_bytes=parameters * slots * BYTES_PER_VALUE,
        gradients_bytes=parameters * BYTES_PER_VALUE,
        activations_bytes=activation_values * spec.batch_size * BYTES_PER_VALUE,
        training_images_bytes=images * height * width * channels * BYTES_PER_VALUE,
    )


def describe_job_cost(cost: JobCost, spec: TrainingSpec) -> str:
    """One sentence with the parameters and the memory breakdown, in MiB."""
    return (
        f"{cost.parameters:,} parameters; training memory ~{cost.training_memory_mib:,.1f} MiB = "
        f"weights {cost.weights_bytes / MIB:,.1f} + optimizer state {cost.optimizer_state_bytes / MIB:,.1f} "
        f"({spec.optimizer.type}, {cost.optimizer_slots} per weight) + gradients {cost.gradients_bytes / MIB:,.1f} "
        f"+ activations of one batch {cost.activations_bytes / MIB:,.1f} (batch_size={spec.batch_size}) "
        f"+ training images {cost.training_images_bytes / MIB:,.1f} MiB"
    )


def _model_fields(spec: TrainingSpec) -> list[str]:
    if spec.architecture.type == "dense":
        return ["architecture.hidden_units", "architecture.latent_dim"]
    return ["architecture.filters", "architecture.kernel_size"]


def _fields_to_change(cost: JobCost, spec: TrainingSpec, *, params_over: bool, memory_limit_bytes: float) -> list[str]:
    """The spec fields to lower: the model's when it has too many parameters; then the fields behind the largest
    memory terms, largest first, until the terms left would fit under the memory limit."""
    model_fields = _model_fields(spec)
    terms = [
        (cost.weights_bytes + cost.optimizer_state_bytes + cost.gradients_bytes, model_fields),
        (cost.activations_bytes, ["batch_size", model_fields[0]]),
        (cost.training_images_bytes, ["max_train_images"]),
    ]
    fields = list(model_fields) if params_over else []
    remaining = cost.training_memory_bytes
    for size, names in sorted(terms, key=lambda term: -term[0]):
        if remaining <= memory_limit_bytes:
            break
        fields += [name for name in names if name not in fields]
        remaining -= size
    return fields


def _received(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> str:
    architecture = spec.architecture
    if architecture.type == "dense":
        model = f"architecture.hidden_units={architecture.hidden_units}, architecture.latent_dim={architecture.latent_dim}"
    else:
        model = f"architecture.filters={architecture.filters}, architecture.kernel_size={architecture.kernel_size}"
    height, width, channels = image_shape
    return (
        f"{model}, batch_size={spec.batch_size}, optimizer.type={spec.optimizer.type!r}, "
        f"max_train_images={spec.max_train_images} on {height}x{width}x{channels} images"
    )


def check_job_cost(
    spec: TrainingSpec,
    image_shape: tuple[int, int, int],
    *,
    max_params: int,
    max_training_memory_mib: float,
    train_images: int | None = None,
) -> JobCost:
    """The job's cost; InvalidSpec (422) when it exceeds `max_params` or `max_training_memory_mib`."""
    if max_params < 1 or not max_training_memory_mib > 0:
        raise ValueError(
            "Job cost limits must be positive. Expected max_params >= 1 and max_training_memory_mib > 0. "
            f"Received: max_params={max_params}, max_training_memory_mib={max_training_memory_mib}"
        )
    cost = estimate_job_cost(spec, image_shape, train_images=train_images)
    params_over = cost.parameters > max_params
    memory_over = cost.training_memory_bytes > max_training_memory_mib * MIB
    if not (params_over or memory_over):
        return cost
    over = [
        name
        for name, is_over in (("DAE_MAX_MODEL_PARAMS", params_over), ("DAE_MAX_TRAINING_MEMORY_MIB", memory_over))
        if is_over
    ]
    fields = _fields_to_change(cost, spec, params_over=params_over, memory_limit_bytes=max_training_memory_mib * MIB)
    shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    raise InvalidSpec(
        f"The job is too large for a worker. Expected at most {max_params:,} parameters (DAE_MAX_MODEL_PARAMS) "
        f"and at most {max_training_memory_mib:,.1f} MiB of estimated training memory "
        f"(DAE_MAX_TRAINING_MEMORY_MIB). Received: {_received(spec, shape)}, which estimate "
        f"{describe_job_cost(cost, spec)}, above {' and '.join(over)}. Lower {', '.join(fields)}."
    )
