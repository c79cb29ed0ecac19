"""A run's checkpoint directory: `model-NNNN.keras` (weights + optimizer state) and `state.json`, the commit point.

`state.json` holds what the model file does not: the epoch, the history, the seconds trained, the early-stopping
state (best monitored value, its epoch, epochs since) and a final stop reason. Both files are written atomically,
the model first; the best epoch's model file is kept beside the latest so a resumed run can still restore it.
Each attempt of a job writes its own directory (the worker's contract, see worker/tasks.py): a run may resume
from another directory's checkpoint, which is first copied (`adopt_checkpoint`, state.json last).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from core.fsio import atomic_write_text, fsync_directory
from dae.fingerprints import spec_fingerprint
from dae.spec import EpochMetrics, TrainingSpec

logger = logging.getLogger(__name__)

CHECKPOINT_STATE_FILE = "state.json"
#: 2: the model file holds a DenoisingAutoencoder (format 1 held a plain functional model).
_CHECKPOINT_FORMAT = 2


@dataclass
class RunState:
    """Everything besides the model file that a resumed run needs; serialized to state.json.

    `best_epoch` and `epoch` are 1-based; `epochs_since_best` is Keras EarlyStopping's `wait`.
    """

    spec_fingerprint: str
    epoch: int = 0
    history: list[EpochMetrics] = field(default_factory=list)
    training_seconds: float = 0.0
    best_monitor: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    stop_reason: str | None = None
    model_file: str | None = None

    @classmethod
    def for_spec(cls, spec: TrainingSpec) -> RunState:
        """The state of a run of `spec` that has not trained yet."""
        return cls(spec_fingerprint=spec_fingerprint(spec))

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
            best_monitor=None if payload["best_monitor"] is None else float(payload["best_monitor"]),
            best_epoch=None if payload["best_epoch"] is None else int(payload["best_epoch"]),
            epochs_since_best=int(payload["epochs_since_best"]),
            stop_reason=payload["stop_reason"],
            model_file=payload["model_file"],
        )


def model_file_name(epoch: int) -> str:
    """The checkpoint's model file for 1-based `epoch`."""
    return f"model-{epoch:04d}.keras"


def _save_model_atomically(model: keras.Model, path: Path) -> None:
    temporary = path.with_name(f".tmp-{path.name}")  # keeps the .keras suffix Keras insists on
    model.save(temporary)
    with open(temporary, "rb") as handle:  # durable before state.json can name it
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(path.parent)


def write_checkpoint(directory: Path, model: keras.Model, state: RunState) -> None:
    """Save the model (with optimizer state) for `state.epoch`, then commit state.json; prune older models.

    The best epoch's model file is kept too, so a resumed run can still restore the best weights.
    """
    directory.mkdir(parents=True, exist_ok=True)
    state.model_file = model_file_name(state.epoch)
    _save_model_atomically(model, directory / state.model_file)
    atomic_write_text(directory / CHECKPOINT_STATE_FILE, json.dumps(state.to_json(), indent=1))
    keep = {state.model_file}
    if state.best_epoch is not None:
        keep.add(model_file_name(state.best_epoch))
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
    if state is None or state.model_file is None:
        return
    target.mkdir(parents=True, exist_ok=True)
    files = {state.model_file} | ({model_file_name(state.best_epoch)} if state.best_epoch is not None else set())
    for name in sorted(files):
        if (source / name).is_file():
            shutil.copy2(source / name, target / name)
    atomic_write_text(target / CHECKPOINT_STATE_FILE, (source / CHECKPOINT_STATE_FILE).read_text())


def load_checkpoint_model(path: Path) -> keras.Model:
    """A checkpoint's model, compiled, with its optimizer state (safe_mode stays on)."""
    return keras.saving.load_model(path, compile=True, safe_mode=True)
