"""One-time moves of data written before owners existed: everything then belonged to the default owner. Both are
idempotent and safe to run from several processes at once; the gateway runs them in its lifespan, the workers when
they are ready."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import cast

from core.jobs import JobStore, decoded
from core.store import ModelStore
from dae.spec import DEFAULT_OWNER, JobRecord

logger = logging.getLogger(__name__)


def migrate_store_names(store: ModelStore) -> bool:
    """Move the name index of a store written before owners existed (names/) to the default owner's; returns
    whether there was one. Safe to run from several processes at once (renames); gateway and workers run it
    at start."""
    legacy = store.root / "names"
    if not legacy.is_dir():
        return False
    target = store.owners_dir / DEFAULT_OWNER / "names"
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
        os.rename(legacy, target)  # the whole index in one step when the default owner has none yet
    for name_dir in (list(legacy.iterdir()) if legacy.is_dir() else []):  # else merge, version by version
        for version_dir in list(name_dir.iterdir()):
            with contextlib.suppress(FileNotFoundError, FileExistsError, OSError):
                (target / name_dir.name).mkdir(parents=True, exist_ok=True)
                os.rename(version_dir, target / name_dir.name / version_dir.name)
        with contextlib.suppress(OSError):
            name_dir.rmdir()
    with contextlib.suppress(OSError):
        legacy.rmdir()
    logger.warning("moved the name index of a store without owners to owner %r", DEFAULT_OWNER)
    return True


def migrate_job_indexes(jobs: JobStore, batch: int = 500) -> int:
    """Give jobs recorded before owners existed their owner's indexes (each record's own owner, `default` for
    those without one); returns how many jobs it indexed. Idempotent and safe while jobs run (ZADD of what each
    record says); the gateway runs it at start until the store is marked migrated."""
    marker = f"{jobs.prefix}layout:owner-indexes"
    if jobs.client.exists(marker):
        return 0
    done, start = 0, 0
    while page := cast("list[bytes | str]", jobs.client.zrange(jobs.index_key(), start, start + batch - 1)):
        ids = [decoded(job_id) for job_id in page]
        pipe = jobs.client.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(jobs.job_key(job_id), "record")
        records = [JobRecord.model_validate_json(decoded(raw)) for raw in pipe.execute() if raw is not None]
        pipe = jobs.client.pipeline(transaction=False)
        for record in records:
            score = record.created_at.timestamp()
            pipe.zadd(jobs.index_key(owner=record.owner), {record.id: score})
            pipe.zadd(jobs.index_key(record.state, record.owner), {record.id: score})
            pipe.sadd(jobs.owners_key(), record.owner)
        pipe.execute()
        done, start = done + len(records), start + batch
    jobs.client.set(marker, "1")
    return done
