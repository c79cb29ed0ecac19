"""Domain errors of the DAE library, mapped to HTTP status codes once, in the gateway.

Every message says what was expected and what was received, so a user can act on it.
"""

from __future__ import annotations


class DaeError(Exception):
    """Base of every error the library raises on purpose."""

    #: HTTP status the gateway answers with; the mapping lives here so it is written once.
    status_code: int = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(DaeError):
    """A training spec that cannot run (e.g. conv depth deeper than the images allow)."""

    status_code = 422


class InvalidImage(DaeError):
    """An image or pixel array that cannot be decoded or has the wrong shape/range."""

    status_code = 422


class InvalidDataset(DaeError):
    """An uploaded dataset that is malformed, empty, too large or not finite."""

    status_code = 422


class PayloadTooLarge(DaeError):
    """A request, image or dataset above a configured size limit."""

    status_code = 413


class NotFound(DaeError):
    """Base of the 'no such thing' errors."""

    status_code = 404


class ModelNotFound(NotFound):
    """No model matches the reference (id, name or name:version)."""


class DatasetNotFound(NotFound):
    """No dataset with this id (built-in or uploaded)."""


class JobNotFound(NotFound):
    """No job with this id."""


class Conflict(DaeError):
    """The request contradicts the current state (finished job, reused idempotency key)."""

    status_code = 409


class DatasetUnavailable(DaeError):
    """A built-in dataset that needs a download on a machine that cannot reach it."""

    status_code = 422


class TrainingFailed(DaeError):
    """Training stopped without a usable model (NaN loss, stalled loss, ...)."""

    status_code = 500


class ExportFailed(DaeError):
    """The ONNX export did not reproduce the Keras output within tolerance."""

    status_code = 500


class Overloaded(DaeError):
    """The serving queue is full; the client should retry later."""

    status_code = 503
