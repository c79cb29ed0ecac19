"""Kernel, bias and activity regularizers built from a `RegularizationSpec`: Keras' `L1L2`.

`L1L2(l1, l2)` adds l1·Σ|x| + l2·Σx² (the elastic net when both are set). With `l1_method="proximal"` the kernel
and bias L1 is not a penalty at all: it is applied as soft-thresholding after each optimizer step
(dae/proximal.py), so only their L2 part stays here. Activity L1 is always a penalty.

`ElasticNet` is the name of the custom class this module defined before, with the same formula and config
({"l1", "l2"}): it is now an alias of `keras.regularizers.L1L2`, and `dae>ElasticNet` stays registered as a custom
object, so `.keras` files that refer to it still load (as L1L2). New files refer to the built-in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import keras

from dae.spec import PenaltySpec, RegularizationSpec

LayerGroup = Literal["encoder", "decoder"]


ElasticNet = keras.regularizers.L1L2
# The registered name of the former custom class, for files saved before it became the built-in.
keras.saving.get_custom_objects()["dae>ElasticNet"] = keras.regularizers.L1L2


def build_regularizer(penalty: PenaltySpec, *, include_l1: bool = True) -> keras.regularizers.L1L2 | None:
    """The regularizer for one penalty spec, or None when it adds nothing.

    `include_l1=False` drops the L1 part (it is then applied by the proximal step instead).
    """
    l1 = penalty.l1 if include_l1 else 0.0
    if l1 == 0 and penalty.l2 == 0:
        return None
    return keras.regularizers.L1L2(l1=l1, l2=penalty.l2)


@dataclass(frozen=True)
class GroupRegularizers:
    """The three regularizers of one half of the autoencoder (None where nothing applies)."""

    kernel: keras.regularizers.L1L2 | None
    bias: keras.regularizers.L1L2 | None
    activity: keras.regularizers.L1L2 | None


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
