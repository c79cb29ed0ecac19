"""The Keras callbacks of a training run: failure on a non-finite loss, early stopping that survives a resume,
the time budget, the epoch record, the checkpoint, progress reports and cancellation.

They share one `RunStatus`: the committed `RunState` (history, early-stopping state), the seconds trained and why
the run stops. A stop inside an epoch (cancel, time budget) marks the epoch interrupted: Keras still validates it
and calls `on_epoch_end`, but it is not recorded, checkpointed or reported; only the time budget lets its weights
compete with the best epoch's (as a timeout keeps the better of the two). fit.py lists them in this order:
`FailOnNonFiniteLoss, ResumableEarlyStopping, TimeBudget, EpochRecord, RunCheckpoint, ProgressReport,
CancelTraining`, so an epoch is checkpointed before it is reported and cancellation is polled after both.
"""

# mypy: disallow-subclassing-any=False
# (keras ships no type information, so its classes are Any to mypy)

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
from typing_extensions import override

from dae.errors import TrainingFailed
from dae.spec import EpochMetrics, TrainingSpec
from dae.training.checkpoints import RunState, write_checkpoint
from dae.training.model import current_learning_rate

logger = logging.getLogger(__name__)

#: How often (seconds, at most) should_cancel and the running loss are checked between batches.
CANCEL_POLL_INTERVAL_S = 0.5

Logs = dict[str, Any] | None


@dataclass
class RunStatus:
    """What the callbacks of one `fit()` share."""

    state: RunState
    #: The last epoch (1-based) this call may train.
    final_epoch: int
    started: float = field(default_factory=time.monotonic)
    #: cancelled, timeout or early_stopped once the run is stopping; None while it goes on (or completed).
    stop_reason: str | None = None
    #: True when the stop came inside an epoch, so that epoch is not recorded.
    epoch_interrupted: bool = False
    seconds_before: float = 0.0

    def __post_init__(self) -> None:
        self.seconds_before = self.state.training_seconds

    def seconds_trained(self) -> float:
        """Training seconds of every run of this job, including those before a resume."""
        return self.seconds_before + (time.monotonic() - self.started)

    def stop_inside_epoch(self, model: keras.Model, reason: str) -> None:
        model.stop_training = True
        self.stop_reason = reason
        self.epoch_interrupted = True


def _is_interrupted(status: RunStatus) -> bool:
    return status.epoch_interrupted


class FailOnNonFiniteLoss(keras.callbacks.Callback):
    """Raise TrainingFailed when the running loss (polled) or an epoch's loss/val_loss is NaN or infinite."""

    def __init__(self, status: RunStatus, learning_rate: float, poll_interval_s: float) -> None:
        super().__init__()
        self.status = status
        self.learning_rate = learning_rate
        self.poll_interval_s = poll_interval_s
        self.next_poll = 0.0
        self.epoch = 0

    @override
    def on_epoch_begin(self, epoch: int, logs: Logs = None) -> None:
        self.epoch = epoch + 1

    @override
    def on_train_batch_end(self, batch: int, logs: Logs = None) -> None:
        now = time.monotonic()
        if now >= self.next_poll and logs is not None and "loss" in logs:
            self.next_poll = now + self.poll_interval_s
            self._check(float(logs["loss"]), "loss")

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        if _is_interrupted(self.status) or logs is None:
            return
        self._check(float(logs["loss"]), "loss")
        if "val_loss" in logs:
            self._check(float(logs["val_loss"]), "val_loss")

    def _check(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            kind = "NaN" if math.isnan(value) else "infinite"
            raise TrainingFailed(
                f"{what} became {kind} at epoch {self.epoch}; lower the learning rate (received "
                f"learning_rate={self.learning_rate:g}) or add gradient clipping (optimizer.clipnorm)."
            )


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """`EarlyStopping(restore_best_weights=True)` whose best value, wait and best weights carry over a resume.

    Without a patience it never stops but still tracks the best epoch, for a timeout. The best weights are restored
    at the end of training when early stopping is on (also when all epochs ran) and after a timeout; a cancelled
    run, and a completed one without early stopping, keep their last weights.
    """

    def __init__(
        self, status: RunStatus, *, monitor: str, patience: int | None, best_weights: list[np.ndarray] | None
    ) -> None:
        super().__init__(monitor=monitor, mode="min", patience=sys.maxsize if patience is None else patience,
                         restore_best_weights=True)  # fmt: skip
        self.status = status
        self.stops_early = patience is not None
        self.resumed_best_weights = best_weights

    @override
    def on_train_begin(self, logs: Logs = None) -> None:
        super().on_train_begin(logs)
        state = self.status.state
        if state.best_epoch is not None:
            self.best = state.best_monitor
            self.best_epoch = state.best_epoch - 1
            self.wait = state.epochs_since_best
            self.best_weights = self.resumed_best_weights

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        if _is_interrupted(self.status):
            # A timeout's unfinished epoch competes with the best one on val_loss; without validation its further
            # trained weights are kept (on_train_end). A cancelled epoch does not count.
            if self.status.stop_reason == "timeout" and self.monitor == "val_loss":
                super().on_epoch_end(epoch, logs)
            return
        super().on_epoch_end(epoch, logs)
        if self.stopped_epoch == epoch and self.model.stop_training:
            self.status.stop_reason = "early_stopped"
        state = self.status.state
        state.best_monitor = None if self.best is None else float(self.best)
        state.best_epoch = self.best_epoch + 1
        state.epochs_since_best = int(self.wait)

    @override
    def on_train_end(self, logs: Logs = None) -> None:
        reason = self.status.stop_reason
        keeps_last_weights = (
            reason == "cancelled"
            or (reason is None and not self.stops_early)
            or (reason == "timeout" and self.status.epoch_interrupted and self.monitor != "val_loss")
        )
        if not keeps_last_weights:
            super().on_train_end(logs)


class TimeBudget(keras.callbacks.Callback):
    """Stop once the seconds trained (over all runs of the job) reach `max_runtime_s`: after any batch, or at the
    end of an epoch that is not the last."""

    def __init__(self, status: RunStatus, max_runtime_s: float) -> None:
        super().__init__()
        self.status = status
        self.max_runtime_s = max_runtime_s

    @override
    def on_train_batch_end(self, batch: int, logs: Logs = None) -> None:
        if self.status.stop_reason is None and self.status.seconds_trained() >= self.max_runtime_s:
            self.status.stop_inside_epoch(self.model, "timeout")

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        status = self.status
        if _is_interrupted(status) or status.stop_reason is not None or epoch + 1 >= status.final_epoch:
            return
        if status.seconds_trained() >= self.max_runtime_s:
            self.model.stop_training = True
            status.stop_reason = "timeout"


class EpochRecord(keras.callbacks.Callback):
    """Append each finished epoch's EpochMetrics to the run's history (train images/s exclude validation)."""

    def __init__(self, status: RunStatus, spec: TrainingSpec, train_images: int) -> None:
        super().__init__()
        self.status = status
        self.spec = spec
        self.train_images = train_images
        self.epoch_started = 0.0
        self.train_ended: float | None = None
        self.epoch_seconds: list[float] = []

    @override
    def on_epoch_begin(self, epoch: int, logs: Logs = None) -> None:
        self.epoch_started = time.monotonic()
        self.train_ended = None

    @override
    def on_test_begin(self, logs: Logs = None) -> None:
        if self.train_ended is None:  # validation starts: the epoch's train batches are done
            self.train_ended = time.monotonic()

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        status, spec = self.status, self.spec
        if _is_interrupted(status) or logs is None:
            return
        now = time.monotonic()
        train_seconds = (self.train_ended or now) - self.epoch_started
        self.epoch_seconds.append(now - self.epoch_started)
        mean_epoch_seconds = sum(self.epoch_seconds) / len(self.epoch_seconds)
        number = epoch + 1
        val_loss = logs.get("val_loss")
        metrics = EpochMetrics(
            epoch=number,
            epochs=spec.epochs,
            loss=float(logs["loss"]),
            val_loss=None if val_loss is None else float(val_loss),
            learning_rate=current_learning_rate(self.model.optimizer),
            elapsed_s=round(status.seconds_trained(), 3),
            eta_s=round(mean_epoch_seconds * (spec.epochs - number), 3) if status.stop_reason is None else 0.0,
            images_per_s=round(self.train_images / train_seconds, 1) if train_seconds > 0 else None,
        )
        state = status.state
        state.epoch = number
        state.history.append(metrics)
        state.training_seconds = status.seconds_trained()
        # A timeout is not final: a resumed run re-checks the budget. Early stopping is.
        state.stop_reason = "early_stopped" if status.stop_reason == "early_stopped" else None


class RunCheckpoint(keras.callbacks.Callback):
    """After each recorded epoch: model-NNNN.keras, then state.json (dae/training/checkpoints.py)."""

    def __init__(self, status: RunStatus, directory: Path) -> None:
        super().__init__()
        self.status = status
        self.directory = directory

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        if not _is_interrupted(self.status):
            write_checkpoint(self.directory, self.model, self.status.state)


class ProgressReport(keras.callbacks.Callback):
    """Log each recorded epoch and hand its EpochMetrics to `on_epoch` (the worker's progress report)."""

    def __init__(self, status: RunStatus, on_epoch: Callable[[EpochMetrics], None] | None) -> None:
        super().__init__()
        self.status = status
        self.on_epoch = on_epoch

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        if _is_interrupted(self.status):
            return
        metrics = self.status.state.history[-1]
        logger.info(
            "epoch %d/%d loss=%.5f val_loss=%s lr=%.3g %.1fs", metrics.epoch, metrics.epochs, metrics.loss,
            "n/a" if metrics.val_loss is None else f"{metrics.val_loss:.5f}", metrics.learning_rate,
            metrics.elapsed_s,
        )  # fmt: skip
        if self.on_epoch is not None:
            self.on_epoch(metrics)


class CancelTraining(keras.callbacks.Callback):
    """Cooperative cancellation: polls `should_cancel` between batches (at most every `poll_interval_s`) and
    between epochs; a cancel stops training at once (`model.stop_training`)."""

    def __init__(self, status: RunStatus, should_cancel: Callable[[], bool], poll_interval_s: float) -> None:
        super().__init__()
        self.status = status
        self.should_cancel = should_cancel
        self.poll_interval_s = poll_interval_s
        self.next_poll = 0.0

    @override
    def on_train_batch_end(self, batch: int, logs: Logs = None) -> None:
        now = time.monotonic()
        if now >= self.next_poll:
            self.next_poll = now + self.poll_interval_s
            if self.should_cancel():
                self.status.stop_inside_epoch(self.model, "cancelled")

    @override
    def on_epoch_end(self, epoch: int, logs: Logs = None) -> None:
        status = self.status
        if status.stop_reason is not None or epoch + 1 >= status.final_epoch:
            return
        if self.should_cancel():  # before the next epoch: its first batch does not run
            self.model.stop_training = True
            status.stop_reason = "cancelled"
