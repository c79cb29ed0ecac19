"""fit_autoencoder(): a whole training run, with hooks for progress, cancellation and checkpoints.

The loop is a compiled train step driven from Python (not `model.fit`), so that the proximal L1 step, the
cancellation poll, the time budget and the per-epoch checkpoint sit exactly where they belong:

- Data: the training images are held once as a tensor; each epoch a `tf.data` pipeline gathers a seeded
  permutation batch by batch and corrupts each batch on the fly with stateless noise seeded by
  (seed, epoch, batch). Nothing is copied per epoch, and a resumed run sees the very batches an uninterrupted run
  would. Pairs are (noisy, clean). Conv models pad/crop inside the model (see dae/models.py), so images of any
  H, W go in unchanged.
- Validation: a seeded split of the training images, corrupted once with fixed noise, so val_loss is comparable
  across epochs. `loss` and `val_loss` are both the training objective (reconstruction + regularization).
- Checkpoints (hooks.checkpoint_dir, after every epoch): `model-NNNN.keras` (weights + optimizer state) and
  `state.json` (epoch, history, early-stopping state, seconds trained), each written atomically; state.json is
  the commit point. A run finding a checkpoint resumes at the next epoch with the optimizer state intact.
- Best weights: with early_stopping_patience set, the best epoch's weights (by val_loss, else loss) are restored
  at the end; on a timeout, the better of the current and the best weights is kept.
- Failures: a NaN/inf loss, or a model whose output no longer depends on its input (a constant image, or the same
  image for every input: checked on validation images after training), raise TrainingFailed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
import tensorflow as tf

from dae.errors import TrainingFailed
from dae.losses import build_loss
from dae.models import build_autoencoder
from dae.noise import add_noise, add_noise_tf
from dae.proximal import ProximalL1Step
from dae.spec import EpochMetrics, OptimizerSpec, TrainingSpec, check_spec_for_images

if TYPE_CHECKING:
    from dae.data import DatasetSplits
    from dae.store import ModelStore

logger = logging.getLogger(__name__)

#: How often (seconds, at most) should_cancel and the running loss are checked between batches.
CANCEL_POLL_INTERVAL_S = 0.5
VALIDATION_BATCH_SIZE = 512
#: Images used by the collapse check after training.
COLLAPSE_CHECK_IMAGES = 256
#: The output counts as collapsed when its spread (within images, or across images) is below this fraction of the
#: clean images' spread.
COLLAPSE_STD_RATIO = 0.02
CHECKPOINT_STATE_FILE = "state.json"
#: XLA-compile the train step? Measured on 2 CPU cores, default conv DAE, batch 128: ~950 images/s without XLA,
#: ~400 with it. Off.
JIT_COMPILE = False
_CHECKPOINT_FORMAT = 1
_VALIDATION_NOISE_STREAM = 0x7A1
_SPLIT_STREAM = 0x5A11


@dataclass
class TrainingHooks:
    """Callbacks of a run: progress per epoch, cooperative cancellation, checkpoint directories.

    Checkpoints are written into `checkpoint_dir`; a run resumes from `resume_dir` (default: `checkpoint_dir`), so
    that each attempt of a job can write its own directory and still continue from an earlier attempt's.
    """

    on_epoch: Callable[[EpochMetrics], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    checkpoint_dir: Path | None = None
    resume_dir: Path | None = None


@dataclass
class TrainingResult:
    """What a run produced; `history` holds every epoch, including those trained before a resume."""

    model: keras.Model
    history: list[EpochMetrics]
    stop_reason: str
    epochs_completed: int
    resumed_from_epoch: int | None
    training_seconds: float
    data: DatasetSplits


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


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
    clipping = {"clipnorm": optimizer_spec.clipnorm} if optimizer_spec.clipnorm else {}
    if optimizer_spec.type == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate, **clipping)
    if optimizer_spec.type == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=optimizer_spec.momentum, **clipping)
    if optimizer_spec.type == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=optimizer_spec.momentum, **clipping)
    raise ValueError(
        f"Unknown optimizer. Expected one of adam, sgd, rmsprop. Received: optimizer.type={optimizer_spec.type!r}"
    )


def current_learning_rate(optimizer: keras.optimizers.Optimizer) -> float:
    """The learning rate the optimizer's next step will use."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def split_train_validation(count: int, validation_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train indices, validation indices); at least one image always stays for training."""
    if count < 1:
        raise ValueError(f"Training needs images. Expected at least 1 training image. Received: count={count}")
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(count)
    validation_count = int(round(count * validation_split))
    if validation_split > 0 and count >= 2:
        validation_count = min(max(validation_count, 1), count - 1)
    else:
        validation_count = 0
    return np.sort(order[validation_count:]), np.sort(order[:validation_count])


class NoisyBatches:
    """Per-epoch tf.data pipelines of (noisy, clean) batches over a fixed set of training images."""

    def __init__(self, images: np.ndarray, batch_size: int, noise_spec: Any, seed: int) -> None:
        # One tensor copy of the training images for the whole run; batches gather from it.
        self.images = tf.convert_to_tensor(images, dtype=tf.float32)
        self.count = int(images.shape[0])
        self.batch_size = int(batch_size)
        self.noise_spec = noise_spec
        self.seed = int(seed)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def epoch(self, epoch: int) -> tf.data.Dataset:
        """The batches of epoch `epoch` (1-based): shuffled and corrupted, deterministic for (seed, epoch)."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.count).astype(np.int64)
        images, noise_spec = self.images, self.noise_spec
        seed_high = tf.constant(self.seed, dtype=tf.int64)
        epoch_base = tf.constant(epoch * 1_000_003, dtype=tf.int64)

        def make_pair(batch_index: tf.Tensor, indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            clean = tf.gather(images, indices)
            noise_seed = tf.stack([seed_high, epoch_base + batch_index])
            return add_noise_tf(clean, noise_spec, noise_seed), clean

        dataset = tf.data.Dataset.from_tensor_slices(order).batch(self.batch_size).enumerate()
        return dataset.map(make_pair, num_parallel_calls=1).prefetch(2)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def spec_fingerprint(spec: TrainingSpec) -> str:
    """sha256 of the spec's JSON: a checkpoint only resumes the very same spec."""
    return hashlib.sha256(spec.model_dump_json().encode()).hexdigest()


def _write_json_atomically(path: Path, payload: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(payload, indent=1))
    os.replace(temporary, path)


def _save_model_atomically(model: keras.Model, path: Path) -> None:
    temporary = path.with_name(f".tmp-{path.name}")  # keeps the .keras suffix Keras insists on
    model.save(temporary)
    os.replace(temporary, path)


@dataclass
class RunState:
    """Everything besides the model file that a resumed run needs; serialized to state.json."""

    spec_fingerprint: str
    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    training_seconds: float = 0.0
    best_monitor: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    stop_reason: str | None = None
    model_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": _CHECKPOINT_FORMAT,
            "spec_fingerprint": self.spec_fingerprint,
            "epoch": self.epoch,
            "history": [metrics.model_dump() for metrics in self.history],
            "training_seconds": self.training_seconds,
            "best_monitor": self.best_monitor,
            "best_epoch": self.best_epoch,
            "epochs_since_best": self.epochs_since_best,
            "stop_reason": self.stop_reason,
            "model_file": self.model_file,
        }

    @classmethod
    def from_json(cls, payload: dict[str, Any]) -> RunState:
        if payload.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(
                f"Expected checkpoint format {_CHECKPOINT_FORMAT}. Received: format={payload.get('format')!r}"
            )
        return cls(
            spec_fingerprint=str(payload["spec_fingerprint"]),
            epoch=int(payload["epoch"]),
            history=[EpochMetrics.model_validate(item) for item in payload["history"]],
            training_seconds=float(payload["training_seconds"]),
            best_monitor=payload["best_monitor"],
            best_epoch=payload["best_epoch"],
            epochs_since_best=int(payload["epochs_since_best"]),
            stop_reason=payload["stop_reason"],
            model_file=payload["model_file"],
        )


def _model_file_name(epoch: int) -> str:
    return f"model-{epoch:04d}.keras"


def write_checkpoint(directory: Path, model: keras.Model, state: RunState) -> None:
    """Save the model (with optimizer state) for `state.epoch`, then commit state.json; prune older models.

    The best epoch's model file is kept too, so a resumed run can still restore the best weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state.model_file = _model_file_name(state.epoch)
    _save_model_atomically(model, directory / state.model_file)
    _write_json_atomically(directory / CHECKPOINT_STATE_FILE, state.to_json())
    keep = {state.model_file}
    if state.best_epoch is not None:
        keep.add(_model_file_name(state.best_epoch))
    for stale in directory.glob("model-*.keras"):
        if stale.name not in keep:
            stale.unlink(missing_ok=True)


def read_checkpoint(directory: Path | None) -> RunState | None:
    """The committed state of a checkpoint directory, or None when it holds none (or an unreadable one)."""
    if directory is None:
        return None
    state_path = Path(directory) / CHECKPOINT_STATE_FILE
    if not state_path.is_file():
        return None
    try:
        state = RunState.from_json(json.loads(state_path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        logger.warning("Ignoring unreadable checkpoint state %s: %s", state_path, error)
        return None
    if state.model_file is None or not (Path(directory) / state.model_file).is_file():
        logger.warning("Ignoring checkpoint %s: its model file %s is missing", state_path, state.model_file)
        return None
    return state


def furthest_checkpoint(directories: list[Path]) -> Path | None:
    """Of `directories`, the one whose committed checkpoint reached the highest epoch (None if none has one)."""
    states = [(state.epoch, directory) for directory in directories if (state := read_checkpoint(directory))]
    return max(states, key=lambda item: item[0])[1] if states else None


def adopt_checkpoint(source: Path, target: Path) -> None:
    """Copy the committed checkpoint in `source` (its model files, then state.json last) into `target`."""
    state = read_checkpoint(source)
    if state is None:
        return
    target.mkdir(parents=True, exist_ok=True)
    files = {state.model_file} | ({_model_file_name(state.best_epoch)} if state.best_epoch is not None else set())
    for name in sorted(files):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    temporary = target / f".{CHECKPOINT_STATE_FILE}.tmp"  # the commit point, so it lands in one step
    shutil.copy2(source / CHECKPOINT_STATE_FILE, temporary)
    os.replace(temporary, target / CHECKPOINT_STATE_FILE)


def _load_checkpoint_model(path: Path) -> keras.Model:
    return keras.saving.load_model(path, compile=True, safe_mode=True)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------


def check_output_not_collapsed(model: keras.Model, noisy: np.ndarray, clean: np.ndarray) -> None:
    """Raise TrainingFailed when the (clipped) output no longer depends on the image.

    Two failure modes: a constant image (e.g. a sigmoid output trained with MSE that settled on black), measured
    by the spread of pixel values within each output; and one fixed image for every input (a model that ignores
    its input and predicts the mean image), measured by the spread of each pixel across outputs. Either spread
    below COLLAPSE_STD_RATIO of the clean images' counts as collapsed.
    """
    outputs = [
        model(noisy[start : start + VALIDATION_BATCH_SIZE], training=False)
        for start in range(0, len(noisy), VALIDATION_BATCH_SIZE)
    ]
    denoised = np.clip(np.concatenate([keras.ops.convert_to_numpy(output) for output in outputs]), 0.0, 1.0)
    within_axes = tuple(range(1, clean.ndim))
    checks = [
        ("collapsed to a constant image", "mean per-image std", within_axes),
        ("is the same image whatever the input", "mean per-pixel std across images", 0),
    ]
    for failure, measure, axes in checks:
        output_spread = float(np.mean(np.std(denoised, axis=axes)))
        clean_spread = float(np.mean(np.std(clean, axis=axes)))
        if clean_spread > 1e-3 and output_spread < COLLAPSE_STD_RATIO * clean_spread:
            raise TrainingFailed(
                f"The model's output {failure} ({measure} {output_spread:.2g} while the clean images have "
                f"{clean_spread:.2g}); it learned nothing usable. Try output_activation='linear', another loss or "
                "a lower learning rate."
            )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _compile(model: keras.Model, spec: TrainingSpec, total_steps: int) -> None:
    model.compile(optimizer=build_optimizer(spec.optimizer, total_steps), loss=build_loss(spec.loss))
    model.optimizer.build(model.trainable_variables)


class _Trainer:
    """The compiled steps of one model: train (with proximal step and loss accumulators) and evaluate."""

    def __init__(self, model: keras.Model, spec: TrainingSpec, image_shape: tuple[int, int, int]) -> None:
        self.model = model
        self.proximal = ProximalL1Step.for_model(model, spec.regularization)
        self.loss_sum = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        self.image_count = tf.Variable(0.0, dtype=tf.float64, trainable=False)
        height, width, channels = image_shape
        if spec.architecture.type == "conv":
            height, width = None, None
        signature = [tf.TensorSpec((None, height, width, channels), tf.float32)] * 2
        self.train_step = tf.function(self._train_step, input_signature=signature, jit_compile=JIT_COMPILE)
        self.evaluate_step = tf.function(self._evaluate_step, input_signature=signature)

    def _train_step(self, noisy: tf.Tensor, clean: tf.Tensor) -> tf.Tensor:
        model, optimizer = self.model, self.model.optimizer
        with tf.GradientTape() as tape:
            denoised = model(noisy, training=True)
            loss = model.compute_loss(x=noisy, y=clean, y_pred=denoised, training=True)
        gradients = tape.gradient(loss, model.trainable_variables)
        # The rate of this step: read before apply() advances the schedule's step counter.
        learning_rate = optimizer.learning_rate
        optimizer.apply(gradients, model.trainable_variables)
        if self.proximal:
            self.proximal(learning_rate)
        batch = tf.cast(tf.shape(clean)[0], tf.float64)
        self.loss_sum.assign_add(tf.cast(loss, tf.float64) * batch)
        self.image_count.assign_add(batch)
        return loss

    def _evaluate_step(self, noisy: tf.Tensor, clean: tf.Tensor) -> tf.Tensor:
        denoised = self.model(noisy, training=False)
        return self.model.compute_loss(x=noisy, y=clean, y_pred=denoised, training=False)

    def reset_running_loss(self) -> None:
        self.loss_sum.assign(0.0)
        self.image_count.assign(0.0)

    def running_loss(self) -> float:
        count = float(self.image_count.numpy())
        return float(self.loss_sum.numpy()) / count if count else float("nan")

    def evaluate(self, noisy: np.ndarray, clean: np.ndarray) -> float:
        total = 0.0
        for start in range(0, len(clean), VALIDATION_BATCH_SIZE):
            stop = start + VALIDATION_BATCH_SIZE
            loss = self.evaluate_step(tf.constant(noisy[start:stop]), tf.constant(clean[start:stop]))
            total += float(loss) * len(clean[start:stop])
        return total / len(clean)


def _load_data(spec: TrainingSpec, data: DatasetSplits | None, store: ModelStore | None) -> DatasetSplits:
    if data is None:
        from dae.data import load_dataset

        return load_dataset(spec.dataset, store=store, seed=spec.seed, max_train_images=spec.max_train_images)
    return data


def _training_images(spec: TrainingSpec, data: DatasetSplits) -> np.ndarray:
    images = np.asarray(data.train, dtype=np.float32)
    if images.ndim != 4 or len(images) < 1:
        raise ValueError(
            f"Training images must be a non-empty float array (N, H, W, C). Received: shape={images.shape}"
        )
    if spec.max_train_images is not None and len(images) > spec.max_train_images:
        from dae.data import subset_train

        images = subset_train(images, spec.max_train_images, spec.seed)
    return images


def fit_autoencoder(
    spec: TrainingSpec,
    data: DatasetSplits | None = None,
    *,
    store: ModelStore | None = None,
    hooks: TrainingHooks | None = None,
) -> TrainingResult:
    """Train the denoising autoencoder `spec` describes; see the module docstring for the whole contract.

    `data` None loads `spec.dataset`. Cancellation (hooks.should_cancel) returns stop_reason="cancelled" and keeps
    the checkpoint. Raises InvalidSpec for a spec the images cannot take and TrainingFailed for a NaN/inf loss or a
    collapsed output.
    """
    data = _load_data(spec, data, store)
    return _TrainingRun(spec, data, hooks or TrainingHooks()).run()


class _TrainingRun:
    """One call of fit_autoencoder: data, model (fresh or resumed), the epoch loop and its bookkeeping."""

    def __init__(self, spec: TrainingSpec, data: DatasetSplits, hooks: TrainingHooks) -> None:
        self.spec, self.data, self.hooks = spec, data, hooks
        self.images = _training_images(spec, data)
        self.image_shape = tuple(int(size) for size in self.images.shape[1:])
        check_spec_for_images(spec, self.image_shape)

        train_indices, validation_indices = split_train_validation(len(self.images), spec.validation_split, spec.seed)
        self.batches = NoisyBatches(self.images[train_indices], spec.batch_size, spec.noise, spec.seed)
        self.validation_clean = self.images[validation_indices]
        self.validation_noisy = add_noise(self.validation_clean, spec.noise, seed=[spec.seed, _VALIDATION_NOISE_STREAM])

        self.checkpoint_dir = Path(hooks.checkpoint_dir) if hooks.checkpoint_dir is not None else None
        self.resume_dir = Path(hooks.resume_dir) if hooks.resume_dir is not None else self.checkpoint_dir
        if self.checkpoint_dir is not None and self.resume_dir not in (None, self.checkpoint_dir):
            adopt_checkpoint(self.resume_dir, self.checkpoint_dir)
            self.resume_dir = self.checkpoint_dir
        self.best_weights: list[np.ndarray] | None = None
        self.resumed_from_epoch: int | None = None
        self.model, self.state = self._resume_or_build()
        self.trainer = _Trainer(self.model, spec, self.image_shape)
        self.seconds_before_run = self.state.training_seconds
        self.run_started = self.epoch_started = time.monotonic()
        self.epoch_seconds: list[float] = []
        self.trained_partial_epoch = False
        self.next_poll = 0.0

    # -- setup ---------------------------------------------------------------------------------

    def _resume_or_build(self) -> tuple[keras.Model, RunState]:
        fingerprint = spec_fingerprint(self.spec)
        state = read_checkpoint(self.resume_dir)
        if state is not None and state.spec_fingerprint != fingerprint:
            logger.warning("Checkpoint in %s is for another spec; starting from scratch", self.resume_dir)
            state = None
        if state is None:
            keras.utils.set_random_seed(self.spec.seed)
            model = build_autoencoder(self.spec, self.image_shape)
            _compile(model, self.spec, total_steps=self.spec.epochs * self.batches.steps_per_epoch)
            return model, RunState(spec_fingerprint=fingerprint)
        model = _load_checkpoint_model(self.resume_dir / state.model_file)
        if state.best_epoch is not None:
            best = model
            if state.best_epoch != state.epoch:
                best = _load_checkpoint_model(self.resume_dir / _model_file_name(state.best_epoch))
            self.best_weights = best.get_weights()
        self.resumed_from_epoch = state.epoch
        logger.info("Resuming from the checkpoint of epoch %d in %s", state.epoch, self.resume_dir)
        return model, state

    # -- the loop ------------------------------------------------------------------------------

    def seconds_trained(self) -> float:
        """Training seconds of every run of this job, including those before a resume."""
        return self.seconds_before_run + (time.monotonic() - self.run_started)

    def _check_finite(self, value: float, what: str, epoch: int) -> None:
        if not math.isfinite(value):
            kind = "NaN" if math.isnan(value) else "infinite"
            raise TrainingFailed(
                f"{what} became {kind} at epoch {epoch}; lower the learning rate (received "
                f"learning_rate={self.spec.optimizer.learning_rate:g}) or add gradient clipping (optimizer.clipnorm)."
            )

    def _cancel_requested(self) -> bool:
        return self.hooks.should_cancel is not None and bool(self.hooks.should_cancel())

    def run(self) -> TrainingResult:
        """Train the remaining epochs, then settle the weights and check them."""
        self.seconds_before_run = self.state.training_seconds
        self.run_started = time.monotonic()
        stop_reason = self.state.stop_reason
        epoch = self.state.epoch
        while stop_reason is None and epoch < self.spec.epochs:
            epoch += 1
            stop_reason = "cancelled" if self._cancel_requested() else self._train_epoch(epoch)
            if stop_reason is None:
                stop_reason = self._finish_epoch(epoch)
        stop_reason = stop_reason or "completed"
        if stop_reason == "timeout" and not self.state.history:
            # Publishing a model that never finished an epoch would hand users noise with a model card.
            raise TrainingFailed(
                f"the time budget ran out before the first epoch finished (max_runtime_s={self.spec.max_runtime_s:g}). "
                "Expected at least one full epoch: raise max_runtime_s, or train on fewer images (max_train_images) "
                "or a smaller model."
            )
        if stop_reason != "cancelled":
            self._keep_best_weights(stop_reason)
            if self.state.history:
                check_output_not_collapsed(self.model, *self._collapse_check_images())
        return TrainingResult(
            model=self.model,
            history=list(self.state.history),
            stop_reason=stop_reason,
            epochs_completed=self.state.epoch,
            resumed_from_epoch=self.resumed_from_epoch,
            training_seconds=self.seconds_trained(),
            data=self.data,
        )

    def _train_epoch(self, epoch: int) -> str | None:
        """Run the batches of one epoch; "cancelled" or "timeout" when it had to stop inside the epoch."""
        self.epoch_started = time.monotonic()
        self.trainer.reset_running_loss()
        for noisy, clean in self.batches.epoch(epoch):
            self.trainer.train_step(noisy, clean)
            self.trained_partial_epoch = True
            now = time.monotonic()
            if now >= self.next_poll:  # cheap checks, at most every CANCEL_POLL_INTERVAL_S
                self.next_poll = now + CANCEL_POLL_INTERVAL_S
                self._check_finite(self.trainer.running_loss(), "loss", epoch)
                if self._cancel_requested():
                    return "cancelled"
            if self.seconds_trained() >= self.spec.max_runtime_s:
                return "timeout"
        return None

    def _finish_epoch(self, epoch: int) -> str | None:
        """Validate, track the best epoch, checkpoint, report; "early_stopped"/"timeout" when training ends here."""
        spec, state = self.spec, self.state
        train_seconds = time.monotonic() - self.epoch_started
        learning_rate = current_learning_rate(self.model.optimizer)
        loss = self.trainer.running_loss()
        self._check_finite(loss, "loss", epoch)
        val_loss = None
        if len(self.validation_clean):
            val_loss = self.trainer.evaluate(self.validation_noisy, self.validation_clean)
            self._check_finite(val_loss, "val_loss", epoch)
        self.trained_partial_epoch = False

        monitored = val_loss if val_loss is not None else loss
        if state.best_monitor is None or monitored < state.best_monitor:
            state.best_monitor, state.best_epoch, state.epochs_since_best = monitored, epoch, 0
            self.best_weights = self.model.get_weights()
        else:
            state.epochs_since_best += 1
        stop_reason = None
        if spec.early_stopping_patience is not None and state.epochs_since_best >= spec.early_stopping_patience:
            stop_reason = "early_stopped"
        elif self.seconds_trained() >= spec.max_runtime_s and epoch < spec.epochs:
            stop_reason = "timeout"

        self.epoch_seconds.append(time.monotonic() - self.epoch_started)
        mean_epoch_seconds = sum(self.epoch_seconds) / len(self.epoch_seconds)
        metrics = EpochMetrics(
            epoch=epoch,
            epochs=spec.epochs,
            loss=loss,
            val_loss=val_loss,
            learning_rate=learning_rate,
            elapsed_s=round(self.seconds_trained(), 3),
            eta_s=round(mean_epoch_seconds * (spec.epochs - epoch), 3) if stop_reason is None else 0.0,
            images_per_s=round(self.batches.count / train_seconds, 1) if train_seconds > 0 else None,
        )
        state.epoch = epoch
        state.history.append(metrics)
        state.training_seconds = self.seconds_trained()
        # A timeout is not final: a resumed run re-checks the budget. Early stopping is.
        state.stop_reason = "early_stopped" if stop_reason == "early_stopped" else None
        if self.checkpoint_dir is not None:
            write_checkpoint(self.checkpoint_dir, self.model, state)
        logger.info(
            "epoch %d/%d loss=%.5f val_loss=%s lr=%.3g %.1fs",
            epoch, spec.epochs, loss, "n/a" if val_loss is None else f"{val_loss:.5f}", learning_rate,
            self.epoch_seconds[-1],
        )  # fmt: skip
        if self.hooks.on_epoch is not None:
            self.hooks.on_epoch(metrics)
        return stop_reason

    # -- the end -------------------------------------------------------------------------------

    def _keep_best_weights(self, stop_reason: str) -> None:
        """Restore the best epoch's weights (early stopping set), or keep the better of current/best on a timeout."""
        state = self.state
        if self.best_weights is None:
            return
        if stop_reason == "timeout" and self.trained_partial_epoch:
            if not len(self.validation_clean):
                return  # nothing to compare with: the further-trained weights are kept
            current = self.trainer.evaluate(self.validation_noisy, self.validation_clean)
            if math.isfinite(current) and current <= state.best_monitor:
                return
            self.model.set_weights(self.best_weights)
        elif self.spec.early_stopping_patience is not None or stop_reason == "timeout":
            if state.best_epoch != state.epoch:
                self.model.set_weights(self.best_weights)

    def _collapse_check_images(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self.validation_clean):
            return self.validation_noisy[:COLLAPSE_CHECK_IMAGES], self.validation_clean[:COLLAPSE_CHECK_IMAGES]
        clean = self.images[:COLLAPSE_CHECK_IMAGES]
        return add_noise(clean, self.spec.noise, seed=[self.spec.seed, _VALIDATION_NOISE_STREAM]), clean
