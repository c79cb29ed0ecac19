"""The parts of the training spec that describe the denoiser and its noise: ArchitectureSpec and NoiseSpec.

Contracts like the rest of dae.spec, which re-exports them: import them from there (this module only keeps dae/spec.py
short). Importable without TensorFlow.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: The largest noise level a spec accepts (a stddev; fractions stop at 1).
MAX_NOISE_LEVEL = 2.0
#: The default noise level: a blind range covering light to heavy noise (bench/README.md, issue 16).
DEFAULT_NOISE_LEVEL = (0.05, 0.5)
#: Levels of a conv or unet architecture, hidden convolutions of a residual one.
MAX_LEVELS = 6
MAX_RESIDUAL_LAYERS = 20
#: The default architecture (the default job's, measured in bench/README.md) and the filters each type defaults to.
DEFAULT_ARCHITECTURE_TYPE: Literal["dense", "conv", "unet", "residual"] = "unet"
DEFAULT_UNET_FILTERS = (16, 32, 64)
DEFAULT_FILTERS = (32, 64)


class StrictModel(BaseModel):
    """Base for spec parts: unknown fields are an error, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


class ArchitectureSpec(StrictModel):
    """The denoiser's shape: a dense (MLP) or convolutional autoencoder, a U-Net, or a residual (DnCNN-style) CNN.

    `unet` and `residual` predict the noise and output input − predicted noise (near-identity when training starts).
    """

    type: Literal["dense", "conv", "unet", "residual"] = Field(
        DEFAULT_ARCHITECTURE_TYPE,
        description=(
            "`dense` (fixed input size); `conv` (encoder/decoder of stride-2 convolutions, any size); `unet` "
            "(levels with skip connections, any size; the default); `residual` (DnCNN-style stack of same-resolution "
            "convolutions, any size). unet and residual output input − predicted noise."
        ),
    )
    hidden_units: list[Annotated[int, Field(ge=1, le=8192)]] = Field(
        default_factory=lambda: [256, 128],
        max_length=8,
        description="Dense only: widths of the encoder's hidden layers (mirrored in the decoder).",
    )
    latent_dim: int = Field(32, ge=1, le=8192, description="Dense only: width of the code layer.")
    filters: list[Annotated[int, Field(ge=1, le=1024)]] = Field(
        default_factory=lambda: list(DEFAULT_FILTERS),
        min_length=1,
        max_length=MAX_RESIDUAL_LAYERS,
        description=(
            f"Default: {list(DEFAULT_UNET_FILTERS)} for unet, {list(DEFAULT_FILTERS)} for conv and residual. "
            f"conv: filters per encoder level, each level halves H and W (stride 2), at most {MAX_LEVELS} levels. "
            f"unet: filters per level, the first at full resolution, each next one after a 2x2 max-pooling (so "
            f"len(filters) − 1 halvings, at most {MAX_LEVELS} levels). residual: filters of each hidden convolution, "
            f"all at full resolution (at most {MAX_RESIDUAL_LAYERS}); a last convolution predicts the noise."
        ),
    )
    kernel_size: int = Field(
        3, ge=1, le=11, description="conv, unet, residual: odd kernel side length.",
        json_schema_extra={"not": {"multipleOf": 2}},
    )
    convs_per_level: int = Field(
        2, ge=1, le=4, description="unet only: convolutions at each level, in the encoder and in the decoder."
    )
    skip_connections: bool = Field(
        True, description="unet only: concatenate each encoder level's features into the decoder at its resolution."
    )
    batch_norm: bool = Field(
        False,
        description=(
            "unet and residual: batch normalisation between every same-resolution convolution and its activation, "
            "except the network's first (not after the U-Net's upsampling convolutions nor the one that predicts "
            "the noise); normalised convolutions have no bias: the normalisation's offset replaces it."
        ),
    )
    activation: Literal["relu", "elu", "gelu", "selu", "tanh", "swish", "leaky_relu"] = "relu"
    output_activation: Literal["linear", "sigmoid"] = Field(
        "linear",
        description=(
            "`linear` (default; trains robustly with any loss) or `sigmoid` (dense and conv only). Served outputs "
            "are clipped to [0, 1] either way."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _filters_default_by_type(cls, data: Any) -> Any:
        # The default U-Net is narrower than the conv default: its first level runs at full resolution.
        if isinstance(data, dict) and "filters" not in data and data.get("type", DEFAULT_ARCHITECTURE_TYPE) == "unet":
            return {**data, "filters": list(DEFAULT_UNET_FILTERS)}
        return data

    @field_validator("kernel_size")
    @classmethod
    def _odd_kernel(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"kernel_size must be odd so 'same' padding is symmetric. Expected an odd integer. Received: kernel_size={value}")
        return value

    @model_validator(mode="after")
    def _fits_the_type(self) -> ArchitectureSpec:
        if self.type in ("conv", "unet") and len(self.filters) > MAX_LEVELS:
            raise ValueError(
                f"architecture.filters has one entry per level for type={self.type!r}. Expected at most "
                f"{MAX_LEVELS} entries. Received: filters={self.filters} ({len(self.filters)} entries)"
            )
        if self.predicts_noise and self.output_activation != "linear":
            raise ValueError(
                f"type={self.type!r} outputs input − predicted noise, a pixel value, not a logit. Expected "
                f"output_activation='linear' (so no binary_crossentropy loss). "
                f"Received: output_activation={self.output_activation!r}"
            )
        return self

    @property
    def predicts_noise(self) -> bool:
        """True for the architectures whose network predicts the noise (output = input − prediction)."""
        return self.type in ("unet", "residual")

    @property
    def is_fully_convolutional(self) -> bool:
        """Any H and W in, the same out (input shape (None, None, C)); only dense models have a fixed size."""
        return self.type != "dense"

    @property
    def downsampling_factor(self) -> int:
        """How much the model shrinks H and W inside (conv: 2**levels, unet: 2**(levels − 1), else 1); the model
        pads its input to a multiple of it itself, and a server may pad to it first to batch equal sizes."""
        if self.type == "conv":
            return 1 << len(self.filters)
        if self.type == "unet":
            return 1 << (len(self.filters) - 1)
        return 1


# ---------------------------------------------------------------------------------------------
# Noise
# ---------------------------------------------------------------------------------------------


#: One noise level (a stddev or a fraction, see NoiseSpec.type).
NoiseLevel = Annotated[float, Field(ge=0, le=MAX_NOISE_LEVEL)]
#: A range [min, max] of noise levels; every image draws its own level from it.
NoiseLevelRange = Annotated[list[NoiseLevel], Field(min_length=2, max_length=2)]


class NoiseSpec(StrictModel):
    """The corruption applied to the clean images; drawn fresh for every batch.

    `level` is a number, or a range `[min, max]` (blind training): every image of every batch draws its own level.
    """

    type: Literal["gaussian", "salt_pepper", "masking", "speckle"] = Field(
        "gaussian",
        description=(
            "`gaussian` (additive, `level` = stddev), `salt_pepper` (`level` = fraction of pixels set to 0 or 1), "
            "`masking` (`level` = fraction of pixels set to 0), `speckle` (multiplicative, `level` = stddev)."
        ),
    )
    level: NoiseLevel | NoiseLevelRange = Field(
        0.3,
        description=(
            "A number, or a range `[min, max]` (min <= max) from which every training image draws its own level "
            "uniformly, fresh every batch (a blind denoiser for the whole range). A job without `noise` trains blind "
            f"on gaussian {list(DEFAULT_NOISE_LEVEL)}; a `noise` without `level` has 0.3. Stddevs in [0, 2] for "
            "gaussian/speckle, fractions in [0, 1] for salt_pepper/masking."
        ),
    )
    clip: bool = Field(True, description="Clip the noisy image to [0, 1] (images live there).")

    @field_validator("level", mode="before")
    @classmethod
    def _number_or_range(cls, value: Any) -> float | list[float]:
        # One clear sentence for every malformed level instead of pydantic's per-branch union errors.
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(
                    "noise.level as a range is [min, max]. Expected a list of 2 numbers. "
                    f"Received: level={list(value)!r} ({len(value)} items)"
                )
            low, high = (_level_number(item, f"level={list(value)!r}") for item in value)
            if low > high:
                raise ValueError(
                    f"noise.level as a range is [min, max]. Expected min <= max. Received: level={[low, high]}"
                )
            return [low, high]
        return _level_number(value, f"level={value!r}")

    @model_validator(mode="after")
    def _fraction_in_range(self) -> NoiseSpec:
        high = self.level_range[1]
        if self.type in ("salt_pepper", "masking") and high > 1:
            raise ValueError(
                f"noise.level is a fraction of pixels for type={self.type!r}. Expected 0 <= level <= 1. "
                f"Received: level={self.level}"
            )
        return self

    @property
    def is_range(self) -> bool:
        """True when every image draws its level from a range (blind training)."""
        return isinstance(self.level, list)

    @property
    def level_range(self) -> tuple[float, float]:
        """(min, max) of the level; (level, level) for a single number."""
        if isinstance(self.level, list):
            return float(self.level[0]), float(self.level[1])
        return float(self.level), float(self.level)

    def at_level(self, level: float) -> NoiseSpec:
        """The same noise at one fixed level (how the evaluation samples a range)."""
        return NoiseSpec(type=self.type, level=level, clip=self.clip)


def _level_number(value: Any, received: str) -> float:
    """A finite noise level in [0, MAX_NOISE_LEVEL]; ValueError naming what was received otherwise."""
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):  # form fields arrive as text
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ValueError(
            f"noise.level is a number or a range [min, max] of numbers. Expected finite numbers. Received: {received}"
        )
    if not 0 <= number <= MAX_NOISE_LEVEL:
        raise ValueError(
            f"noise.level is a stddev (gaussian, speckle) or a fraction (salt_pepper, masking). "
            f"Expected 0 <= level <= {MAX_NOISE_LEVEL:g}. Received: {received}"
        )
    return number
