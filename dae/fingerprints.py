"""Content fingerprints (sha256 hex) of the two things a result depends on: a training spec and pixel arrays.

Pure (numpy and pydantic only): the gateway and `core` use them too, to compare idempotent requests and to tell
two datasets apart.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from dae.spec import TrainingSpec


def spec_fingerprint(spec: TrainingSpec) -> str:
    """sha256 of the spec's canonical JSON (defaults filled in, keys sorted): equal specs, equal fingerprints."""
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_pixels(*arrays: np.ndarray) -> str:
    """sha256 of the pixel bytes of `arrays` (dtype and shape included, so a reshape changes it)."""
    digest = hashlib.sha256()
    for array in arrays:
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape};".encode())
        digest.update(contiguous.data.cast("B"))  # the bytes in place, no copy
    return digest.hexdigest()
