"""Model references (id | name | name:version) resolved to model ids through the caller's owner-scoped view of the
model store (core.store.ModelStore.with_owner): names resolve inside the caller's owner, and another owner's model
is ModelNotFound exactly like a missing one, unless the view sees every owner (an admin).

The store's answer is kept for NAME_CACHE_TTL_S per (owner, every_owner, reference), so a newly published version
of a name serves within that time; a kept answer is used only while its model's card is on disk (one stat), so a
deleted model stops serving at once.
"""

from __future__ import annotations

import os
import time

from core.store import CARD_FILE, ModelStore
from dae.spec import DEFAULT_OWNER

#: How long the store's answer for one reference is kept (a newly published version serves within this time).
NAME_CACHE_TTL_S = 1.0
#: Entries kept at most (references times owners); past it the cache starts over.
NAME_CACHE_SIZE = 4096


class ModelResolver:
    """The store's resolve_model_id, per owner view, with a short-lived cache (see the module docstring)."""

    def __init__(self, store: ModelStore, *, ttl_s: float = NAME_CACHE_TTL_S, max_entries: int = NAME_CACHE_SIZE) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._views: dict[tuple[str, bool], ModelStore] = {}
        # (owner, every_owner, reference) -> (model id, path of its card, expiry on the monotonic clock)
        self._answers: dict[tuple[str, bool, str], tuple[str, str, float]] = {}

    def view(self, owner: str, every_owner: bool) -> ModelStore:
        """The store as `owner` sees it (built once per owner: a view resolves its root path)."""
        key = (owner, every_owner)
        view = self._views.get(key)
        if view is None:
            if len(self._views) >= self.max_entries:
                self._views.clear()
            view = self._views[key] = self.store.with_owner(owner, every_owner=every_owner)
        return view

    def resolve(self, ref: str, owner: str = DEFAULT_OWNER, *, every_owner: bool = True) -> str:
        """The model id `ref` points to for this owner view; ModelNotFound (the store's message) otherwise."""
        key = (owner, every_owner, ref)
        answer = self._answers.get(key)
        if answer is not None and answer[2] > time.monotonic() and os.path.isfile(answer[1]):
            return answer[0]
        model_id = self.view(owner, every_owner).resolve_model_id(ref)
        if len(self._answers) >= self.max_entries:
            self._answers.clear()
        card_path = os.path.join(self.store.models_dir, model_id, CARD_FILE)
        self._answers[key] = (model_id, card_path, time.monotonic() + self.ttl_s)
        return model_id

    def forget(self, model_id: str) -> None:
        """Drop every kept answer that points to `model_id` (after it was deleted)."""
        for key in [key for key, answer in self._answers.items() if answer[0] == model_id]:
            del self._answers[key]

    def __len__(self) -> int:
        return len(self._answers)
