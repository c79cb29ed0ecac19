"""Reconstruction losses between the denoised output and the clean image, Keras-serializable.

Every loss returns, per image, the mean over all pixels and channels; Keras then averages over the batch.
There is deliberately no signed "L1" (mean of e): it is unbounded below and rewards predicting +inf.
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from dae.spec import LossSpec

_REDUCTION = "sum_over_batch_size"


def _mean_per_image(values: Any) -> Any:
    """Mean over every axis but the batch axis."""
    return ops.mean(values, axis=tuple(range(1, len(values.shape))))


def _error(y_true: Any, y_pred: Any) -> Any:
    y_pred = ops.convert_to_tensor(y_pred)
    y_true = ops.cast(y_true, y_pred.dtype)
    return y_pred - y_true


class _ReconstructionLoss(keras.losses.Loss):
    """Base: a named loss averaged over the batch (subclasses add their parameters to `get_config`)."""

    def __init__(self, name: str, reduction: str = _REDUCTION, dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="dae")
class L1Loss(_ReconstructionLoss):
    """Mean absolute error (L1): mean |ŷ − y|."""

    def __init__(self, name: str = "l1", reduction: str = _REDUCTION, dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(ops.abs(_error(y_true, y_pred)))


@keras.saving.register_keras_serializable(package="dae")
class L2Loss(_ReconstructionLoss):
    """Mean squared error (L2): mean (ŷ − y)²."""

    def __init__(self, name: str = "l2", reduction: str = _REDUCTION, dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(ops.square(_error(y_true, y_pred)))


@keras.saving.register_keras_serializable(package="dae")
class HuberLoss(_ReconstructionLoss):
    """Huber loss: ½e² where |e| ≤ δ, δ(|e| − ½δ) beyond."""

    def __init__(self, delta: float = 1.0, name: str = "huber", reduction: str = _REDUCTION, dtype: Any = None) -> None:
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(f"HuberLoss needs a positive delta. Expected delta > 0. Received: delta={delta}")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.delta = float(delta)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        absolute = ops.abs(_error(y_true, y_pred))
        delta = ops.cast(self.delta, absolute.dtype)
        quadratic = ops.minimum(absolute, delta)
        linear = absolute - quadratic
        # ½q² + δ·l equals ½e² inside [−δ, δ] and δ(|e| − ½δ) outside, with no branch.
        return _mean_per_image(0.5 * ops.square(quadratic) + delta * linear)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "delta": self.delta}


@keras.saving.register_keras_serializable(package="dae")
class L1L2Loss(_ReconstructionLoss):
    """Mix of the two: α·mean |e| + (1 − α)·mean e²."""

    def __init__(self, alpha: float = 0.5, name: str = "l1_l2", reduction: str = _REDUCTION, dtype: Any = None) -> None:
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(
                f"L1L2Loss mixes L1 and L2 with a weight alpha. Expected 0 <= alpha <= 1. Received: alpha={alpha}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = float(alpha)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        error = _error(y_true, y_pred)
        return _mean_per_image(self.alpha * ops.abs(error) + (1.0 - self.alpha) * ops.square(error))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="dae")
class LpLoss(_ReconstructionLoss):
    """Mean |e|^p with |e| smoothed as sqrt(e² + ε²), so the gradient stays finite at e = 0 even for p < 1."""

    def __init__(
        self, p: float = 1.5, epsilon: float = 1e-6, name: str = "lp", reduction: str = _REDUCTION, dtype: Any = None
    ) -> None:
        if not (0.0 < p <= 2.0):
            raise ValueError(f"LpLoss needs an exponent p in (0, 2]. Expected 0 < p <= 2. Received: p={p}")
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(
                f"LpLoss needs a positive smoothing epsilon. Expected epsilon > 0. Received: epsilon={epsilon}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.p = float(p)
        self.epsilon = float(epsilon)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        error = _error(y_true, y_pred)
        smoothed_square = ops.square(error) + self.epsilon**2
        return _mean_per_image(ops.power(smoothed_square, self.p / 2.0))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


@keras.saving.register_keras_serializable(package="dae")
class BinaryCrossentropyLoss(_ReconstructionLoss):
    """Pixel-wise binary cross-entropy; the target is the clean intensity in [0, 1], the output a probability.

    Used with a sigmoid output: Keras then computes it from the sigmoid's logits, which is numerically stable.
    """

    def __init__(self, name: str = "binary_crossentropy", reduction: str = _REDUCTION, dtype: Any = None) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        return _mean_per_image(ops.binary_crossentropy(y_true, y_pred, from_logits=False))


def build_loss(loss_spec: LossSpec) -> keras.losses.Loss:
    """The loss object a `LossSpec` describes."""
    if loss_spec.type == "mae":
        return L1Loss()
    if loss_spec.type == "mse":
        return L2Loss()
    if loss_spec.type == "huber":
        return HuberLoss(delta=loss_spec.delta)
    if loss_spec.type == "l1_l2":
        return L1L2Loss(alpha=loss_spec.alpha)
    if loss_spec.type == "lp":
        return LpLoss(p=loss_spec.p, epsilon=loss_spec.epsilon)
    if loss_spec.type == "binary_crossentropy":
        return BinaryCrossentropyLoss()
    raise ValueError(
        "Unknown loss type. Expected one of mae, mse, huber, l1_l2, lp, binary_crossentropy. "
        f"Received: loss.type={loss_spec.type!r}"
    )

