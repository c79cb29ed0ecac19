"""DatasetSource: what the data package needs from wherever uploaded datasets and cached downloads live.

core.datasets.DatasetStore is one; the library itself never imports core (the import direction is core -> dae).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from dae.spec import DatasetInfo


class DatasetSource(Protocol):
    """Where uploaded datasets and the cache of fetched built-ins live (core.datasets.DatasetStore is one)."""

    cache_dir: Path

    def info(self, dataset_id: str) -> DatasetInfo: ...

    def load_images(self, dataset_id: str) -> NDArray[np.float32]: ...

    def list(self) -> list[DatasetInfo]: ...

    def write_cache(self, filename: str, data: bytes) -> None: ...
