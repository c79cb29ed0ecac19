"""Denoiser builders: dense and convolutional autoencoders, U-Nets and residual (DnCNN-style) CNNs.

Layer names carry the structure other modules rely on: encoder layers are named `encoder_*` and the encoder's
last layer (the code) is `code`; decoder layers are `decoder_*`; the model's output layer is `denoised`.
The regularizers of the spec are attached per group; the encoder's activity regularizer sits on `code` and the
decoder's on `denoised`.

Conv models are fully convolutional (input `(None, None, C)`). Each stride-2 level halves H and W, so the model
itself reflect-pads its input at the bottom/right to the next multiple of 2**levels (`PadToMultiple`) and crops
the output back to the input's size (`CropToReference`): any image at least 2**levels pixels on a side goes in,
and the same size comes out, at training and at serving time (also through ONNX). The output activation is a
separate last layer, after the crop, so a sigmoid output keeps its logits for a stable cross-entropy.

U-Nets and residual CNNs predict the noise: their last convolution (`decoder_noise`, linear, C channels) is
subtracted from the input (`subtract_noise`), then `denoised` (a linear activation carrying the decoder's activity
regularizer). A U-Net with L levels pools L − 1 times, so it pads to a multiple of 2**(L − 1) and crops its
predicted noise back like the conv model; a residual CNN stays at the input's resolution (no padding).
Layer groups: U-Net encoder = the convolutions of the downsampling path and the bottleneck (its last unit is
`code`), decoder = the upsampling transposed convolutions, the decoder convolutions and `decoder_noise`; residual
encoder = the first ceil(n/2) of its n hidden convolutions (the last of them is `code`), decoder = the rest and
`decoder_noise`. With batch normalisation a unit is `<group>_conv_<tag>` (no bias) → `<group>_bn_<tag>` →
`<group>_act_<tag>` (or `code`); the network's first convolution is never normalised.
"""

# mypy: disallow-subclassing-any=False
# (keras ships no type information, so its classes are Any to mypy)

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from dae.regularizers import GroupRegularizers, LayerGroup, build_group_regularizers
from dae.spec import TrainingSpec, check_spec_for_images

CODE_LAYER_NAME = "code"
OUTPUT_LAYER_NAME = "denoised"


@keras.saving.register_keras_serializable(package="dae")
class PadToMultiple(keras.layers.Layer):
    """Reflect-pads H and W (at the bottom and right) up to the next multiple of `multiple`."""

    def __init__(self, multiple: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if int(multiple) < 1:
            raise ValueError(
                f"PadToMultiple needs a positive multiple. Expected multiple >= 1. Received: multiple={multiple}"
            )
        self.multiple = int(multiple)
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def call(self, inputs: Any) -> Any:
        if self.multiple == 1:
            return inputs
        shape = ops.shape(inputs)
        # (m - h % m) % m rather than (-h) % m: ONNX converts a floor-mod of a negative number as fmod.
        pad_height = (self.multiple - shape[1] % self.multiple) % self.multiple
        pad_width = (self.multiple - shape[2] % self.multiple) % self.multiple
        return ops.pad(inputs, [[0, 0], [0, pad_height], [0, pad_width], [0, 0]], mode="reflect")

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> tuple[int | None, ...]:
        def padded(size: int | None) -> int | None:
            return None if size is None else -(-size // self.multiple) * self.multiple

        return (input_shape[0], padded(input_shape[1]), padded(input_shape[2]), input_shape[3])

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "multiple": self.multiple}


@keras.saving.register_keras_serializable(package="dae")
class CropToReference(keras.layers.Layer):
    """Crops `[x, reference]` to x[:, :H_ref, :W_ref, :] (undoes `PadToMultiple`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_spec = [keras.layers.InputSpec(ndim=4), keras.layers.InputSpec(ndim=4)]

    def call(self, inputs: Sequence[Any]) -> Any:
        values, reference = inputs
        reference_shape = ops.shape(reference)
        return values[:, : reference_shape[1], : reference_shape[2], :]

    def compute_output_shape(self, input_shape: Sequence[Sequence[int | None]]) -> tuple[int | None, ...]:
        values_shape, reference_shape = input_shape
        return (values_shape[0], reference_shape[1], reference_shape[2], values_shape[3])


def _weight_regularizers(regularizers: GroupRegularizers) -> dict[str, Any]:
    return {"kernel_regularizer": regularizers.kernel, "bias_regularizer": regularizers.bias}


def _check_image_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or any(int(size) < 1 for size in image_shape):
        raise ValueError(
            "build_autoencoder needs the shape of one image. Expected (H, W, C) with positive sizes. "
            f"Received: image_shape={tuple(image_shape)}"
        )
    height, width, channels = (int(size) for size in image_shape)
    return height, width, channels


def build_autoencoder(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> keras.Model:
    """Build the (uncompiled) autoencoder the spec describes for images of `image_shape` = (H, W, C).

    Raises InvalidSpec when the spec cannot run on such images (conv deeper than the image allows).
    """
    height, width, channels = _check_image_shape(image_shape)
    check_spec_for_images(spec, (height, width, channels))
    encoder_regularizers = build_group_regularizers(spec.regularization, "encoder")
    decoder_regularizers = build_group_regularizers(spec.regularization, "decoder")
    if spec.architecture.type == "conv":
        return _build_conv(spec, channels, encoder_regularizers, decoder_regularizers)
    if spec.architecture.type == "unet":
        return _build_unet(spec, channels, encoder_regularizers, decoder_regularizers)
    if spec.architecture.type == "residual":
        return _build_residual(spec, channels, encoder_regularizers, decoder_regularizers)
    return _build_dense(spec, (height, width, channels), encoder_regularizers, decoder_regularizers)


def _build_conv(
    spec: TrainingSpec, channels: int, encoder: GroupRegularizers, decoder: GroupRegularizers
) -> keras.Model:
    architecture = spec.architecture
    inputs = keras.Input(shape=(None, None, channels), name="noisy")
    x = PadToMultiple(architecture.downsampling_factor, name="pad_to_multiple")(inputs)
    for level, filters in enumerate(architecture.filters, start=1):
        is_code = level == len(architecture.filters)
        x = keras.layers.Conv2D(
            filters,
            architecture.kernel_size,
            strides=2,
            padding="same",
            activation=architecture.activation,
            activity_regularizer=encoder.activity if is_code else None,
            name=CODE_LAYER_NAME if is_code else f"encoder_conv_{level}",
            **_weight_regularizers(encoder),
        )(x)
    for level, filters in enumerate(reversed(architecture.filters), start=1):
        x = keras.layers.Conv2DTranspose(
            filters,
            architecture.kernel_size,
            strides=2,
            padding="same",
            activation=architecture.activation,
            name=f"decoder_deconv_{level}",
            **_weight_regularizers(decoder),
        )(x)
    x = keras.layers.Conv2D(
        channels, architecture.kernel_size, padding="same", name="decoder_output", **_weight_regularizers(decoder)
    )(x)
    x = CropToReference(name="crop_to_input")([x, inputs])
    outputs = keras.layers.Activation(
        architecture.output_activation, activity_regularizer=decoder.activity, name=OUTPUT_LAYER_NAME
    )(x)
    return keras.Model(inputs, outputs, name="conv_autoencoder")


def _build_dense(
    spec: TrainingSpec, image_shape: tuple[int, int, int], encoder: GroupRegularizers, decoder: GroupRegularizers
) -> keras.Model:
    architecture = spec.architecture
    height, width, channels = image_shape
    inputs = keras.Input(shape=image_shape, name="noisy")
    x = keras.layers.Flatten(name="flatten")(inputs)
    for level, units in enumerate(architecture.hidden_units, start=1):
        x = keras.layers.Dense(
            units, activation=architecture.activation, name=f"encoder_dense_{level}", **_weight_regularizers(encoder)
        )(x)
    x = keras.layers.Dense(
        architecture.latent_dim,
        activation=architecture.activation,
        activity_regularizer=encoder.activity,
        name=CODE_LAYER_NAME,
        **_weight_regularizers(encoder),
    )(x)
    for level, units in enumerate(reversed(architecture.hidden_units), start=1):
        x = keras.layers.Dense(
            units, activation=architecture.activation, name=f"decoder_dense_{level}", **_weight_regularizers(decoder)
        )(x)
    x = keras.layers.Dense(height * width * channels, name="decoder_output", **_weight_regularizers(decoder))(x)
    x = keras.layers.Reshape(image_shape, name="reshape")(x)
    outputs = keras.layers.Activation(
        architecture.output_activation, activity_regularizer=decoder.activity, name=OUTPUT_LAYER_NAME
    )(x)
    return keras.Model(inputs, outputs, name="dense_autoencoder")


def _conv_unit(
    x: Any,
    filters: int,
    spec: TrainingSpec,
    regularizers: GroupRegularizers,
    *,
    group: LayerGroup,
    tag: str,
    normalize: bool,
    is_code: bool = False,
) -> Any:
    """One same-resolution convolution with its activation, batch-normalised in between when `normalize`; the
    unit's output layer is named `code` when `is_code` (and carries the encoder's activity regularizer)."""
    architecture = spec.architecture
    activity = regularizers.activity if is_code else None
    if not normalize:
        return keras.layers.Conv2D(
            filters,
            architecture.kernel_size,
            padding="same",
            activation=architecture.activation,
            activity_regularizer=activity,
            name=CODE_LAYER_NAME if is_code else f"{group}_conv_{tag}",
            **_weight_regularizers(regularizers),
        )(x)
    x = keras.layers.Conv2D(
        filters,
        architecture.kernel_size,
        padding="same",
        use_bias=False,  # the normalisation's offset is the bias
        name=f"{group}_conv_{tag}",
        kernel_regularizer=regularizers.kernel,
    )(x)
    x = keras.layers.BatchNormalization(name=f"{group}_bn_{tag}")(x)
    return keras.layers.Activation(
        architecture.activation,
        activity_regularizer=activity,
        name=CODE_LAYER_NAME if is_code else f"{group}_act_{tag}",
    )(x)


def _subtract_noise(
    spec: TrainingSpec, inputs: Any, noise: Any, decoder: GroupRegularizers, *, crop: bool
) -> Any:
    """input − predicted noise (cropped back to the input's size first when the network padded it)."""
    if crop:
        noise = CropToReference(name="crop_to_input")([noise, inputs])
    x = keras.layers.Subtract(name="subtract_noise")([inputs, noise])
    return keras.layers.Activation(
        spec.architecture.output_activation, activity_regularizer=decoder.activity, name=OUTPUT_LAYER_NAME
    )(x)


def _noise_prediction(spec: TrainingSpec, x: Any, channels: int, decoder: GroupRegularizers) -> Any:
    return keras.layers.Conv2D(
        channels, spec.architecture.kernel_size, padding="same", name="decoder_noise", **_weight_regularizers(decoder)
    )(x)


def _build_unet(
    spec: TrainingSpec, channels: int, encoder: GroupRegularizers, decoder: GroupRegularizers
) -> keras.Model:
    architecture = spec.architecture
    levels = len(architecture.filters)
    units = architecture.convs_per_level
    inputs = keras.Input(shape=(None, None, channels), name="noisy")
    x = PadToMultiple(architecture.downsampling_factor, name="pad_to_multiple")(inputs)
    skips = []
    for level, filters in enumerate(architecture.filters, start=1):
        if level > 1:
            x = keras.layers.MaxPooling2D(2, name=f"encoder_pool_{level}")(x)
        for unit in range(1, units + 1):
            x = _conv_unit(
                x, filters, spec, encoder, group="encoder", tag=f"{level}_{unit}",
                normalize=architecture.batch_norm and (level, unit) != (1, 1),
                is_code=(level, unit) == (levels, units),
            )
        skips.append(x)
    for level in range(levels - 1, 0, -1):
        filters = architecture.filters[level - 1]
        x = keras.layers.Conv2DTranspose(
            filters,
            architecture.kernel_size,
            strides=2,
            padding="same",
            activation=architecture.activation,
            name=f"decoder_up_{level}",
            **_weight_regularizers(decoder),
        )(x)
        if architecture.skip_connections:
            x = keras.layers.Concatenate(name=f"decoder_skip_{level}")([x, skips[level - 1]])
        for unit in range(1, units + 1):
            x = _conv_unit(
                x, filters, spec, decoder, group="decoder", tag=f"{level}_{unit}", normalize=architecture.batch_norm
            )
    noise = _noise_prediction(spec, x, channels, decoder)
    outputs = _subtract_noise(spec, inputs, noise, decoder, crop=True)
    return keras.Model(inputs, outputs, name="unet_denoiser")


def residual_encoder_layers(hidden_layers: int) -> int:
    """How many of a residual CNN's hidden convolutions form its encoder group: the first ceil(n/2)."""
    return (hidden_layers + 1) // 2


def _build_residual(
    spec: TrainingSpec, channels: int, encoder: GroupRegularizers, decoder: GroupRegularizers
) -> keras.Model:
    architecture = spec.architecture
    encoder_layers = residual_encoder_layers(len(architecture.filters))
    inputs = keras.Input(shape=(None, None, channels), name="noisy")
    x = inputs
    for index, filters in enumerate(architecture.filters, start=1):
        in_encoder = index <= encoder_layers
        x = _conv_unit(
            x, filters, spec, encoder if in_encoder else decoder, group="encoder" if in_encoder else "decoder",
            tag=str(index), normalize=architecture.batch_norm and index > 1, is_code=index == encoder_layers,
        )
    noise = _noise_prediction(spec, x, channels, decoder)
    outputs = _subtract_noise(spec, inputs, noise, decoder, crop=False)
    return keras.Model(inputs, outputs, name="residual_denoiser")


def layers_in_group(model: keras.Model, group: LayerGroup) -> list[keras.layers.Layer]:
    """The layers of the encoder (`encoder_*` and `code`) or of the decoder (`decoder_*`) that hold weights."""
    if group not in ("encoder", "decoder"):
        raise ValueError(f"Unknown layer group. Expected 'encoder' or 'decoder'. Received: group={group!r}")

    def belongs(layer: keras.layers.Layer) -> bool:
        if group == "encoder":
            return bool(layer.name == CODE_LAYER_NAME or layer.name.startswith("encoder_"))
        return bool(layer.name.startswith("decoder_"))

    return [layer for layer in model.layers if belongs(layer) and layer.weights]
