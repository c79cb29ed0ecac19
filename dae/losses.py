"""Reconstruction losses between the denoised output and the clean image, Keras-serializable.

Every loss returns, per image, the mean over all pixels and channels; Keras then averages over the batch.
MAE, MSE, Huber and binary cross-entropy are Keras' built-ins (which average the last axis only), averaged over
the rest of each image here; the L1+L2 mix and Lp have no built-in and are registered functions with a thin `Loss`
class each. The class names are those older `.keras` files refer to (`dae>L1Loss`, ...), so they still load.
There is deliberately no signed "L1" (mean of e): it is unbounded below and rewards predicting +inf.
"""

# mypy: disallow-subclassing-any=False
# (keras ships no type information, so its classes are Any to mypy)

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


def l1_l2_error(y_true: Any, y_pred: Any, alpha: float = 0.5) -> Any:
    """Mix of the absolute and the squared error, per image.

    Formula:

    ```python
    loss = alpha * mean(abs(y_pred - y_true)) + (1 - alpha) * mean(square(y_pred - y_true))
    ```

    Args:
        y_true: clean images (N, H, W, C).
        y_pred: denoised images, the same shape.
        alpha: weight of the absolute error, in [0, 1].

    Returns:
        One value per image, shape (N,).
    """
    error = _error(y_true, y_pred)
    return _mean_per_image(alpha * ops.abs(error) + (1.0 - alpha) * ops.square(error))


def lp_error(y_true: Any, y_pred: Any, p: float = 1.5, epsilon: float = 1e-6) -> Any:
    """Mean p-th power of the error, |e| smoothed so the gradient stays finite at e = 0 even for p < 1.

    Formula:

    ```python
    loss = mean((square(y_pred - y_true) + epsilon**2) ** (p / 2))
    ```

    Args:
        y_true: clean images (N, H, W, C).
        y_pred: denoised images, the same shape.
        p: the exponent, in (0, 2].
        epsilon: the smoothing, > 0.

    Returns:
        One value per image, shape (N,).
    """
    error = _error(y_true, y_pred)
    return _mean_per_image(ops.power(ops.square(error) + epsilon**2, p / 2.0))


# Registered as calls, not decorators, so the functions keep their signatures for the type checker.
keras.saving.register_keras_serializable(package="dae")(l1_l2_error)
keras.saving.register_keras_serializable(package="dae")(lp_error)


@keras.saving.register_keras_serializable(package="dae")
class L1Loss(keras.losses.MeanAbsoluteError):
    """Mean absolute error (L1) per image: Keras' MeanAbsoluteError averaged over H and W too.

    Formula: `loss = mean(abs(y_pred - y_true))` over each image's pixels and channels.

    Args:
        reduction, name, dtype: as for `keras.losses.Loss`.
    """

    def __init__(self, reduction: str | None = _REDUCTION, name: str = "l1", dtype: Any = None) -> None:
        super().__init__(reduction=reduction, name=name, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(super().call(y_true, y_pred))


@keras.saving.register_keras_serializable(package="dae")
class L2Loss(keras.losses.MeanSquaredError):
    """Mean squared error (L2) per image: Keras' MeanSquaredError averaged over H and W too.

    Formula: `loss = mean(square(y_pred - y_true))` over each image's pixels and channels.

    Args:
        reduction, name, dtype: as for `keras.losses.Loss`.
    """

    def __init__(self, reduction: str | None = _REDUCTION, name: str = "l2", dtype: Any = None) -> None:
        super().__init__(reduction=reduction, name=name, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(super().call(y_true, y_pred))


@keras.saving.register_keras_serializable(package="dae")
class HuberLoss(keras.losses.Huber):
    """Huber loss per image: Keras' Huber averaged over H and W too; `delta` is validated and kept in the config
    (Keras' own Huber leaves it out of `get_config`).

    Formula: `0.5 * e**2` where `|e| <= delta`, `delta * |e| - 0.5 * delta**2` beyond, averaged per image.

    Args:
        delta: where the quadratic part turns linear, > 0.
        reduction, name, dtype: as for `keras.losses.Loss`.
    """

    def __init__(
        self, delta: float = 1.0, reduction: str | None = _REDUCTION, name: str = "huber", dtype: Any = None
    ) -> None:
        if not (math.isfinite(delta) and delta > 0):
            raise ValueError(f"HuberLoss needs a positive delta. Expected delta > 0. Received: delta={delta}")
        super().__init__(delta=float(delta), reduction=reduction, name=name, dtype=dtype)
        self.delta = float(delta)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(super().call(y_true, y_pred))

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "delta": self.delta}


@keras.saving.register_keras_serializable(package="dae")
class BinaryCrossentropyLoss(keras.losses.BinaryCrossentropy):
    """Pixel-wise binary cross-entropy per image; the target is the clean intensity in [0, 1], the output a
    probability. Used with a sigmoid output: Keras then computes it from the sigmoid's logits (numerically stable).

    Formula: `loss = mean(-(y * log(p) + (1 - y) * log(1 - p)))` over each image's pixels and channels.

    Args:
        reduction, name, dtype: as for `keras.losses.Loss` (no logits input, no label smoothing).
    """

    def __init__(
        self, reduction: str | None = _REDUCTION, name: str = "binary_crossentropy", dtype: Any = None
    ) -> None:
        super().__init__(from_logits=False, reduction=reduction, name=name, dtype=dtype)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return _mean_per_image(super().call(y_true, y_pred))

    def get_config(self) -> dict[str, Any]:
        config: dict[str, Any] = keras.losses.Loss.get_config(
            self
        )  # the fixed from_logits/label_smoothing/axis are not arguments
        return config


@keras.saving.register_keras_serializable(package="dae")
class L1L2Loss(keras.losses.Loss):
    """`l1_l2_error` as a Loss.

    Args:
        alpha: weight of the absolute error, in [0, 1].
        reduction, name, dtype: as for `keras.losses.Loss`.
    """

    def __init__(
        self, alpha: float = 0.5, reduction: str | None = _REDUCTION, name: str = "l1_l2", dtype: Any = None
    ) -> None:
        if not (0.0 <= alpha <= 1.0):
            raise ValueError(
                f"L1L2Loss mixes L1 and L2 with a weight alpha. Expected 0 <= alpha <= 1. Received: alpha={alpha}"
            )
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.alpha = float(alpha)

    def call(self, y_true: Any, y_pred: Any) -> Any:
        return l1_l2_error(y_true, y_pred, alpha=self.alpha)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "alpha": self.alpha}


@keras.saving.register_keras_serializable(package="dae")
class LpLoss(keras.losses.Loss):
    """`lp_error` as a Loss.

    Args:
        p: the exponent, in (0, 2].
        epsilon: the smoothing of |e|, > 0.
        reduction, name, dtype: as for `keras.losses.Loss`.
    """

    def __init__(
        self,
        p: float = 1.5,
        epsilon: float = 1e-6,
        reduction: str | None = _REDUCTION,
        name: str = "lp",
        dtype: Any = None,
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
        return lp_error(y_true, y_pred, p=self.p, epsilon=self.epsilon)

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "p": self.p, "epsilon": self.epsilon}


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


def level_weights(levels: Any, level_range: tuple[float, float], power: float) -> Any:
    """Per-image loss weights (min/level)^power for images noised at `levels` (NumPy or TensorFlow), scaled so
    that they average 1 over levels drawn uniformly from `level_range` = (min, max), 0 < min < max.

    Formula (the scale is the mean of (min/σ)^k for σ uniform on [a, b]):
        a^k · (b^(1−k) − a^(1−k)) / ((1 − k)(b − a)), or a · ln(b/a) / (b − a) for k = 1.
    """
    low, high = level_range
    if power == 1:
        mean_weight = low * math.log(high / low) / (high - low)
    else:
        mean_weight = low**power * (high ** (1 - power) - low ** (1 - power)) / ((1 - power) * (high - low))
    return (low / levels) ** power / mean_weight
