"""Datasets to train on: the built-ins and uploads (.npz or a .zip of PNGs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Path, Response, UploadFile

from dae.data import BUILTIN_DATASETS, dataset_info, parse_uploaded_dataset
from dae.data import list_datasets as list_dataset_infos
from dae.errors import Conflict
from dae.spec import DatasetInfo
from service.deps import ApiKeyRequired, DatasetStoreDep, SettingsDep
from service.schemas import error_responses

router = APIRouter(prefix="/datasets", tags=["datasets"], dependencies=[ApiKeyRequired])

DatasetId = Annotated[
    str,
    Path(max_length=64, description="A built-in name (`digits`, …) or an uploaded id (`ds_…`).", examples=["digits"]),
]


@router.post(
    "",
    status_code=201,
    response_model=DatasetInfo,
    summary="Upload a dataset",
    responses={
        201: {"description": "Stored; `Location` points at it", "headers": {"Location": {"schema": {"type": "string"}}}},
        **error_responses(401, 403, 413, 422),
    },
)
def create_dataset(
    file: Annotated[
        UploadFile,
        File(
            description=(
                "A `.npz` (array `x`, or its only array, shaped (N,H,W) or (N,H,W,C), C in {1,3}; uint8 0-255 or "
                "float in [0,1]) or a `.zip` of same-sized PNG images."
            )
        ),
    ],
    response: Response,
    settings: SettingsDep,
    store: DatasetStoreDep,
) -> DatasetInfo:
    """Validate and store an uploaded dataset; answers 201 with its id, image count and shape."""
    # A plain def: FastAPI runs it in the threadpool, so reading, decoding and compressing stay off the event loop.
    # The body is already bounded by DAE_MAX_UPLOAD_MB (BodySizeLimitMiddleware).
    content = file.file.read()
    images = parse_uploaded_dataset(
        file.filename or "",
        content,
        max_images=settings.max_dataset_images,
        max_side=settings.max_image_side,
        max_bytes=int(settings.max_dataset_mb * 2**20),
    )
    del content  # up to DAE_MAX_UPLOAD_MB freed before the store compresses the pixels
    info = store.save(
        images, filename=file.filename, max_total_bytes=int(settings.max_store_datasets_gb * 2**30)
    )
    response.headers["Location"] = f"/datasets/{info.id}"
    return info


@router.get("", response_model=list[DatasetInfo], summary="List datasets", responses=error_responses(401, 403))
def list_datasets(store: DatasetStoreDep) -> list[DatasetInfo]:
    """Built-in datasets first (with whether each is available offline), then uploads, newest first."""
    return list_dataset_infos(store)


@router.get(
    "/{dataset_id}", response_model=DatasetInfo, summary="Read a dataset", responses=error_responses(401, 403, 404)
)
def read_dataset(dataset_id: DatasetId, store: DatasetStoreDep) -> DatasetInfo:
    """Shape, image count, availability and (once known) the pixel fingerprint of one dataset."""
    return dataset_info(dataset_id, store)


@router.delete(
    "/{dataset_id}",
    status_code=204,
    response_class=Response,
    summary="Delete an uploaded dataset",
    responses=error_responses(401, 403, 404, 409),
)
def delete_dataset(dataset_id: DatasetId, store: DatasetStoreDep) -> Response:
    """Delete an uploaded dataset (models trained on it keep working); built-in datasets cannot be deleted (409)."""
    if dataset_id in BUILTIN_DATASETS:
        raise Conflict(
            f"Built-in datasets cannot be deleted. Expected the id of an uploaded dataset ('ds_…'). "
            f"Received: dataset_id={dataset_id!r}"
        )
    store.delete(dataset_id)
    return Response(status_code=204)
