"""The contracts of the service: the training spec, job records and model cards.

Importable without TensorFlow: the gateway validates requests with these models and the worker
receives them as JSON. One name per concept across code, JSON and openapi.yaml.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from dae.errors import InvalidSpec

# The architecture and noise parts live in dae/spec_parts.py (to keep this module short); this is their import path.
from dae.spec_parts import DEFAULT_NOISE_LEVEL as DEFAULT_NOISE_LEVEL
from dae.spec_parts import MAX_LEVELS as MAX_LEVELS
from dae.spec_parts import MAX_NOISE_LEVEL as MAX_NOISE_LEVEL
from dae.spec_parts import MAX_RESIDUAL_LAYERS as MAX_RESIDUAL_LAYERS
from dae.spec_parts import ArchitectureSpec as ArchitectureSpec
from dae.spec_parts import NoiseLevel as NoiseLevel
from dae.spec_parts import NoiseLevelRange as NoiseLevelRange
from dae.spec_parts import NoiseSpec as NoiseSpec
from dae.spec_parts import StrictModel

#: Hard ceilings of the library; the gateway may configure lower ones (DAE_MAX_EPOCHS, ...).
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 4096
MAX_RUNTIME_S = 24 * 3600
#: The largest exponent of loss.level_weighting: beyond it the lightest images swamp the rest of the range.
MAX_LEVEL_WEIGHTING = 4.0
#: The default job's schedule: 5 epochs of 40,000 Fashion-MNIST images (~200 s on 2 cores), stopped at 270 s of
#: training on slower hosts so the job (with its export and evaluation) ends within 300 s (bench/README.md, issue 16).
DEFAULT_EPOCHS = 5
DEFAULT_MAX_TRAIN_IMAGES = 40_000
DEFAULT_MAX_RUNTIME_S = 270.0

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Who a job, model or dataset belongs to: the owner of the API key that created it (DESIGN.md §5).
OWNER_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
#: The owner of everything made without keys (an open service) and of everything written before owners existed.
DEFAULT_OWNER = "default"
#: An uploaded dataset's id: "ds_" + 12 hex characters.
DATASET_ID_PATTERN = r"^ds_[0-9a-f]{12}$"


def check_owner(owner: str) -> str:
    """`owner` if it is a valid owner name; ValueError otherwise (it becomes part of paths and Redis keys)."""
    if not isinstance(owner, str) or re.fullmatch(OWNER_PATTERN, owner) is None:
        raise ValueError(f"An owner is 1-64 of a-z 0-9 _ - starting with a letter or digit. Expected a match of "
                         f"{OWNER_PATTERN}. Received: owner={owner!r}")
    return owner


def is_dataset_id(value: str) -> bool:
    """True when `value` has the shape of an uploaded dataset id (it may still not exist)."""
    return isinstance(value, str) and re.fullmatch(DATASET_ID_PATTERN, value) is not None


_Strict = StrictModel


# ---------------------------------------------------------------------------------------------
# Loss
# ---------------------------------------------------------------------------------------------


class LossSpec(_Strict):
    """The reconstruction loss between the denoised output and the clean image."""

    type: Literal["mae", "mse", "huber", "l1_l2", "lp", "binary_crossentropy"] = Field(
        "mse",
        description=(
            "`mae` (L1), `mse` (L2), `huber` (uses `delta`), `l1_l2` (`alpha`·L1 + (1−`alpha`)·L2), "
            "`lp` (mean |e|^p, smoothed near 0), `binary_crossentropy`."
        ),
    )
    delta: float = Field(1.0, gt=0, le=100, description="Huber: where the loss turns from quadratic to linear.")
    alpha: float = Field(0.5, ge=0, le=1, description="l1_l2: weight of the L1 term.")
    p: float = Field(1.5, gt=0, le=2, description="lp: the exponent p in (0, 2].")
    epsilon: float = Field(
        1e-6, gt=0, le=1e-1, description="lp: smoothing, |e| is computed as sqrt(e² + ε²) so gradients stay finite."
    )
    level_weighting: float = Field(
        0.0,
        ge=0,
        le=MAX_LEVEL_WEIGHTING,
        description=(
            "Blind training (`noise.level` a range [min, max], min > 0): each image's loss is multiplied by "
            "(min/level)^k for its own noise level, the weights scaled to average 1 over the range. 0 (default): "
            "every image counts the same, so the most heavily corrupted ones, whose errors are largest, dominate "
            "and light noise is over-smoothed; 2 weighs Gaussian levels about equally in PSNR with `mse` (a "
            "denoiser's squared error grows about as σ²), 1 with `mae`."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Regularization
# ---------------------------------------------------------------------------------------------


class PenaltySpec(_Strict):
    """Strengths of an L1 and an L2 penalty; both set is the elastic net."""

    l1: float = Field(0.0, ge=0, le=10, description="L1 strength λ₁ ≥ 0.")
    l2: float = Field(0.0, ge=0, le=10, description="L2 strength λ₂ ≥ 0.")

    @property
    def is_zero(self) -> bool:
        return self.l1 == 0 and self.l2 == 0


class LayerGroupRegularization(_Strict):
    """Regularizers of one half (encoder or decoder) of the autoencoder."""

    kernel: PenaltySpec = Field(default_factory=PenaltySpec)
    bias: PenaltySpec = Field(default_factory=PenaltySpec)
    activity: PenaltySpec = Field(
        default_factory=PenaltySpec,
        description=(
            "Encoder: applied to the code (an activity L1 there makes a sparse autoencoder). Decoder: to its output "
            "(the denoised image)."
        ),
    )


class RegularizationSpec(_Strict):
    """Kernel, bias and activity penalties for the encoder and the decoder (the two layer groups)."""

    encoder: LayerGroupRegularization = Field(
        default_factory=LayerGroupRegularization,
        description=(
            "dense/conv: the encoder layers up to the code layer. unet: every convolution of the downsampling path "
            "and of the bottleneck (its last convolution is the code). residual: the first ceil(n/2) of its n hidden "
            "convolutions (the last of them is the code). Batch normalisations get no penalty."
        ),
    )
    decoder: LayerGroupRegularization = Field(
        default_factory=LayerGroupRegularization,
        description=(
            "dense/conv: the decoder layers and the output layer. unet: the upsampling (transposed) convolutions, "
            "the decoder convolutions and the last convolution, which predicts the noise. residual: the other "
            "hidden convolutions and the last one, which predicts the noise."
        ),
    )
    l1_method: Literal["penalty", "proximal"] = Field(
        "penalty",
        description=(
            "`penalty`: λ‖w‖₁ is added to the loss (weights get small, rarely exactly 0). `proximal`: the kernel "
            "and bias L1 is applied as soft-thresholding w ← sign(w)·max(|w| − η·λ, 0) after each step, so "
            "weights reach exactly 0. Activity L1 is always a penalty."
        ),
    )


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


class OptimizerSpec(_Strict):
    """Optimizer, learning rate and its schedule."""

    type: Literal["adam", "sgd", "rmsprop"] = "adam"
    learning_rate: float = Field(2e-3, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd: momentum; rmsprop: momentum.")
    schedule: Literal["constant", "inverse_time", "exponential", "cosine"] = Field(
        "cosine",
        description=(
            "`constant`; `inverse_time`: lr₀/(1 + decay_rate·step/decay_steps); `exponential`: "
            "lr₀·decay_rate^(step/decay_steps); `cosine`: cosine decay to 0 over the whole run."
        ),
    )
    decay_rate: float = Field(0.5, gt=0, le=100, description="inverse_time/exponential decay rate.")
    decay_steps: int = Field(1000, ge=1, le=10_000_000, description="inverse_time/exponential: steps per decay unit.")
    clipnorm: float | None = Field(None, gt=0, le=1000, description="Clip each gradient to this norm.")

    @model_validator(mode="after")
    def _exponential_decays(self) -> OptimizerSpec:
        if self.schedule == "exponential" and self.decay_rate >= 1:
            raise ValueError(
                "optimizer.decay_rate must be below 1 for an exponential schedule (it multiplies the rate). "
                f"Expected 0 < decay_rate < 1. Received: decay_rate={self.decay_rate}"
            )
        return self


# ---------------------------------------------------------------------------------------------
# The whole job
# ---------------------------------------------------------------------------------------------


class TrainingSpec(_Strict):
    """Everything a training job needs. `{}` is a valid job: a blind U-Net on Fashion-MNIST, under 300 s on 2 cores."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {  # ~20-40 s on 2 CPU cores; denoises every level of its range (bench/README.md, issue 16)
                    "name": "digits-demo",
                    "dataset": "digits",
                    "architecture": {"type": "unet", "filters": [32, 64, 128], "convs_per_level": 1},
                    "loss": {"type": "mse", "level_weighting": 2},
                    "noise": {"type": "gaussian", "level": [0.1, 0.5]},
                    "optimizer": {"learning_rate": 0.003},
                    "epochs": 24,
                    "batch_size": 32,
                }
            ]
        },
    )

    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="Model name; models with the same name get versions 1, 2, …"
    )
    dataset: str = Field(
        "fashion_mnist",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="A built-in dataset (`fashion_mnist`, `mnist`, `digits`, `natural_patches`) or an uploaded dataset id.",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    architecture: ArchitectureSpec = Field(default_factory=ArchitectureSpec)
    loss: LossSpec = Field(default_factory=LossSpec)
    regularization: RegularizationSpec = Field(default_factory=RegularizationSpec)
    noise: NoiseSpec = Field(
        # Blind by default: a client rarely knows its noise level (issue 16).
        default_factory=lambda: NoiseSpec(level=list(DEFAULT_NOISE_LEVEL)),
        description=f"The training noise. Default: gaussian, level {list(DEFAULT_NOISE_LEVEL)} (blind), clipped.",
    )
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    epochs: int = Field(DEFAULT_EPOCHS, ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(64, ge=1, le=MAX_BATCH_SIZE)
    validation_split: float = Field(0.1, ge=0, lt=0.5, description="Fraction of the training split held out for val_loss.")
    early_stopping_patience: int | None = Field(
        None, ge=1, le=MAX_EPOCHS, description="Stop after this many epochs without a better val_loss; restores the best weights."
    )
    max_runtime_s: float = Field(
        DEFAULT_MAX_RUNTIME_S,
        gt=0,
        le=MAX_RUNTIME_S,
        description=(
            "Wall-clock budget of training; it stops (keeping the best so far) when it runs out. The default keeps "
            "the default job under 5 minutes on 2 CPU cores: raise it for longer jobs."
        ),
    )
    max_train_images: int | None = Field(
        DEFAULT_MAX_TRAIN_IMAGES,
        ge=8,
        le=10_000_000,
        description="Use at most this many training images (a seeded subset); null: all of them.",
    )


    @model_validator(mode="after")
    def _cross_entropy_needs_sigmoid(self) -> TrainingSpec:
        # A linear output outside (0, 1) gets a clipped, zero-gradient cross-entropy and never learns.
        if self.loss.type == "binary_crossentropy" and self.architecture.output_activation != "sigmoid":
            raise ValueError(
                "loss.type='binary_crossentropy' compares probabilities, so the output must be a sigmoid. "
                "Expected architecture.output_activation='sigmoid' (or another loss). "
                f"Received: output_activation={self.architecture.output_activation!r}"
            )
        return self

    @model_validator(mode="after")
    def _level_weighting_needs_a_range(self) -> TrainingSpec:
        # Weights by level mean nothing for one level, and (min/level)^k is 0 for every image when min is 0.
        low, high = self.noise.level_range
        if self.loss.level_weighting > 0 and not (self.noise.is_range and 0 < low < high):
            raise ValueError(
                "loss.level_weighting weighs each image by its own noise level, so it needs a blind range. "
                "Expected noise.level a range [min, max] with 0 < min < max (or level_weighting 0). "
                f"Received: noise.level={self.noise.level!r}, level_weighting={self.loss.level_weighting:g}"
            )
        return self


def check_spec_for_images(spec: TrainingSpec, image_shape: tuple[int, ...]) -> None:
    """Check the parts of a spec that depend on the dataset's image shape (H, W, C).

    Raises InvalidSpec naming the field, the limit and the received value.
    """
    height, width = int(image_shape[0]), int(image_shape[1])
    architecture = spec.architecture
    factor = architecture.downsampling_factor
    if factor > min(height, width):
        max_depth = int(math.log2(min(height, width)))
        if architecture.type == "conv":
            raise InvalidSpec(
                f"architecture.filters has {len(architecture.filters)} stride-2 levels, which shrink "
                f"{height}x{width} images by {factor}. Expected at most {max_depth} levels for this dataset. "
                f"Received: filters={architecture.filters}"
            )
        raise InvalidSpec(
            f"architecture.filters has {len(architecture.filters)} U-Net levels, whose poolings shrink "
            f"{height}x{width} images by {factor}. Expected at most {max_depth + 1} levels for this dataset. "
            f"Received: filters={architecture.filters}"
        )


# ---------------------------------------------------------------------------------------------
# Job records
# ---------------------------------------------------------------------------------------------


class JobState(StrEnum):
    """Life cycle of a training job."""

    queued = "queued"
    running = "running"
    retrying = "retrying"
    cancelling = "cancelling"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobState.succeeded, JobState.failed, JobState.cancelled)


class EpochMetrics(BaseModel):
    """One finished epoch: what the progress hook reports and the history keeps."""

    epoch: int = Field(description="1-based epoch number.")
    epochs: int = Field(description="Epochs planned in total.")
    loss: float
    val_loss: float | None = None
    learning_rate: float
    elapsed_s: float = Field(description="Seconds since this run started training.")
    eta_s: float | None = Field(None, description="Estimated seconds to the last epoch.")
    images_per_s: float | None = None


class JobRecord(BaseModel):
    """A training job as the gateway reports it."""

    id: str
    owner: str = Field(DEFAULT_OWNER, description="Who the job belongs to: the owner of the API key that submitted it.")
    state: JobState
    spec: TrainingSpec
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    progress: EpochMetrics | None = Field(None, description="The latest finished epoch.")
    history: list[EpochMetrics] = Field(default_factory=list)
    model_id: str | None = None
    failure_reason: str | None = None
    attempts: int = 0
    lost_attempts: int = Field(
        0, description="Attempts whose worker process died (killed, out of memory); the job fails at DAE_MAX_ATTEMPTS."
    )
    worker: str | None = Field(None, description="Host name and pid of the worker that ran the last attempt.")
    resumed_from_epoch: int | None = Field(None, description="Epoch of the checkpoint the last attempt resumed from.")
    stop_reason: str | None = Field(None, description="Why training ended: completed, early_stopped, timeout, cancelled.")


# ---------------------------------------------------------------------------------------------
# Model cards
# ---------------------------------------------------------------------------------------------


class QualityRow(BaseModel):
    """Image quality of one method on the test split under one noise setting."""

    noise: str = Field(description="e.g. `gaussian:0.3`.")
    method: str = Field(description="`noisy`, `model`, `tv`, `nl_means`.")
    psnr: float
    ssim: float
    l1: float
    mse: float
    images: int | None = Field(
        None, description="How many test images the row averages over (classical baselines use a subset to stay fast)."
    )


class LayerSparsity(BaseModel):
    """How sparse one layer's kernel is."""

    layer: str
    weights: int
    zero_fraction: float = Field(description="Fraction of kernel weights exactly 0.")
    near_zero_fraction: float = Field(description="Fraction of kernel weights with |w| < 1e-6.")
    l1_norm: float
    l2_norm: float


class SparsityReport(BaseModel):
    """Sparsity of the kernels and of the code."""

    layers: list[LayerSparsity]
    code_zero_fraction: float = Field(description="Mean fraction of exactly-zero code activations on test images.")


class TrainedNoise(BaseModel):
    """The noise a model was trained for, always as a range (a single training level has min_level == max_level)."""

    type: Literal["gaussian", "salt_pepper", "masking", "speckle"]
    min_level: float = Field(description="Lowest training level (stddev for gaussian/speckle, fraction otherwise).")
    max_level: float = Field(description="Highest training level.")
    blind: bool = Field(
        description="True when every training image drew its own level from [min_level, max_level] (spec.noise.level "
        "was a range): one model for any level in it, no level to pass at inference."
    )
    clip: bool

    @classmethod
    def from_spec(cls, noise: NoiseSpec) -> TrainedNoise:
        low, high = noise.level_range
        return cls(type=noise.type, min_level=low, max_level=high, blind=noise.is_range, clip=noise.clip)


class ModelCard(BaseModel):
    """Everything a user needs to know about a stored model; `card.json` holds it."""

    id: str
    name: str
    version: int
    owner: str = Field(DEFAULT_OWNER, description="Who the model belongs to (its job's owner); names and versions are per owner.")
    job_id: str | None = None
    created_at: datetime
    spec: TrainingSpec
    input_shape: list[int | None] = Field(description="(H, W, C); H and W are null for conv models (any size).")
    trained_shape: list[int] = Field(description="(H, W, C) of the training images.")
    parameters: int
    history: list[EpochMetrics] = Field(default_factory=list)
    stop_reason: str = "completed"
    evaluation: list[QualityRow] = Field(default_factory=list)
    sparsity: SparsityReport | None = None
    dataset: dict[str, Any] = Field(default_factory=dict, description="id, fingerprint (sha256), train/test counts.")
    library_versions: dict[str, str] = Field(default_factory=dict)
    training_seconds: float | None = None
    onnx_max_abs_diff: float | None = Field(None, description="Max |ONNX − Keras| on the export check.")

    @computed_field(  # type: ignore[prop-decorator]  # pydantic's documented form; mypy rejects decorated properties
        description="The noise the model was trained for, from spec.noise: type and level range (derived, read-only)."
    )
    @property
    def trained_noise(self) -> TrainedNoise:
        return TrainedNoise.from_spec(self.spec.noise)


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class DatasetInfo(BaseModel):
    """A dataset the service can train on: built-in or uploaded."""

    id: str
    builtin: bool
    owner: str | None = Field(None, description="The owner of the key that uploaded it; null for built-in datasets (everyone's).")
    description: str = ""
    count: int | None = Field(None, description="Number of images (train + test); None when not yet known (online datasets).")
    shape: list[int] = Field(description="(H, W, C) of one image.")
    available: bool = Field(True, description="False for online-only datasets on a machine that has no cached copy.")
    created_at: datetime | None = None
    filename: str | None = None
    fingerprint: str | None = None
