"""ModelStore: atomic publishing, versions across processes, reference resolution, path-traversal safety, datasets."""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path

import numpy as np
import pytest

from core import datasets as datasets_module
from core import fsio
from core.checkpoints import CheckpointStore
from core.datasets import DatasetStore
from core.fsio import atomic_write_bytes
from core.store import ModelStore, new_model_id
from dae.errors import Conflict, DatasetNotFound, ModelNotFound, PayloadTooLarge
from dae.fingerprints import fingerprint_pixels
from dae.spec import ModelCard, TrainingSpec

BASE_TIME = datetime(2025, 1, 1, tzinfo=UTC)


def make_card(store: ModelStore, name: str, *, minutes: int = 0, version: int | None = None) -> ModelCard:
    return ModelCard(
        id=new_model_id(),
        name=name,
        version=version if version is not None else store.reserve_version(name),
        created_at=BASE_TIME + timedelta(minutes=minutes),
        spec=TrainingSpec(dataset="digits"),
        input_shape=[None, None, 1],
        trained_shape=[8, 8, 1],
        parameters=123,
        owner=store.owner,
    )


def publish(store: ModelStore, name: str, *, minutes: int = 0) -> ModelCard:
    staging = store.staging_dir()
    (staging / "model.onnx").write_bytes(b"onnx bytes")
    return store.publish_model(staging, make_card(store, name, minutes=minutes))


def _reserve_many(root: str, name: str, count: int) -> list[int]:
    store = ModelStore(root)
    return [store.reserve_version(name) for _ in range(count)]


def test_reserve_version_counts_up_per_name(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    assert [store.reserve_version("alpha") for _ in range(3)] == [1, 2, 3]
    assert store.reserve_version("beta") == 1
    assert store.reserve_version("alpha") == 4


def test_reserve_version_is_atomic_across_processes(store_dir: Path) -> None:
    # spawn: fresh interpreters (no inherited TensorFlow threads), each racing for versions of the same name.
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_reserve_many, [(str(store_dir), "raced", 5)] * 4)
    versions = [version for batch in results for version in batch]
    assert sorted(versions) == list(range(1, 21))


def test_reserve_version_rejects_bad_names(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    for name in ("../x", "", ".hidden", "a/b", "x" * 65):
        with pytest.raises(ValueError, match="Expected a match"):
            store.reserve_version(name)
    assert not (store_dir.parent / "x").exists()


def test_publish_and_resolve_id_name_and_version(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    first = publish(store, "shirts", minutes=1)
    second = publish(store, "shirts", minutes=2)
    other = publish(store, "digits-conv", minutes=3)

    assert (first.version, second.version, other.version) == (1, 2, 1)
    assert store.read_card(first.id) == first
    assert store.read_card("shirts").id == second.id  # name -> latest version
    assert store.read_card("shirts:1").id == first.id
    assert store.read_card("shirts:2").id == second.id
    assert store.read_card("digits-conv").id == other.id
    assert store.artifact_path("shirts:1", "model.onnx").read_bytes() == b"onnx bytes"
    assert store.artifact_path(first.id, "card.json") == store.models_dir / first.id / "card.json"
    with pytest.raises(ModelNotFound):
        store.read_card("shirts:3")
    with pytest.raises(ModelNotFound):
        store.read_card("trousers")
    with pytest.raises(ModelNotFound, match="no history.png"):
        store.artifact_path(first.id, "history.png")


def test_publish_is_one_rename_and_leaves_no_temporary_files(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    staging = store.staging_dir()
    (staging / "model.keras").write_bytes(b"k")
    card = make_card(store, "atomic")
    # Until publish_model renames it, the staged model is invisible.
    assert store.list_models() == ([], 0)
    with pytest.raises(ModelNotFound):
        store.read_card("atomic")
    store.publish_model(staging, card)
    assert not staging.exists()
    assert sorted(os.listdir(store.models_dir / card.id)) == ["card.json", "model.keras"]
    assert os.listdir(store.tmp_dir) == []
    # card.json's mtime is the card's creation time: listing sorts by a stat, not by reading every card.
    assert os.stat(store.models_dir / card.id / "card.json").st_mtime == pytest.approx(card.created_at.timestamp())


def test_publish_refuses_a_taken_version_and_foreign_staging(store_dir: Path, tmp_path: Path) -> None:
    store = ModelStore(store_dir)
    first = publish(store, "dup")
    staging = store.staging_dir()
    with pytest.raises(Conflict, match="already published"):
        store.publish_model(staging, make_card(store, "dup", version=first.version))
    assert store.read_card("dup:1").id == first.id
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ValueError, match="staging directory"):
        store.publish_model(outside, make_card(store, "dup"))


def test_atomic_write_keeps_old_content_when_replace_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "card.json"
    atomic_write_bytes(target, b"old")

    def failing_replace(_source: str, _destination: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fsio.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["card.json"]  # the temp file was removed


def test_list_models_newest_first_with_pagination_and_name_filter(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    cards = [publish(store, "a" if index % 2 else "b", minutes=index) for index in range(5)]
    page, total = store.list_models()
    assert total == 5
    assert [card.id for card in page] == [card.id for card in reversed(cards)]
    page, total = store.list_models(limit=2, offset=1)
    assert total == 5
    assert [card.id for card in page] == [cards[3].id, cards[2].id]
    page, total = store.list_models(name="a")
    assert total == 2
    assert [card.id for card in page] == [cards[3].id, cards[1].id]
    assert store.list_models(name="missing") == ([], 0)
    assert store.list_models(name="../etc") == ([], 0)
    assert store.list_models(offset=10) == ([], 5)


def test_delete_model_never_reuses_its_version(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    first = publish(store, "gone")
    second = publish(store, "gone", minutes=1)
    deleted = store.delete_model("gone")  # the latest
    assert deleted.id == second.id
    assert not (store.models_dir / second.id).exists()
    assert store.read_card("gone").id == first.id  # latest is version 1 again
    with pytest.raises(ModelNotFound):
        store.read_card(second.id)
    with pytest.raises(ModelNotFound):
        store.delete_model(second.id)
    assert publish(store, "gone", minutes=2).version == 3
    assert store.list_models()[1] == 2


@pytest.mark.parametrize(
    "ref",
    [
        "../etc/passwd",
        "..",
        "/etc/passwd",
        "m_../../../etc",
        "m_0123456789ab/../../x",
        "m_ABCDEF123456",
        "name:../1",
        "name:0",
        "name:-1",
        "name:1:2",
        "",
        "a\x00b",
        "models",
    ],
)
def test_bad_model_refs_raise_not_found_and_touch_nothing_outside(store_dir: Path, ref: str) -> None:
    store = ModelStore(store_dir)
    publish(store, "name")
    before = sorted(os.listdir(store_dir.parent))
    with pytest.raises(ModelNotFound):
        store.read_card(ref)
    with pytest.raises(ModelNotFound):
        store.artifact_path(ref, "card.json")
    with pytest.raises(ModelNotFound):
        store.delete_model(ref)
    assert sorted(os.listdir(store_dir.parent)) == before
    assert len(store.list_models()[0]) == 1


def test_bad_artifact_names_and_dataset_ids_are_rejected(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    card = publish(store, "name")
    for artifact in ("../card.json", "../../models", "model.keras/..", "/etc/passwd"):
        with pytest.raises(ModelNotFound, match="Unknown model artifact"):
            store.artifact_path(card.id, artifact)
    for dataset_id in ("../x", "ds_../../etc", "ds_0123456789ab/../x", "DS_0123456789AB", ""):
        with pytest.raises(DatasetNotFound):
            DatasetStore(store.root).info(dataset_id)
        with pytest.raises(DatasetNotFound):
            DatasetStore(store.root).load_images(dataset_id)
        with pytest.raises(DatasetNotFound):
            DatasetStore(store.root).delete(dataset_id)
    for job_id in ("../x", "a/b", "", ".."):
        with pytest.raises(ValueError, match="checkpoint key"):
            CheckpointStore(store.root).job_dir(job_id)
    assert CheckpointStore(store.root).job_dir("j_0123456789abcdef") == CheckpointStore(store.root).directory / "j_0123456789abcdef"


def test_datasets_round_trip_uint8_exactly_and_floats_as_float(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1) * 7
    images = pixels.astype(np.float32) / 255.0
    info = DatasetStore(store.root).save(images, filename="upload.npz")
    assert info.id.startswith("ds_") and info.count == 2 and info.shape == [4, 4, 1]
    assert info.filename == "upload.npz" and not info.builtin
    with np.load(DatasetStore(store.root).directory / f"{info.id}.npz", allow_pickle=False) as archive:
        assert archive["x"].dtype == np.uint8  # k/255 values stored losslessly as bytes
    np.testing.assert_array_equal(DatasetStore(store.root).load_images(info.id), images)
    assert info.fingerprint == fingerprint_pixels(pixels)

    smooth = np.linspace(0, 1, 3 * 5 * 5 * 3, dtype=np.float32).reshape(3, 5, 5, 3) ** 2
    float_info = DatasetStore(store.root).save(smooth, filename=None)
    np.testing.assert_array_equal(DatasetStore(store.root).load_images(float_info.id), smooth)
    assert {info.id, float_info.id} == {entry.id for entry in DatasetStore(store.root).list()}
    assert DatasetStore(store.root).info(float_info.id) == float_info

    DatasetStore(store.root).delete(info.id)
    with pytest.raises(DatasetNotFound):
        DatasetStore(store.root).info(info.id)
    assert [entry.id for entry in DatasetStore(store.root).list()] == [float_info.id]
    assert not (DatasetStore(store.root).directory / f"{info.id}.npz").exists()


def test_empty_store_lists_nothing(store_dir: Path) -> None:
    store = ModelStore(store_dir / "not-created-yet")
    assert store.list_models() == ([], 0)
    assert DatasetStore(store.root).list() == []
    with pytest.raises(ModelNotFound):
        store.read_card("anything")


def test_stale_staging_directories_are_removed(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    stale, fresh = store.staging_dir(), store.staging_dir()
    (stale / "model.keras").write_bytes(b"half written by a killed worker")
    two_days_ago = datetime.now(UTC).timestamp() - 2 * 24 * 3600
    os.utime(stale, (two_days_ago, two_days_ago))
    assert store.remove_stale_temporaries() == 1
    assert not stale.exists() and fresh.exists()
    assert ModelStore(store_dir / "empty").remove_stale_temporaries() == 0


def test_staging_directories_of_dead_writers_on_this_host_are_removed_at_once(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    mine = store.staging_dir()  # this process: alive
    assert mine.name.startswith(f"staging-{os.getpid()}@{socket.gethostname()}-")
    dead_writer = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                 text=True, check=True)
    dead_pid = int(dead_writer.stdout)
    cut_short = store.tmp_dir / f"staging-{dead_pid}@{socket.gethostname()}-abc123"
    cut_short.mkdir()
    (cut_short / "model.onnx").write_bytes(b"a publish the kill cut short")
    other_host = store.tmp_dir / f"staging-{dead_pid}@another-host-abc123"  # cannot be checked from here
    other_host.mkdir()
    assert store.remove_stale_temporaries(older_than_s=3600) == 1
    assert not cut_short.exists() and mine.exists() and other_host.exists()


def test_a_second_publish_of_the_same_model_id_is_refused_and_leaves_no_version(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    card = make_card(store, "twice")
    store.publish_model(store.staging_dir(), card)
    duplicate = card.model_copy(update={"version": store.reserve_version(card.name)})
    with pytest.raises(Conflict):
        store.publish_model(store.staging_dir(), duplicate)
    assert store.list_models(name=card.name)[1] == 1


def test_datasets_are_stored_compressed_and_uncompressed_files_of_older_versions_still_load(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    smooth = np.tile(np.linspace(0, 1, 32, dtype=np.float32) ** 2, (64, 32, 1))[..., np.newaxis]  # not k/255
    info = DatasetStore(store.root).save(smooth)
    path = DatasetStore(store.root).directory / f"{info.id}.npz"
    with zipfile.ZipFile(path) as archive:
        assert [member.compress_type for member in archive.infolist()] == [zipfile.ZIP_DEFLATED]
    assert path.stat().st_size < smooth.nbytes / 4
    np.testing.assert_array_equal(DatasetStore(store.root).load_images(info.id), smooth)

    pixels = np.arange(64 * 4 * 4, dtype=np.uint8).reshape(64, 4, 4, 1)
    older = DatasetStore(store.root).save(pixels.astype(np.float32) / np.float32(255.0))
    np.savez(DatasetStore(store.root).directory / f"{older.id}.npz", x=pixels)  # what save_dataset wrote before: no compression
    loaded = DatasetStore(store.root).load_images(older.id)
    assert loaded.dtype == np.float32
    np.testing.assert_array_equal(loaded, pixels.astype(np.float32) / np.float32(255.0))


def test_the_uint8_check_looks_at_every_chunk(store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_UINT8_CHECK_CHUNK", 7)  # several chunks for 2 x 4 x 4 values
    store = ModelStore(store_dir)
    levels = np.arange(32, dtype=np.float32).reshape(2, 4, 4, 1) / np.float32(255.0)
    exact = DatasetStore(store.root).save(levels)
    off_grid = levels.copy()
    off_grid[1, 3, 3, 0] += np.float32(1e-3)  # in the last chunk
    inexact = DatasetStore(store.root).save(off_grid)
    for info, dtype in ((exact, np.uint8), (inexact, np.float32)):
        with np.load(DatasetStore(store.root).directory / f"{info.id}.npz", allow_pickle=False) as archive:
            assert archive["x"].dtype == dtype
    np.testing.assert_array_equal(DatasetStore(store.root).load_images(exact.id), levels)
    np.testing.assert_array_equal(DatasetStore(store.root).load_images(inexact.id), off_grid)


class _FrozenDatetime(datetime):
    """datetime whose now() is fixed, so the metadata file of every save has the same length."""

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:
        return datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=tz)


def test_the_store_cap_boundary_and_a_refused_upload_leaves_nothing(
    store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets_module, "datetime", _FrozenDatetime)
    store = ModelStore(store_dir)
    images = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1)).astype(np.float32) / np.float32(255.0)
    DatasetStore(store.root).save(images, filename="first.npz")
    used = DatasetStore(store.root).total_bytes()
    probe = DatasetStore(store.root).save(images, filename="first.npz", max_total_bytes=10 * used)
    needed = DatasetStore(store.root).total_bytes() - used
    DatasetStore(store.root).delete(probe.id)
    assert DatasetStore(store.root).total_bytes() == used and needed > 0

    fits = DatasetStore(store.root).save(images, filename="first.npz", max_total_bytes=used + needed)  # exactly full
    assert DatasetStore(store.root).total_bytes() == used + needed
    DatasetStore(store.root).delete(fits.id)
    before = sorted(os.listdir(DatasetStore(store.root).directory))
    with pytest.raises(PayloadTooLarge, match=rf"take {used:,} of the {used + needed - 1:,} bytes allowed") as refused:
        DatasetStore(store.root).save(images, filename="first.npz", max_total_bytes=used + needed - 1)
    assert f"Received: {needed:,} bytes" in str(refused.value) and "DAE_MAX_STORE_DATASETS_GB" in str(refused.value)
    with pytest.raises(PayloadTooLarge, match="Received: an upload while the store is full"):
        DatasetStore(store.root).save(images, max_total_bytes=used)
    assert sorted(os.listdir(DatasetStore(store.root).directory)) == before


def test_datasets_bytes_counts_the_dataset_files_only(store_dir: Path) -> None:
    store = ModelStore(store_dir)
    assert DatasetStore(store.root).total_bytes() == 0
    info = DatasetStore(store.root).save(np.zeros((2, 4, 4, 1), np.float32))
    files = [DatasetStore(store.root).directory / f"{info.id}.{extension}" for extension in ("npz", "json")]
    (DatasetStore(store.root).directory / f".{info.id}.abc.npz.tmp").write_bytes(b"x" * 1000)  # a write cut short
    (DatasetStore(store.root).cache_dir).mkdir()
    (DatasetStore(store.root).cache_dir / "mnist.npz").write_bytes(b"x" * 1000)
    assert DatasetStore(store.root).total_bytes() == sum(path.stat().st_size for path in files)
