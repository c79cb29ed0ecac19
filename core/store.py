"""The model store: published models (card, ONNX and Keras files, plots), their names and versions.

Layout under the store root (a local directory; every process and host that shares it sees the same models;
core/datasets.py and core/checkpoints.py keep datasets/, cache/ and checkpoints/ under the same root):

    models/<model id>/{model.keras, model.onnx, card.json, history.png, samples.png}
    owners/<owner>/names/<name>/<version>/model_id   (version reservation by os.mkdir, and the name -> id index
                               of each owner: names and versions are per owner)
    tmp/                       (staging directories, named after the process that writes them, and temp files;
                               same filesystem, so renames are atomic)

Why this shape:
- A model becomes visible in one step: its files and card.json are written into a staging directory and the
  directory is renamed to models/<id>. A reader never sees a half-written model.
- Versions are reserved with os.mkdir, which is atomic on local and network filesystems, so two workers that
  publish the same name at once get different versions without a lock server.
- Every id and reference is matched against a strict pattern before it becomes part of a path, so "../x" and
  friends raise ModelNotFound and never touch anything outside the root.
- A store is seen as one owner (ModelStore(root, owner)): names resolve in that owner's index and another owner's
  model is ModelNotFound, as if it did not exist; `every_owner=True` (an admin) sees and lists every owner's models.
- card.json's modification time is set to the card's created_at, so listing newest-first needs one stat per
  model and reads only the cards of the requested page.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from core.fsio import atomic_write_text, fsync_directory
from dae.errors import Conflict, ModelNotFound
from dae.spec import DEFAULT_OWNER, NAME_PATTERN, ModelCard, check_owner

logger = logging.getLogger(__name__)

MODEL_ID_PATTERN = re.compile(r"^m_[0-9a-f]{12}$")
_NAME_RE = re.compile(NAME_PATTERN)
_VERSION_RE = re.compile(r"^[1-9][0-9]{0,8}$")
_STAGING_WRITER_RE = re.compile(r"^staging-(?P<pid>\d+)@(?P<host>.+)-[^-]+$")

MODEL_ARTIFACTS = frozenset({"model.keras", "model.onnx", "history.png", "samples.png", "card.json"})
CARD_FILE = "card.json"
_MODEL_ID_FILE = "model_id"


def new_model_id() -> str:
    """A fresh random model id: "m_" + 12 hex characters."""
    return "m_" + secrets.token_hex(6)


def model_id_for_job(job_id: str) -> str:
    """The id a training job's model gets: derived from the job id, so two attempts of one job can never publish
    two models (the second rename onto models/<id> fails)."""
    return "m_" + hashlib.sha256(f"job:{job_id}".encode()).hexdigest()[:12]


def is_model_id(value: str) -> bool:
    """True when `value` has the shape of a model id (it may still not exist)."""
    return bool(MODEL_ID_PATTERN.fullmatch(value))


class ModelStore:
    """Published models under one root directory, as one owner sees them (see the module docstring)."""

    def __init__(self, root: Path | str, owner: str = DEFAULT_OWNER, *, every_owner: bool = False) -> None:
        self.root = Path(root).resolve()
        self.owner = check_owner(owner)
        self.every_owner = every_owner
        self.models_dir = self.root / "models"
        self.owners_dir = self.root / "owners"
        self.names_dir = self.owners_dir / self.owner / "names"
        self.tmp_dir = self.root / "tmp"

    def __repr__(self) -> str:
        return f"ModelStore(root={str(self.root)!r}, owner={self.owner!r}, every_owner={self.every_owner})"

    def with_owner(self, owner: str, *, every_owner: bool = False) -> ModelStore:
        """The same store as `owner` sees it (cheap: no file is touched)."""
        return ModelStore(self.root, owner, every_owner=every_owner)

    def _names_dir_of(self, owner: str) -> Path:
        return self.owners_dir / check_owner(owner) / "names"

    def _owner_of(self, model_id: str) -> str | None:
        """The owner on a published model's card (None: no such model)."""
        try:
            text = (self.models_dir / model_id / CARD_FILE).read_text(encoding="utf-8")
        except (FileNotFoundError, NotADirectoryError):
            return None
        owner = json.loads(text).get("owner", DEFAULT_OWNER)
        return owner if isinstance(owner, str) else DEFAULT_OWNER

    def _visible(self, model_id: str) -> bool:
        """Whether `model_id` is published and this view may see it."""
        owner = self._owner_of(model_id)
        return owner is not None and (self.every_owner or owner == self.owner)

    # -----------------------------------------------------------------------------------------
    # Directories
    # -----------------------------------------------------------------------------------------

    def _ensure(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        return directory

    def staging_dir(self) -> Path:
        """A fresh, empty directory inside the store (same filesystem as models/, so publishing is a rename).

        Named after this process ("staging-<pid>@<host>-…"), so a worker starting on this host can tell a staging
        directory whose writer died (remove_stale_temporaries) from one being written.
        """
        prefix = f"staging-{os.getpid()}@{socket.gethostname()}-"
        return Path(tempfile.mkdtemp(prefix=prefix, dir=self._ensure(self.tmp_dir)))

    def discard_staging(self, staging: Path) -> None:
        """Remove a staging directory that will not be published (e.g. after a failed export)."""
        staging = Path(staging).resolve()
        if staging.parent != self.tmp_dir.resolve():
            raise ValueError(f"Expected a staging directory made by this store. Received: staging={str(staging)!r}")
        shutil.rmtree(staging, ignore_errors=True)

    def remove_stale_temporaries(self, older_than_s: float = 24 * 3600) -> int:
        """Remove what publishes and deletions cut short left in tmp/; returns how many directories went.

        Removed: staging directories of dead processes of this host, and staging/deleted directories older than
        `older_than_s` (other hosts' writers cannot be checked). Safe while jobs publish: a live writer's directory
        is kept. Workers call it when they start.
        """
        try:
            entries = list(os.scandir(self.tmp_dir))
        except FileNotFoundError:
            return 0
        deadline = time.time() - older_than_s
        host = socket.gethostname()
        removed = 0
        for entry in entries:
            if not entry.name.startswith(("staging-", "deleted-")):
                continue
            writer = _STAGING_WRITER_RE.match(entry.name)
            dead_writer = writer is not None and writer["host"] == host and not _process_alive(int(writer["pid"]))
            with contextlib.suppress(FileNotFoundError):
                if dead_writer or entry.stat(follow_symlinks=False).st_mtime < deadline:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        return removed

    # -----------------------------------------------------------------------------------------
    # Versions and names
    # -----------------------------------------------------------------------------------------

    def _check_name(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ValueError(
                f"A model name starts with a letter or digit and has at most 64 of A-Z a-z 0-9 _ . -. "
                f"Expected a match of {NAME_PATTERN}. Received: name={name!r}"
            )
        return name

    def _versions_on_disk(self, name: str) -> list[int]:
        try:
            entries = os.listdir(self.names_dir / name)
        except FileNotFoundError:
            return []
        return sorted(int(entry) for entry in entries if _VERSION_RE.fullmatch(entry))

    def reserve_version(self, name: str) -> int:
        """Reserve the next version of `name` (1, 2, ...): atomic across processes and hosts (os.mkdir).

        A reserved version is never handed out again, even if its model is never published or later deleted.
        """
        self._check_name(name)
        name_dir = self._ensure(self.names_dir / name)
        existing = self._versions_on_disk(name)
        version = (existing[-1] + 1) if existing else 1
        while True:
            try:
                os.mkdir(name_dir / str(version))
                return version
            except FileExistsError:
                # Someone else took it between our listing and our mkdir: try the next one.
                version += 1

    def _model_id_for(self, name: str, version: int) -> str | None:
        pointer = self.names_dir / name / str(version) / _MODEL_ID_FILE
        try:
            model_id = pointer.read_text(encoding="utf-8").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not is_model_id(model_id) or not (self.models_dir / model_id / CARD_FILE).is_file():
            # A pointer written just before a publish that never completed: not a model.
            return None
        return model_id

    def _published_ids_of_name(self, name: str) -> list[tuple[int, str]]:
        """(version, model id) of every published model of `name`, newest version first."""
        result = []
        for version in reversed(self._versions_on_disk(name)):
            model_id = self._model_id_for(name, version)
            if model_id is not None:
                result.append((version, model_id))
        return result

    # -----------------------------------------------------------------------------------------
    # Models
    # -----------------------------------------------------------------------------------------

    def publish_model(self, staging: Path, card: ModelCard) -> ModelCard:
        """Write card.json into `staging` and rename it to models/<card.id> in one atomic step.

        The card's (name, version) is registered first (reserving it if publish_training_result did not), so
        the model is reachable by name the moment the rename makes it visible.
        """
        staging = Path(staging).resolve()
        if staging.parent != self.tmp_dir.resolve() or not staging.is_dir():
            raise ValueError(
                f"Expected a staging directory made by ModelStore.staging_dir(). Received: staging={str(staging)!r}"
            )
        if not is_model_id(card.id):
            raise ValueError(f"Expected a model id 'm_' + 12 hex characters. Received: card.id={card.id!r}")
        self._check_name(card.name)
        if card.version < 1:
            raise ValueError(f"Expected a model version >= 1. Received: card.version={card.version}")
        target = self.models_dir / card.id
        if target.exists():
            raise Conflict(f"Expected a new model id. Received: card.id={card.id!r}, which is already published.")

        if card.owner != self.owner and not self.every_owner:
            raise ValueError(f"Expected a card of this store's owner {self.owner!r}. Received: card.owner={card.owner!r}")
        owned = self.with_owner(card.owner)
        version_dir = owned.names_dir / card.name / str(card.version)
        version_dir.mkdir(parents=True, exist_ok=True)
        existing = owned._model_id_for(card.name, card.version)
        if existing is not None and existing != card.id:
            raise Conflict(
                f"Version {card.version} of {card.name!r} is already published as {existing}. Expected a version "
                f"from ModelStore.reserve_version(). Received: version={card.version}"
            )

        card_path = staging / CARD_FILE
        atomic_write_text(card_path, card.model_dump_json(indent=2))
        created_ns = int(_aware(card.created_at).timestamp() * 1e9)
        os.utime(card_path, ns=(created_ns, created_ns))
        atomic_write_text(version_dir / _MODEL_ID_FILE, card.id)
        self._ensure(self.models_dir)
        try:
            os.rename(staging, target)
        except OSError as error:
            if not target.exists():
                raise
            # Another publish of the same id (a second attempt of one job) won the rename: ours is withdrawn.
            (version_dir / _MODEL_ID_FILE).unlink(missing_ok=True)
            raise Conflict(f"Expected a new model id. Received: card.id={card.id!r}, published meanwhile.") from error
        fsync_directory(self.models_dir)
        logger.info("published model %s (%s v%d)", card.id, card.name, card.version)
        return card

    def resolve_model_id(self, ref: str) -> str:
        """The model id that `ref` (id | name | name:version) points to. ModelNotFound otherwise."""
        if not isinstance(ref, str):
            raise ModelNotFound(f"Expected a model id, name or name:version. Received: ref={ref!r}")
        if is_model_id(ref) and self._visible(ref):
            return ref
        name, separator, version_text = ref.partition(":")
        if _NAME_RE.fullmatch(name):
            if not separator:
                published = self._published_ids_of_name(name)
                if published:
                    return published[0][1]
            elif _VERSION_RE.fullmatch(version_text):
                model_id = self._model_id_for(name, int(version_text))
                if model_id is not None:
                    return model_id
        raise ModelNotFound(
            f"No model matches this reference. Expected a model id ('m_' + 12 hex), a name or name:version of a "
            f"published model. Received: ref={ref!r}"
        )

    def read_card(self, ref: str) -> ModelCard:
        """The model card of `ref` (id | name for its latest version | name:version). ModelNotFound otherwise."""
        model_id = self.resolve_model_id(ref)
        try:
            text = (self.models_dir / model_id / CARD_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:  # deleted between resolving and reading
            raise ModelNotFound(f"Model {model_id} was deleted. Received: ref={ref!r}") from None
        return ModelCard.model_validate_json(text)

    def list_models(self, name: str | None = None, limit: int = 50, offset: int = 0) -> tuple[list[ModelCard], int]:
        """Published models, newest first, optionally only those called `name`; returns (page, total)."""
        if limit < 0 or offset < 0:
            raise ValueError(f"Expected limit >= 0 and offset >= 0. Received: limit={limit}, offset={offset}")
        if name is not None:
            if not _NAME_RE.fullmatch(name):
                return [], 0
            candidate_ids = [model_id for _, model_id in self._published_ids_of_name(name)]
        elif self.every_owner:
            try:
                candidate_ids = [entry for entry in os.listdir(self.models_dir) if is_model_id(entry)]
            except FileNotFoundError:
                candidate_ids = []
        else:
            try:
                names = [entry for entry in os.listdir(self.names_dir) if _NAME_RE.fullmatch(entry)]
            except FileNotFoundError:
                names = []
            candidate_ids = [model_id for name in names for _, model_id in self._published_ids_of_name(name)]
        dated = []
        for model_id in candidate_ids:
            try:
                modified_ns = os.stat(self.models_dir / model_id / CARD_FILE).st_mtime_ns
            except FileNotFoundError:
                continue
            dated.append((modified_ns, model_id))
        dated.sort(reverse=True)
        page = []
        for _, model_id in dated[offset : offset + limit]:
            try:
                page.append(self.read_card(model_id))
            except ModelNotFound:  # deleted while listing
                continue
        return page, len(dated)

    def artifact_path(self, ref: str, artifact: str) -> Path:
        """Path of one artifact of a model. ModelNotFound for an unknown model or artifact name."""
        if artifact not in MODEL_ARTIFACTS:
            raise ModelNotFound(
                f"Unknown model artifact. Expected one of {sorted(MODEL_ARTIFACTS)}. Received: artifact={artifact!r}"
            )
        model_id = self.resolve_model_id(ref)
        path = self.models_dir / model_id / artifact
        if not path.is_file():
            raise ModelNotFound(f"Model {model_id} has no {artifact}. Received: ref={ref!r}")
        return path

    def delete_model(self, ref: str) -> ModelCard:
        """Delete a model (its directory and its name entry); returns its card. The version is not reused."""
        card = self.read_card(ref)
        # Move it out of models/ first (atomic), so readers see it either whole or gone.
        trash = Path(tempfile.mkdtemp(prefix="deleted-", dir=self._ensure(self.tmp_dir)))
        try:
            os.rename(self.models_dir / card.id, trash / card.id)
        except FileNotFoundError:
            shutil.rmtree(trash, ignore_errors=True)
            raise ModelNotFound(f"Model {card.id} was already deleted. Received: ref={ref!r}") from None
        with contextlib.suppress(FileNotFoundError):
            (self._names_dir_of(card.owner) / card.name / str(card.version) / _MODEL_ID_FILE).unlink()
        shutil.rmtree(trash, ignore_errors=True)
        logger.info("deleted model %s (%s v%d)", card.id, card.name, card.version)
        return card

def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


