"""Domain errors of the DAE library; the gateway maps each class to an HTTP status once (service/errors.py).

Every message says what was expected and what was received, so a user can act on it.
"""

from __future__ import annotations


class DaeError(Exception):
    """Base of every error the library raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(DaeError):
    """A training spec that cannot run (e.g. conv depth deeper than the images allow)."""


class InvalidImage(DaeError):
    """An image or pixel array that cannot be decoded or has the wrong shape/range."""


class InvalidDataset(DaeError):
    """An uploaded dataset that is malformed, empty, too large or not finite."""


class PayloadTooLarge(DaeError):
    """A request, image or dataset above a configured size limit."""


class NotFound(DaeError):
    """Base of the 'no such thing' errors."""


class ModelNotFound(NotFound):
    """No model matches the reference (id, name or name:version)."""


class DatasetNotFound(NotFound):
    """No dataset with this id (built-in or uploaded)."""


class JobNotFound(NotFound):
    """No job with this id."""


class Conflict(DaeError):
    """The request contradicts the current state (finished job, reused idempotency key)."""


class DatasetUnavailable(DaeError):
    """A built-in dataset that needs a download on a machine that cannot reach it."""


class TrainingFailed(DaeError):
    """Training stopped without a usable model (NaN loss, stalled loss, ...)."""


class ExportFailed(DaeError):
    """The ONNX export did not reproduce the Keras output within tolerance."""


class Overloaded(DaeError):
    """The serving queue is full; the client should retry later."""
