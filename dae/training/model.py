"""The trained model: a functional `keras.Model` subclass whose `train_step` adds the proximal L1 step.

`DenoisingAutoencoder` keeps the functional graph `dae.models.build_autoencoder` makes (same layers, names and
weights) and overrides only `train_step`, as in keras-io's "Customizing what happens in fit()" for TensorFlow:
forward pass, loss (reconstruction + regularization penalties), gradients, optimizer step, then, when the spec
asks for `l1_method="proximal"`, soft-thresholding with the learning rate of the step just taken (dae/proximal.py).
The loss metric is weighted by batch size, so an epoch's `loss` is the mean over its images.

The proximal step is not part of the saved file: it follows from the spec, and `attach_proximal_step` sets it on
a fresh model and on one loaded from a checkpoint alike. Loading a saved `DenoisingAutoencoder` (`.keras`,
safe_mode=True) needs this module imported (`import dae.training`), as its layers need `dae.models`.
"""

# mypy: disallow-subclassing-any=False
# (keras ships no type information, so its classes are Any to mypy)

from __future__ import annotations

from typing import Any

import keras
import tensorflow as tf
from typing_extensions import override

from dae.losses import build_loss
from dae.models import build_autoencoder
from dae.proximal import ProximalL1Step
from dae.spec import OptimizerSpec, TrainingSpec

#: XLA-compile the train step? Measured on 2 CPU cores, default conv DAE, batch 128: ~950 images/s without XLA,
#: ~400 with it. Off (Keras' "auto" would turn it on where a GPU is present, changing the numbers).
JIT_COMPILE = False


@keras.saving.register_keras_serializable(package="dae")
class DenoisingAutoencoder(keras.Model):
    """A functional autoencoder whose train step is an optimizer step followed by the proximal L1 step (if any)."""

    proximal_step: ProximalL1Step | None = None

    def attach_proximal_step(self, step: ProximalL1Step | None) -> None:
        """Soft-threshold after every optimizer step (None or an empty step: plain training)."""
        # Set before fit() traces train_step; a Python attribute, so the traced graph holds the targets.
        self.proximal_step = step if step else None

    @override
    def train_step(self, data: Any) -> dict[str, Any]:
        """One batch: the optimizer step on loss + penalties, then w ← sign(w)·max(|w| − η·λ, 0) on the targets."""
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
        trainable_variables = self.trainable_variables
        gradients = tape.gradient(loss, trainable_variables)
        # The rate of this step: read before apply() advances the schedule's step counter.
        learning_rate = self.optimizer.learning_rate
        self.optimizer.apply(gradients, trainable_variables)
        if self.proximal_step is not None:
            self.proximal_step(learning_rate)
        batch_size = keras.ops.shape(y_pred)[0]
        for metric in self.metrics:
            if metric.name == "loss":  # weighted by images: a short last batch counts for what it holds
                metric.update_state(loss, sample_weight=batch_size)
        results: dict[str, Any] = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return results


def build_training_model(spec: TrainingSpec, image_shape: tuple[int, int, int]) -> DenoisingAutoencoder:
    """The (uncompiled) autoencoder of `spec` as a DenoisingAutoencoder, its proximal step attached."""
    network = build_autoencoder(spec, image_shape)
    model = DenoisingAutoencoder(inputs=network.input, outputs=network.output, name=network.name)
    model.attach_proximal_step(ProximalL1Step.for_model(model, spec.regularization))
    return model


def build_learning_rate(
    optimizer_spec: OptimizerSpec, total_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The learning rate, or its schedule over optimizer steps (`cosine` decays to 0 over `total_steps`)."""
    initial = optimizer_spec.learning_rate
    schedules = keras.optimizers.schedules
    if optimizer_spec.schedule == "constant":
        return initial
    if optimizer_spec.schedule == "inverse_time":
        return schedules.InverseTimeDecay(initial, optimizer_spec.decay_steps, optimizer_spec.decay_rate)
    if optimizer_spec.schedule == "exponential":
        return schedules.ExponentialDecay(initial, optimizer_spec.decay_steps, optimizer_spec.decay_rate)
    if optimizer_spec.schedule == "cosine":
        return schedules.CosineDecay(initial, decay_steps=max(1, total_steps), alpha=0.0)
    raise ValueError(
        "Unknown learning-rate schedule. Expected one of constant, inverse_time, exponential, cosine. "
        f"Received: schedule={optimizer_spec.schedule!r}"
    )


def build_optimizer(optimizer_spec: OptimizerSpec, total_steps: int) -> keras.optimizers.Optimizer:
    """The Keras optimizer of the spec (with its schedule and clipnorm)."""
    learning_rate = build_learning_rate(optimizer_spec, total_steps)
    clipnorm = optimizer_spec.clipnorm or None
    if optimizer_spec.type == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, clipnorm=clipnorm)
    if optimizer_spec.type == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=optimizer_spec.momentum, clipnorm=clipnorm)
    if optimizer_spec.type == "rmsprop":
        return keras.optimizers.RMSprop(
            learning_rate=learning_rate, momentum=optimizer_spec.momentum, clipnorm=clipnorm
        )
    raise ValueError(
        f"Unknown optimizer. Expected one of adam, sgd, rmsprop. Received: optimizer.type={optimizer_spec.type!r}"
    )


def compile_for_training(model: keras.Model, spec: TrainingSpec, total_steps: int) -> None:
    """Compile with the spec's optimizer (schedule over `total_steps`) and loss; build the optimizer's state."""
    model.compile(
        optimizer=build_optimizer(spec.optimizer, total_steps), loss=build_loss(spec.loss), jit_compile=JIT_COMPILE
    )
    model.optimizer.build(model.trainable_variables)


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer's next step will use."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
