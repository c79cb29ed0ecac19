"""/models and /datasets: listing, cards, plots, deletion, uploads and their limits."""

from __future__ import annotations

import io
import os
import time
import zipfile

import numpy as np
import pytest
from fastapi.testclient import TestClient

from core.datasets import DatasetStore
from core.store import ModelStore
from service.config import Settings
from service.main import create_app
from tests.hostile_payloads import empty_members_zip, npz_bomb
from tests.service.tiny_models import png_base64, png_bytes, publish_tiny_model

# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_list_models_newest_first_with_name_filter_and_pagination(client, store, tiny_models):
    first = publish_tiny_model(store, tiny_models["dense"], "alpha")
    second = publish_tiny_model(store, tiny_models["dense"], "alpha")
    other = publish_tiny_model(store, tiny_models["conv"], "beta")
    page = client.get("/models").json()
    assert [card["id"] for card in page["items"]] == [other.id, second.id, first.id]
    assert page["total"] == 3
    alpha = client.get("/models", params={"name": "alpha"}).json()
    assert [card["version"] for card in alpha["items"]] == [2, 1] and alpha["total"] == 2
    paged = client.get("/models", params={"limit": 1, "offset": 1}).json()
    assert [card["id"] for card in paged["items"]] == [second.id] and paged["total"] == 3
    assert client.get("/models", params={"name": "../x"}).json() == {"items": [], "total": 0, "limit": 50, "offset": 0}
    assert client.get("/models", params={"limit": 501}).status_code == 422


def test_read_model_by_id_name_and_name_version(client, store, tiny_models):
    first = publish_tiny_model(store, tiny_models["dense"], "gamma")
    second = publish_tiny_model(store, tiny_models["dense"], "gamma")
    assert client.get(f"/models/{first.id}").json()["version"] == 1
    assert client.get("/models/gamma").json()["id"] == second.id  # latest version
    card = client.get("/models/gamma:1").json()
    assert card["id"] == first.id
    assert card["trained_shape"] == [8, 8, 1] and card["spec"]["architecture"]["type"] == "dense"


@pytest.mark.parametrize("ref", ["m_000000000000", "nobody", "gamma:9", "..%2F..%2Fetc", "a:b:c", "%2E%2E"])
def test_unknown_and_traversal_refs_are_404(client, ref):
    for suffix in ("", "/history.png", "/samples.png"):
        response = client.get(f"/models/{ref}{suffix}")
        assert response.status_code == 404, (ref, suffix)
        assert "Received:" in response.json()["detail"]
    assert client.delete(f"/models/{ref}").status_code == 404


def test_training_plots_are_served_as_png(client, dense_card):
    for artifact in ("history.png", "samples.png"):
        response = client.get(f"/models/{dense_card.name}/{artifact}")
        assert response.status_code == 200
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(b"\x89PNG")


def test_delete_model_removes_it_and_stops_serving(client, dense_card):
    image = png_base64(np.zeros((8, 8)))
    assert client.post("/reconstruct", json={"model": dense_card.id, "image": image}).status_code == 200
    assert client.delete(f"/models/{dense_card.id}").status_code == 204
    assert client.get(f"/models/{dense_card.id}").status_code == 404
    gone = client.post("/reconstruct", json={"model": dense_card.id, "image": image})
    assert gone.status_code == 404
    assert client.delete(f"/models/{dense_card.id}").status_code == 404


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


def npz_bytes(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x=images)
    return buffer.getvalue()


def test_upload_list_read_and_delete_a_dataset(client):
    images = np.random.default_rng(0).integers(0, 256, (12, 6, 6), dtype=np.uint8)
    response = client.post("/datasets", files={"file": ("faces.npz", npz_bytes(images), "application/octet-stream")})
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["id"].startswith("ds_") and info["count"] == 12 and info["shape"] == [6, 6, 1]
    assert response.headers["location"] == f"/datasets/{info['id']}"

    listed = client.get("/datasets").json()
    ids = [entry["id"] for entry in listed]
    assert ids[:4] == ["fashion_mnist", "mnist", "digits", "natural_patches"] and info["id"] in ids
    assert client.get(f"/datasets/{info['id']}").json()["filename"] == "faces.npz"
    assert client.get("/datasets/digits").json()["shape"] == [8, 8, 1]

    assert client.delete(f"/datasets/{info['id']}").status_code == 204
    assert client.get(f"/datasets/{info['id']}").status_code == 404
    assert client.delete(f"/datasets/{info['id']}").status_code == 404


def test_upload_a_zip_of_pngs(client):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for index in range(5):
            zipped.writestr(f"img{index}.png", png_bytes(np.full((4, 5), index / 5)))
    response = client.post("/datasets", files={"file": ("pngs.zip", archive.getvalue(), "application/zip")})
    assert response.status_code == 201, response.text
    assert response.json()["count"] == 5 and response.json()["shape"] == [4, 5, 1]


@pytest.mark.parametrize(
    "filename, content, status, fragment",
    [
        ("notes.txt", b"hello", 422, ".npz"),
        ("broken.npz", b"PK\x03\x04 not really a zip", 422, "npz"),
        ("empty.npz", b"", 422, "empty"),
        ("nan.npz", npz_bytes(np.full((4, 4, 4), np.nan, np.float32)), 422, ""),
        ("one.npz", npz_bytes(np.zeros((1, 4, 4), np.uint8)), 422, "at least 2"),
    ],
)
def test_bad_uploads_are_4xx_with_a_message(client, filename, content, status, fragment):
    response = client.post("/datasets", files={"file": (filename, content, "application/octet-stream")})
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]


def test_upload_without_a_file_is_422(client):
    response = client.post("/datasets", data={"something": "else"})
    assert response.status_code == 422
    assert "file" in response.json()["detail"]


def test_upload_over_the_body_limit_is_413(settings, store_dir):
    small = Settings(**{**settings.model_dump(), "max_upload_mb": 0.01})  # 10 KiB
    with TestClient(create_app(small)) as client:
        big = npz_bytes(np.zeros((40, 16, 16), np.uint8))  # ~10 KiB + headers
        response = client.post("/datasets", files={"file": ("big.npz", big + b"\0" * 4096, "application/octet-stream")})
        assert response.status_code == 413
        assert "DAE_MAX_UPLOAD_MB" in response.json()["detail"]
        assert DatasetStore(store_dir).list() == []


def test_upload_over_the_image_count_limit_is_413(settings):
    limited = Settings(**{**settings.model_dump(), "max_dataset_images": 3})
    with TestClient(create_app(limited)) as client:
        response = client.post("/datasets", files={"file": ("d.npz", npz_bytes(np.zeros((5, 4, 4), np.uint8)), "x")})
        assert response.status_code == 413
        assert "at most 3" in response.json()["detail"]


def test_builtin_datasets_cannot_be_deleted_and_odd_ids_are_404(client):
    response = client.delete("/datasets/digits")
    assert response.status_code == 409
    assert "Built-in" in response.json()["detail"]
    for dataset_id in ("ds_000000000000", "nope", "..%2Fmodels", "ds_..%2F..%2Fx"):
        assert client.get(f"/datasets/{dataset_id}").status_code == 404, dataset_id
    assert client.get(f"/datasets/{'x' * 65}").status_code == 422


# ---------------------------------------------------------------------------------------------
# Upload caps: decoded size (DAE_MAX_DATASET_MB), store size (DAE_MAX_STORE_DATASETS_GB), bombs
# ---------------------------------------------------------------------------------------------


def upload(client: TestClient, filename: str, content: bytes):
    return client.post("/datasets", files={"file": (filename, content, "application/octet-stream")})


def stored_files(store: ModelStore) -> list[str]:
    return sorted(os.listdir(DatasetStore(store.root).directory)) if DatasetStore(store.root).directory.exists() else []


def timed_upload(client: TestClient, filename: str, content: bytes) -> tuple[object, float]:
    started = time.perf_counter()
    response = upload(client, filename, content)
    return response, time.perf_counter() - started


def test_the_decoded_size_limit_boundary(settings, store):
    # 16 images of 32x32x1 as float32 take 65,536 bytes: exactly DAE_MAX_DATASET_MB=0.0625.
    limited = Settings(**{**settings.model_dump(), "max_dataset_mb": 65_536 / 2**20})
    with TestClient(create_app(limited)) as client:
        assert upload(client, "at.npz", npz_bytes(np.zeros((16, 32, 32), np.uint8))).status_code == 201
        before = stored_files(store)
        response = upload(client, "over.npz", npz_bytes(np.zeros((17, 32, 32), np.uint8)))
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert "17 images of 32x32x1 as float32 take 69,632 bytes" in detail
        assert "Expected at most 65,536 bytes (0.1 MiB, DAE_MAX_DATASET_MB)" in detail
        assert stored_files(store) == before


def test_an_npz_bomb_is_413_quickly_and_writes_nothing(settings, store):
    limited = Settings(**{**settings.model_dump(), "max_dataset_mb": 64.0})
    with TestClient(create_app(limited)) as client:
        assert upload(client, "small.npz", npz_bytes(np.zeros((4, 8, 8), np.uint8))).status_code == 201
        before = stored_files(store)
        bomb = npz_bomb()  # 255 KiB that decode to 256 MiB
        response, elapsed = timed_upload(client, "bomb.npz", bomb)
        print(f"npz bomb ({len(bomb):,} bytes -> 256 MiB) over HTTP: {response.status_code} in {elapsed * 1000:.0f} ms")
        assert response.status_code == 413 and "DAE_MAX_DATASET_MB" in response.json()["detail"]
        assert elapsed < 1.0 and stored_files(store) == before


def test_a_zip_of_200k_empty_members_is_413_quickly_and_writes_nothing(client, store):
    assert upload(client, "small.npz", npz_bytes(np.zeros((4, 8, 8), np.uint8))).status_code == 201
    before = stored_files(store)
    bomb = empty_members_zip(200_000)  # 18 MiB; zipfile alone takes ~2 s and ~117 MiB to list it
    response, elapsed = timed_upload(client, "bomb.zip", bomb)
    print(f"zip of 200k members ({len(bomb):,} bytes) over HTTP: {response.status_code} in {elapsed * 1000:.0f} ms")
    assert response.status_code == 413, response.text
    assert "Received: 200,000 entries" in response.json()["detail"]
    assert elapsed < 2.0 and stored_files(store) == before  # most of it is sending and parsing the 18 MiB body


def test_a_zip_of_large_black_pngs_is_413_from_the_headers(client, store):
    black = png_bytes(np.zeros((2048, 2048)))  # a few KiB each, 16 MiB once decoded
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        for index in range(64):
            zipped.writestr(f"{index:03d}.png", black)
    response, elapsed = timed_upload(client, "black.zip", archive.getvalue())
    print(
        f"zip of 64 black 2048x2048 PNGs ({len(archive.getvalue()):,} bytes): {response.status_code} in {elapsed * 1000:.0f} ms"
    )
    assert response.status_code == 413 and "1,073,741,824 bytes" in response.json()["detail"]
    assert elapsed < 1.0 and stored_files(store) == []


def test_the_store_size_limit_refuses_with_the_usage_and_writes_nothing(settings, store):
    images = np.random.default_rng(0).integers(0, 256, (32, 16, 16), dtype=np.uint8)  # incompressible
    with TestClient(create_app(settings)) as client:
        assert upload(client, "first.npz", npz_bytes(images)).status_code == 201
    used = DatasetStore(store.root).total_bytes()
    assert 0 < used < images.nbytes + 4096  # stored compressed: no bigger than the raw bytes plus metadata
    # Room for half of another copy: the same upload cannot fit.
    capped = Settings(**{**settings.model_dump(), "max_store_datasets_gb": (used + used // 2) / 2**30})
    with TestClient(create_app(capped)) as client:
        before = stored_files(store)
        response = upload(client, "second.npz", npz_bytes(images))
        assert response.status_code == 413, response.text
        detail = response.json()["detail"]
        assert f"uploaded datasets take {used:,} of the {used + used // 2:,} bytes allowed" in detail
        assert "DAE_MAX_STORE_DATASETS_GB" in detail and "delete datasets" in detail
        assert stored_files(store) == before
        small = npz_bytes(np.zeros((2, 4, 4), np.uint8))  # still fits
        assert upload(client, "small.npz", small).status_code == 201


def test_uploads_are_stored_compressed(client, store):
    images = np.zeros((256, 32, 32), np.uint8)
    images[:, 8:24, 8:24] = 200
    response = upload(client, "squares.npz", npz_bytes(images))
    assert response.status_code == 201, response.text
    stored = DatasetStore(store.root).directory / f"{response.json()['id']}.npz"
    assert stored.stat().st_size < images.nbytes / 20
    with zipfile.ZipFile(stored) as archive:
        assert archive.infolist()[0].compress_type == zipfile.ZIP_DEFLATED
