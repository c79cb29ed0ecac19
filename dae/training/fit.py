"""fit_autoencoder(): a whole training run through `keras.Model.fit()`, with progress, cancellation and checkpoints.

- Model: `DenoisingAutoencoder` (dae/training/model.py), whose train_step adds the proximal L1 step. A fresh run
  seeds Keras with spec.seed and builds it; a run that finds a checkpoint of the same spec loads it (weights and
  optimizer state) and continues at the next epoch.
- Data (dae/training/batches.py): seeded per-epoch permutations, noise per batch from (seed, epoch, batch); a
  seeded validation split with fixed noise, passed to fit() as validation_data. `loss` and `val_loss` are both the
  training objective (reconstruction + regularization). Conv models pad/crop inside the model (dae/models.py), so
  images of any H, W go in unchanged.
- Callbacks (dae/training/callbacks.py): a NaN/inf loss raises TrainingFailed; EarlyStopping with best-weight
  restore; the time budget; each epoch recorded, checkpointed (hooks.checkpoint_dir), then reported
  (hooks.on_epoch); cancellation (hooks.should_cancel) polled between batches and epochs.
- Best weights: with early_stopping_patience set, the best epoch's weights (by val_loss, else loss) are restored
  at the end; on a timeout, the better of the current and the best weights is kept.
- Failures: a model whose output no longer depends on its input (a constant image, or the same image for every
  input: checked on validation images after training) raises TrainingFailed, as does a timeout before the first
  epoch finished.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from dae.errors import TrainingFailed
from dae.proximal import ProximalL1Step
from dae.spec import EpochMetrics, TrainingSpec, check_spec_for_images
from dae.training import callbacks as run_callbacks
from dae.training.batches import (
    noisy_batches,
    split_train_validation,
    steps_per_epoch,
    validation_pairs,
)
from dae.training.checkpoints import (
    RunState,
    adopt_checkpoint,
    load_checkpoint_model,
    model_file_name,
    read_checkpoint,
)
from dae.training.model import DenoisingAutoencoder, build_training_model, compile_for_training

if TYPE_CHECKING:
    from dae.data import DatasetSource, DatasetSplits

logger = logging.getLogger(__name__)

VALIDATION_BATCH_SIZE = 512
#: Images used by the collapse check after training.
COLLAPSE_CHECK_IMAGES = 256
#: The output counts as collapsed when its spread (within images, or across images) is below this fraction of the
#: clean images' spread.
COLLAPSE_STD_RATIO = 0.02


@dataclass
class TrainingHooks:
    """What a caller plugs into a run: progress per epoch, cooperative cancellation, checkpoint directories, and
    extra Keras callbacks (run before the run's own at every hook).

    Checkpoints are written into `checkpoint_dir`; a run resumes from `resume_dir` (default: `checkpoint_dir`), so
    that each attempt of a job can write its own directory and still continue from an earlier attempt's.
    """

    on_epoch: Callable[[EpochMetrics], None] | None = None
    should_cancel: Callable[[], bool] | None = None
    #: Seconds between two should_cancel calls inside an epoch; 0 polls after every batch (for a cheap check).
    cancel_poll_s: float = run_callbacks.CANCEL_POLL_INTERVAL_S
    checkpoint_dir: Path | None = None
    resume_dir: Path | None = None
    callbacks: list[keras.callbacks.Callback] = field(default_factory=list)


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


def check_output_not_collapsed(model: keras.Model, noisy: np.ndarray, clean: np.ndarray) -> None:
    """Raise TrainingFailed when the (clipped) output no longer depends on the image.

    Two failure modes: a constant image (e.g. a sigmoid output trained with MSE that settled on black), measured
    by the spread of pixel values within each output; and one fixed image for every input (a model that ignores
    its input and predicts the mean image), measured by the spread of each pixel across outputs. Either spread
    below COLLAPSE_STD_RATIO of the clean images' counts as collapsed.
    """
    outputs = [
        keras.ops.convert_to_numpy(model(noisy[start : start + VALIDATION_BATCH_SIZE], training=False))
        for start in range(0, len(noisy), VALIDATION_BATCH_SIZE)
    ]
    denoised = np.clip(np.concatenate(outputs), 0.0, 1.0)
    within_axes = tuple(range(1, clean.ndim))
    checks: list[tuple[str, str, int | tuple[int, ...]]] = [
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


def _load_data(spec: TrainingSpec, data: DatasetSplits | None, store: DatasetSource | None) -> DatasetSplits:
    if data is None:
        from dae.data import load_dataset  # noqa: PLC0415 - the data module is only needed without `data`

        return load_dataset(spec.dataset, store=store, seed=spec.seed, max_train_images=spec.max_train_images)
    return data


def _training_images(spec: TrainingSpec, data: DatasetSplits) -> np.ndarray:
    images = np.asarray(data.train, dtype=np.float32)
    if images.ndim != 4 or len(images) < 1:
        raise ValueError(
            f"Training images must be a non-empty float array (N, H, W, C). Received: shape={images.shape}"
        )
    if spec.max_train_images is not None and len(images) > spec.max_train_images:
        from dae.data import subset_train  # noqa: PLC0415

        images = subset_train(images, spec.max_train_images, spec.seed)
    return images


@dataclass
class _Start:
    """Where a run starts: the model, the committed state, and the best epoch's weights of a resumed run."""

    model: DenoisingAutoencoder
    state: RunState
    best_weights: list[np.ndarray] | None = None
    resumed_from_epoch: int | None = None


def _resume_or_build(
    spec: TrainingSpec, resume_dir: Path | None, image_shape: tuple[int, int, int], steps: int
) -> _Start:
    fresh = RunState.for_spec(spec)
    state = read_checkpoint(resume_dir)
    if state is not None and state.spec_fingerprint != fresh.spec_fingerprint:
        logger.warning("Checkpoint in %s is for another spec; starting from scratch", resume_dir)
        state = None
    if state is None or resume_dir is None or state.model_file is None:
        keras.utils.set_random_seed(spec.seed)
        model = build_training_model(spec, image_shape)
        compile_for_training(model, spec, total_steps=spec.epochs * steps)
        return _Start(model, fresh)
    loaded = load_checkpoint_model(resume_dir / state.model_file)
    if not isinstance(loaded, DenoisingAutoencoder):
        raise TypeError(f"Expected a DenoisingAutoencoder checkpoint. Received: {type(loaded).__name__}")
    loaded.attach_proximal_step(ProximalL1Step.for_model(loaded, spec.regularization))
    best_weights = None
    if state.best_epoch is not None:
        best = loaded
        if state.best_epoch != state.epoch:
            best = load_checkpoint_model(resume_dir / model_file_name(state.best_epoch))
        best_weights = best.get_weights()
    logger.info("Resuming from the checkpoint of epoch %d in %s", state.epoch, resume_dir)
    return _Start(loaded, state, best_weights, resumed_from_epoch=state.epoch)


def fit_autoencoder(
    spec: TrainingSpec,
    data: DatasetSplits | None = None,
    *,
    store: DatasetSource | None = None,
    hooks: TrainingHooks | None = None,
) -> TrainingResult:
    """Train the denoising autoencoder `spec` describes; see the module docstring for the whole contract.

    `data` None loads `spec.dataset`. Cancellation (hooks.should_cancel) returns stop_reason="cancelled" and keeps
    the checkpoint. Raises InvalidSpec for a spec the images cannot take and TrainingFailed for a NaN/inf loss or a
    collapsed output.
    """
    data = _load_data(spec, data, store)
    hooks = hooks or TrainingHooks()
    images = _training_images(spec, data)
    height, width, channels = (int(size) for size in images.shape[1:])
    image_shape = (height, width, channels)
    check_spec_for_images(spec, image_shape)

    train_indices, validation_indices = split_train_validation(len(images), spec.validation_split, spec.seed)
    train_images = images[train_indices]
    validation = (
        validation_pairs(images[validation_indices], spec.noise, spec.seed, spec.loss.level_weighting)
        if len(validation_indices)
        else None
    )
    steps = steps_per_epoch(len(train_images), spec.batch_size)

    checkpoint_dir = Path(hooks.checkpoint_dir) if hooks.checkpoint_dir is not None else None
    resume_dir = Path(hooks.resume_dir) if hooks.resume_dir is not None else checkpoint_dir
    if checkpoint_dir is not None and resume_dir is not None and resume_dir != checkpoint_dir:
        adopt_checkpoint(resume_dir, checkpoint_dir)
        resume_dir = checkpoint_dir
    start = _resume_or_build(spec, resume_dir, image_shape, steps)
    model, state = start.model, start.state

    final_epoch = state.epoch if state.stop_reason == "early_stopped" else spec.epochs
    status = run_callbacks.RunStatus(state=state, final_epoch=final_epoch)
    poll_interval_s = run_callbacks.CANCEL_POLL_INTERVAL_S
    early_stopping = run_callbacks.ResumableEarlyStopping(
        status,
        monitor="val_loss" if validation is not None else "loss",
        patience=spec.early_stopping_patience,
        best_weights=start.best_weights,
    )
    callbacks: list[keras.callbacks.Callback] = [
        *hooks.callbacks,
        run_callbacks.FailOnNonFiniteLoss(status, spec.optimizer.learning_rate, poll_interval_s),
        early_stopping,
        run_callbacks.TimeBudget(status, spec.max_runtime_s),
        run_callbacks.EpochRecord(status, spec, len(train_images)),
    ]
    if checkpoint_dir is not None:
        callbacks.append(run_callbacks.RunCheckpoint(status, checkpoint_dir))
    callbacks.append(run_callbacks.ProgressReport(status, hooks.on_epoch))
    if hooks.should_cancel is not None:
        callbacks.append(run_callbacks.CancelTraining(status, hooks.should_cancel, hooks.cancel_poll_s))

    if state.epoch >= final_epoch:
        # Nothing left to train (a finished checkpoint): settle the weights as the end of fit() would.
        early_stopping.set_model(model)
        early_stopping.on_train_begin()
        early_stopping.on_train_end()
    elif hooks.should_cancel is not None and hooks.should_cancel():
        status.stop_reason = "cancelled"  # before the first batch: fit() would run one
    else:
        model.fit(
            noisy_batches(train_images, spec.batch_size, spec.noise, spec.seed,
                          first_epoch=state.epoch + 1, last_epoch=final_epoch,
                          level_weighting=spec.loss.level_weighting),
            epochs=final_epoch,
            initial_epoch=state.epoch,
            steps_per_epoch=steps,
            shuffle=False,  # the pipeline shuffles, per epoch and seeded
            validation_data=validation,
            validation_batch_size=VALIDATION_BATCH_SIZE,
            callbacks=callbacks,
            verbose=0,
        )  # fmt: skip

    stop_reason = status.stop_reason or "completed"
    if stop_reason == "timeout" and not state.history:
        # Publishing a model that never finished an epoch would hand users noise with a model card.
        raise TrainingFailed(
            f"the time budget ran out before the first epoch finished (max_runtime_s={spec.max_runtime_s:g}). "
            "Expected at least one full epoch: raise max_runtime_s, or train on fewer images (max_train_images) "
            "or a smaller model."
        )
    if stop_reason != "cancelled" and state.history:
        if validation is not None:
            noisy, clean = validation[0][:COLLAPSE_CHECK_IMAGES], validation[1][:COLLAPSE_CHECK_IMAGES]
        else:
            noisy, clean = validation_pairs(images[:COLLAPSE_CHECK_IMAGES], spec.noise, spec.seed)
        check_output_not_collapsed(model, noisy, clean)
    return TrainingResult(
        model=model,
        history=list(state.history),
        stop_reason=stop_reason,
        epochs_completed=state.epoch,
        resumed_from_epoch=start.resumed_from_epoch,
        training_seconds=status.seconds_trained(),
        data=data,
    )
