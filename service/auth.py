"""API keys with owners and roles: who is calling, and what the route they call needs.

A key is configured as `owner:role:secret` (DAE_API_KEYS, comma-separated, or one per line in DAE_API_KEYS_FILE)
and kept only as the sha256 of its secret; a presented key is hashed and compared with every configured digest in
constant time. Roles are ordered: `infer` (read models, /reconstruct) < `train` (also jobs, datasets, deleting its
own models) < `admin` (every owner's resources, /metrics when protected). With no keys the service is open and
single-owner: every caller is the default owner with every permission.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from dae.errors import DaeError
from dae.spec import DEFAULT_OWNER, OWNER_PATTERN

logger = logging.getLogger(__name__)

#: Shortest accepted secret: 16 characters (e.g. `openssl rand -hex 16` gives 32).
MIN_SECRET_LENGTH = 16


class Role(IntEnum):
    """What a key may do; a higher role may do everything a lower one may."""

    infer = 1
    train = 2
    admin = 3


@dataclass(frozen=True)
class Principal:
    """The caller of one request: the owner its resources belong to and its role."""

    owner: str
    role: Role

    @property
    def sees_every_owner(self) -> bool:
        """Admins read, list and change every owner's resources."""
        return self.role >= Role.admin

    def acting_as(self, owner: str | None) -> tuple[str, bool]:
        """(owner, every_owner) of the store views this caller uses when it names `owner` (None: its own).

        An admin naming no owner sees every owner's resources (and creates its own); naming one, only that owner's.
        Anyone else may name only its own owner (Forbidden otherwise).
        """
        if owner is None:
            return self.owner, self.sees_every_owner
        if owner != self.owner and not self.sees_every_owner:
            raise Forbidden(
                f"Only an admin key may name another owner. Expected owner={self.owner!r} (your key's) or no owner "
                f"parameter. Received: owner={owner!r} with a {self.role.name} key of owner {self.owner!r}"
            )
        return owner, False


class Forbidden(DaeError):
    """A known key whose role does not allow what it asked for (403)."""


#: Everyone, when no keys are configured: the default owner, allowed everything (the service as it was).
OPEN_ACCESS = Principal(DEFAULT_OWNER, Role.admin)


@dataclass(frozen=True)
class _Key:
    owner: str
    role: Role
    digest: bytes


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class KeyRing:
    """The configured keys, as digests; `principal()` answers who presented a key."""

    def __init__(self, entries: list[str]) -> None:
        self._keys = [_parse_entry(entry, index) for index, entry in enumerate(entries)]
        digests = [key.digest for key in self._keys]
        if len(set(digests)) != len(digests):
            raise ValueError("Two API keys have the same secret. Expected a distinct secret per key.")

    @classmethod
    def from_settings(cls, entries: list[str], keys_file: Path | None) -> KeyRing:
        """Keys from DAE_API_KEYS entries plus the lines of DAE_API_KEYS_FILE (blank lines and # comments skipped)."""
        lines = list(entries)
        if keys_file is not None:
            text = keys_file.read_text(encoding="utf-8")
            lines += [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        return cls(lines)

    @property
    def enabled(self) -> bool:
        """False when no key is configured: the service is open."""
        return bool(self._keys)

    @property
    def owners(self) -> list[str]:
        """The owners that have keys, sorted."""
        return sorted({key.owner for key in self._keys})

    def principal(self, presented: str) -> Principal | None:
        """The owner and role of a presented key, or None for an unknown one (every digest compared)."""
        digest = _digest(presented)
        found: _Key | None = None
        for key in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(key.digest, digest):
                found = key
        return Principal(found.owner, found.role) if found is not None else None


def _parse_entry(entry: str, index: int) -> _Key:
    """`owner:role:secret` → a key; ValueError naming the entry by position, never echoing a secret.

    A bare secret (the first wave's format, no ':') stays what it was: the default owner's admin key.
    """
    entry = entry.strip()
    if ":" not in entry and entry:
        logger.warning("API key #%d has no owner and role: it is the %r owner's admin key (configure "
                       "owner:role:secret to scope it)", index + 1, DEFAULT_OWNER)
        return _Key(DEFAULT_OWNER, Role.admin, _digest(entry))
    owner, _, rest = entry.partition(":")
    role_name, _, secret = rest.partition(":")
    where = f"API key #{index + 1}"
    if not secret:
        raise ValueError(
            f"{where} is not owner:role:secret. Expected e.g. team-a:train:<secret> with role infer, train or "
            f"admin. Received: an entry with {entry.count(':')} ':' (secrets are never shown)"
        )
    if re.fullmatch(OWNER_PATTERN, owner) is None:
        raise ValueError(f"{where} has an invalid owner. Expected a match of {OWNER_PATTERN}. Received: {owner!r}")
    if role_name not in Role.__members__:
        raise ValueError(f"{where} has an unknown role. Expected one of infer, train, admin. Received: {role_name!r}")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"{where} ({owner}) has a short secret. Expected at least {MIN_SECRET_LENGTH} characters. "
            f"Received: {len(secret)} characters"
        )
    return _Key(owner, Role[role_name], _digest(secret))


#: (methods, path pattern, role needed), first match wins; paths of no entry need any valid key (then 404).
PERMISSIONS: tuple[tuple[frozenset[str], re.Pattern[str], Role], ...] = (
    (frozenset({"POST"}), re.compile(r"/reconstruct"), Role.infer),
    (frozenset({"GET", "HEAD"}), re.compile(r"/models(/.*)?"), Role.infer),
    (frozenset({"DELETE"}), re.compile(r"/models/[^/]+"), Role.train),
    (frozenset({"GET", "HEAD", "POST", "DELETE"}), re.compile(r"/jobs(/.*)?"), Role.train),
    (frozenset({"GET", "HEAD", "POST", "DELETE"}), re.compile(r"/datasets(/.*)?"), Role.train),
    (frozenset({"GET", "HEAD"}), re.compile(r"/metrics"), Role.admin),
)


#: Paths whose documentation pages are open unless DAE_DOCS_REQUIRE_KEY is set.
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
#: Paths that are always open: the probes (they reveal no internals).
PROBE_PATHS = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"


def required_role(method: str, path: str) -> Role:
    """The least role a request needs (checked before routing, so before any body is read)."""
    for methods, pattern, role in PERMISSIONS:
        if method in methods and pattern.fullmatch(path):
            return role
    return Role.infer
