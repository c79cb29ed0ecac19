"""Exact-sparsity L1: soft-thresholding after each optimizer step (proximal gradient).

With `regularization.l1_method="proximal"`, the kernel/bias L1 strength λ of a layer group is not added to the
loss; instead, after every optimizer step, each such weight becomes

    w ← sign(w) · max(|w| − η·λ, 0)

with η the learning rate of that step (from the schedule). Weights whose gradient cannot hold them away from
zero land exactly on 0, which a penalty (whose subgradient only makes them oscillate around 0) never does.

The step is stateless (it depends on the weights and the step's learning rate only), so a checkpoint of the
weights and the optimizer is all a resumed run needs. `DenoisingAutoencoder.train_step` (dae/training/model.py)
calls it right after the optimizer step, inside fit()'s compiled train function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from dae.models import layers_in_group
from dae.spec import RegularizationSpec


def soft_threshold(values: Any, threshold: Any) -> Any:
    """sign(x) · max(|x| − threshold, 0), elementwise."""
    values = ops.convert_to_tensor(values)
    threshold = ops.cast(threshold, values.dtype)
    return ops.sign(values) * ops.maximum(ops.abs(values) - threshold, ops.zeros_like(values))


@dataclass(frozen=True)
class ProximalTarget:
    """One weight tensor and the L1 strength λ its soft-thresholding uses."""

    variable: keras.Variable
    strength: float


def proximal_targets(model: keras.Model, regularization: RegularizationSpec) -> list[ProximalTarget]:
    """The kernels and biases to soft-threshold: those of the groups whose spec has l1 > 0 (proximal mode only)."""
    if regularization.l1_method != "proximal":
        return []
    targets: list[ProximalTarget] = []
    for group in ("encoder", "decoder"):
        group_spec = regularization.encoder if group == "encoder" else regularization.decoder
        for layer in layers_in_group(model, group):
            kernel = getattr(layer, "kernel", None)
            bias = getattr(layer, "bias", None)
            if group_spec.kernel.l1 > 0 and kernel is not None:
                targets.append(ProximalTarget(kernel, group_spec.kernel.l1))
            if group_spec.bias.l1 > 0 and bias is not None:
                targets.append(ProximalTarget(bias, group_spec.bias.l1))
    return targets


class ProximalL1Step:
    """Soft-thresholds the target weights by η·λ; call it right after `optimizer.apply` (eagerly or in a graph)."""

    def __init__(self, targets: list[ProximalTarget]) -> None:
        self.targets = list(targets)

    @classmethod
    def for_model(cls, model: keras.Model, regularization: RegularizationSpec) -> ProximalL1Step:
        """The step for a model built from a spec with this regularization."""
        return cls(proximal_targets(model, regularization))

    def __bool__(self) -> bool:
        return bool(self.targets)

    def __call__(self, learning_rate: Any) -> None:
        """Apply one soft-thresholding with the learning rate η of the step just taken."""
        for target in self.targets:
            target.variable.assign(soft_threshold(target.variable, learning_rate * target.strength))
