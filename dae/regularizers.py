"""Kernel, bias and activity regularizers built from a `RegularizationSpec`, Keras-serializable.

`ElasticNet(l1, l2)` adds l1·Σ|x| + l2·Σx² (the elastic net when both are set). With
`l1_method="proximal"` the kernel and bias L1 is not a penalty at all: it is applied as soft-thresholding after
each optimizer step (dae/proximal.py), so only their L2 part stays here. Activity L1 is always a penalty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import keras
from keras import ops

from dae.spec import PenaltySpec, RegularizationSpec

LayerGroup = Literal["encoder", "decoder"]


@keras.saving.register_keras_serializable(package="dae")
class ElasticNet(keras.regularizers.Regularizer):
    """Penalty l1·Σ|x| + l2·Σx²; either strength may be 0."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0) -> None:
        for field_name, value in (("l1", l1), ("l2", l2)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"ElasticNet strengths must be finite and non-negative. Expected {field_name} >= 0. "
                    f"Received: {field_name}={value}"
                )
        self.l1 = float(l1)
        self.l2 = float(l2)

    def __call__(self, x: Any) -> Any:
        penalty = ops.convert_to_tensor(0.0, dtype=x.dtype)
        if self.l1:
            penalty = penalty + self.l1 * ops.sum(ops.abs(x))
        if self.l2:
            penalty = penalty + self.l2 * ops.sum(ops.square(x))
        return penalty

    def get_config(self) -> dict[str, float]:
        return {"l1": self.l1, "l2": self.l2}


def build_regularizer(penalty: PenaltySpec, *, include_l1: bool = True) -> ElasticNet | None:
    """The regularizer for one penalty spec, or None when it adds nothing.

    `include_l1=False` drops the L1 part (it is then applied by the proximal step instead).
    """
    l1 = penalty.l1 if include_l1 else 0.0
    if l1 == 0 and penalty.l2 == 0:
        return None
    return ElasticNet(l1=l1, l2=penalty.l2)


@dataclass(frozen=True)
class GroupRegularizers:
    """The three regularizers of one half of the autoencoder (None where nothing applies)."""

    kernel: ElasticNet | None
    bias: ElasticNet | None
    activity: ElasticNet | None


def build_group_regularizers(spec: RegularizationSpec, group: LayerGroup) -> GroupRegularizers:
    """Regularizers for the encoder or the decoder, honouring `l1_method` for kernels and biases."""
    if group not in ("encoder", "decoder"):
        raise ValueError(f"Unknown layer group. Expected 'encoder' or 'decoder'. Received: group={group!r}")
    group_spec = spec.encoder if group == "encoder" else spec.decoder
    weight_l1_as_penalty = spec.l1_method == "penalty"
    return GroupRegularizers(
        kernel=build_regularizer(group_spec.kernel, include_l1=weight_l1_as_penalty),
        bias=build_regularizer(group_spec.bias, include_l1=weight_l1_as_penalty),
        activity=build_regularizer(group_spec.activity, include_l1=True),
    )
