"""Training checkpoints in the store: checkpoints/<job id>/<attempt>/, one directory per attempt, so a stale
attempt never overwrites a newer one's; the next attempt resumes from the furthest of them. Deleted only after the
job's final state is recorded."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

#: Job ids are "j_" + 16 hex (core.jobs); any short safe token is accepted so tests and tools can use them too.
CHECKPOINT_KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


class CheckpointStore:
    """The checkpoint directories of training jobs under a store root."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        self.directory = self.root / "checkpoints"

    def __repr__(self) -> str:
        return f"CheckpointStore(root={str(self.root)!r})"

    def job_dir(self, job_id: str) -> Path:
        """The checkpoint directory of a job (created if missing). ValueError for an unsafe job id."""
        if not isinstance(job_id, str) or not CHECKPOINT_KEY_PATTERN.fullmatch(job_id):
            raise ValueError(
                f"A checkpoint key must be a job id such as 'j_0123456789abcdef'. Expected a match of "
                f"{CHECKPOINT_KEY_PATTERN.pattern}. Received: job_id={job_id!r}"
            )
        return _ensure(self.directory / job_id)

    def attempt_dir(self, job_id: str, attempt: int) -> Path:
        """Where attempt `attempt` of a job writes its checkpoints (created if missing)."""
        if not isinstance(attempt, int) or attempt < 1:
            raise ValueError(f"Expected an attempt number >= 1. Received: attempt={attempt!r}")
        return _ensure(self.job_dir(job_id) / str(attempt))

    def delete(self, job_id: str) -> None:
        """Remove a job's checkpoints (every attempt's), if any."""
        path = self.job_dir(job_id)
        shutil.rmtree(path, ignore_errors=True)


def _ensure(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
