"""ModelStore per owner: names and versions live inside an owner, another owner's model does not exist for a view,
an every-owner view (an admin) sees all of them, and a store written before owners existed moves to `default`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.datasets import DatasetStore
from core.migrations import migrate_store_names
from core.store import ModelStore
from dae.errors import DatasetNotFound, ModelNotFound
from dae.spec import DEFAULT_OWNER
from tests.core.test_store import publish


@pytest.fixture
def owners(store_dir: Path) -> tuple[ModelStore, ModelStore]:
    return ModelStore(store_dir, "team-a"), ModelStore(store_dir, "team-b")


def test_the_same_name_resolves_to_each_owners_own_model(owners: tuple[ModelStore, ModelStore]) -> None:
    a, b = owners
    first = publish(a, "x")
    second = publish(b, "x")
    assert (first.version, second.version) == (1, 1)  # versions count per owner
    assert a.read_card("x").id == first.id and b.read_card("x").id == second.id
    assert a.read_card("x:1").id == first.id and b.read_card("x:1").id == second.id
    assert a.read_card("x").owner == "team-a" and b.read_card("x").owner == "team-b"


def test_another_owners_model_is_not_found_by_id_artifact_list_or_delete(owners: tuple[ModelStore, ModelStore]) -> None:
    a, b = owners
    theirs = publish(b, "secret")
    for attempt in (lambda: a.read_card(theirs.id), lambda: a.artifact_path(theirs.id, "model.onnx"),
                    lambda: a.delete_model(theirs.id), lambda: a.read_card("secret")):
        with pytest.raises(ModelNotFound) as caught:
            attempt()
        assert "team-b" not in str(caught.value)  # nothing says whose it is
    assert a.list_models() == ([], 0) and a.list_models(name="secret") == ([], 0)
    assert b.read_card(theirs.id) == theirs  # untouched


def test_an_every_owner_view_sees_and_lists_all_owners(owners: tuple[ModelStore, ModelStore], store_dir: Path) -> None:
    a, b = owners
    mine, theirs = publish(a, "m", minutes=1), publish(b, "t", minutes=2)
    admin = ModelStore(store_dir, "ops", every_owner=True)
    assert [card.id for card in admin.list_models()[0]] == [theirs.id, mine.id]
    assert admin.read_card(theirs.id) == theirs
    assert [card.id for card in a.list_models()[0]] == [mine.id]
    with pytest.raises(ModelNotFound):  # names are still per owner: an admin names the owner through its view
        admin.read_card("t")
    assert admin.with_owner("team-b", every_owner=True).read_card("t") == theirs
    assert admin.delete_model(theirs.id) == theirs
    with pytest.raises(ModelNotFound):
        b.read_card("t")


def test_a_store_without_owners_moves_to_the_default_owner(store_dir: Path) -> None:
    legacy = ModelStore(store_dir)  # the default owner writes where the old layout kept every name
    card = publish(legacy, "old")
    index = store_dir / "owners" / DEFAULT_OWNER / "names"
    index.rename(store_dir / "names")  # the layout before owners: names/<name>/<version>/model_id
    (store_dir / "owners" / DEFAULT_OWNER).rmdir()
    assert migrate_store_names(ModelStore(store_dir)) is True
    assert not (store_dir / "names").exists()
    assert ModelStore(store_dir).read_card("old") == card and ModelStore(store_dir).read_card("old:1") == card
    assert migrate_store_names(ModelStore(store_dir)) is False  # once


def test_migration_merges_into_an_existing_default_index(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    old = publish(store, "old")
    (store_dir / "owners" / DEFAULT_OWNER / "names").rename(store_dir / "names")
    new = publish(store, "new")  # written after the upgrade, before the migration ran
    assert migrate_store_names(store) is True
    assert store.read_card("old") == old and store.read_card("new") == new
    assert not (store_dir / "names").exists()


def test_datasets_belong_to_their_uploader(store_dir: Path) -> None:
    images = np.zeros((2, 4, 4, 1), np.float32)
    a, b = DatasetStore(store_dir, "team-a"), DatasetStore(store_dir, "team-b")
    theirs = b.save(images, filename="b.npz")
    assert theirs.owner == "team-b"
    for attempt in (lambda: a.info(theirs.id), lambda: a.load_images(theirs.id), lambda: a.delete(theirs.id)):
        with pytest.raises(DatasetNotFound):
            attempt()
    assert a.list() == [] and [info.id for info in b.list()] == [theirs.id]
    admin = DatasetStore(store_dir, "ops", every_owner=True)
    assert admin.info(theirs.id) == theirs and [info.id for info in admin.list()] == [theirs.id]
    np.testing.assert_array_equal(b.load_images(theirs.id), images)


def test_a_dataset_written_before_owners_is_the_default_owners(store_dir: Path) -> None:
    store = DatasetStore(store_dir)
    info = store.save(np.zeros((2, 4, 4, 1), np.float32))
    metadata = store.directory / f"{info.id}.json"
    document = json.loads(metadata.read_text())
    del document["owner"]  # as a store of the first wave wrote it
    metadata.write_text(json.dumps(document))
    assert store.info(info.id).owner == DEFAULT_OWNER
    with pytest.raises(DatasetNotFound):
        DatasetStore(store_dir, "team-a").info(info.id)
