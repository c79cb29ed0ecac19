"""Trained models: list, read the model card, delete, and the training plots (history.png, samples.png)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response
from fastapi.responses import FileResponse

from dae.spec import ModelCard
from service.deps import ApiKeyRequired, InferenceDep, ModelStoreDep
from service.schemas import MAX_LIST_OFFSET, ModelList, error_responses

router = APIRouter(prefix="/models", tags=["models"], dependencies=[ApiKeyRequired])

ModelRef = Annotated[
    str,
    Path(
        max_length=200,
        description="A model id (`m_…`), a name (its latest version) or `name:version`.",
        examples=["digits-demo"],
    ),
]
_PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "A PNG image"}
}


@router.get("", response_model=ModelList, summary="List models", responses=error_responses(401, 403, 422))
def list_models(
    store: ModelStoreDep,
    name: Annotated[str | None, Query(max_length=64, description="Only the versions of this model name.")] = None,
    limit: Annotated[int, Query(ge=1, le=500, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_LIST_OFFSET, description="Models to skip (newest first).")] = 0,
) -> ModelList:
    """Model cards newest first, optionally only one name's versions; paginated with limit/offset and the total."""
    items, total = store.list_models(name, limit=limit, offset=offset)
    return ModelList(items=items, total=total, limit=limit, offset=offset)


@router.get("/{ref}", response_model=ModelCard, summary="Read a model card", responses=error_responses(401, 403, 404))
def read_model(ref: ModelRef, store: ModelStoreDep) -> ModelCard:
    """The model card: spec, shapes, training history, evaluation against baselines, sparsity, data fingerprint."""
    return store.read_card(ref)


@router.delete(
    "/{ref}", status_code=204, response_class=Response, summary="Delete a model", responses=error_responses(401, 403, 404)
)
def delete_model(ref: ModelRef, store: ModelStoreDep, inference: InferenceDep) -> Response:
    """Delete the model and its files; it stops serving at once (its version number is not reused)."""
    card = store.delete_model(ref)
    inference.evict(card.id)
    return Response(status_code=204)


@router.get(
    "/{ref}/history.png",
    response_class=FileResponse,
    summary="Training curves",
    responses={**_PNG_RESPONSE, **error_responses(401, 403, 404)},
)
def read_model_history(ref: ModelRef, store: ModelStoreDep) -> FileResponse:
    """Loss and validation loss per epoch, as a PNG plot."""
    return FileResponse(store.artifact_path(ref, "history.png"), media_type="image/png")


@router.get(
    "/{ref}/samples.png",
    response_class=FileResponse,
    summary="Sample reconstructions",
    responses={**_PNG_RESPONSE, **error_responses(401, 403, 404)},
)
def read_model_samples(ref: ModelRef, store: ModelStoreDep) -> FileResponse:
    """Clean, noisy and denoised test images side by side, as a PNG."""
    return FileResponse(store.artifact_path(ref, "samples.png"), media_type="image/png")
