"""POST /reconstruct: denoise images with a trained model and report the per-pixel error.

Input (JSON, ReconstructRequest): one image as `image` (base64 PNG/JPEG), `pixels` (nested lists) or `array`
(base64 float32/uint8 buffer with a shape; a 4-D shape is a batch), or a batch as `images`. Optional `clean`
references add error/PSNR/SSIM against them; optional `add_noise` corrupts the input first (seeded). Input
(multipart, ReconstructForm): `model`, `file`, optionally `clean`, `noise_type`, `noise_level`, `noise_seed`.

For every image: the denoised image (clipped to [0, 1]), the L1 error map |input − denoised| (H×W, mean over the
model's channels, computed from the float output), its heatmap and statistics. `Accept: image/png` (one image)
answers with just the denoised PNG and the mean L1 error in the `X-Mean-L1-Error` header.

Limits, each checked before the work it bounds (DESIGN.md §5): the body's bytes as they are read
(service.middleware); the number of images, each image's sides and the decoded size of all images together, from
the images' headers (service.reconstruct.parsing); the serving queue's values and micro-batch-sized runs
(service.inference).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.responses import Response

from service.deps import ApiKeyRequired, InferenceDep, PrincipalDep, SettingsDep
from service.reconstruct.parsing import read_call, wants_png
from service.reconstruct.pipeline import reconstruct
from service.reconstruct.schemas import (
    AnswerOptions,
    ErrorFormat,
    OutputFormat,
    ParsedCall,
    ReconstructResponse,
)
from service.schemas import error_responses

router = APIRouter(tags=["reconstruct"], dependencies=[ApiKeyRequired])

#: The body is read by read_call (JSON or multipart on one path), so the operation names its two schemas.
REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ReconstructRequest"}},
        "multipart/form-data": {"schema": {"$ref": "#/components/schemas/ReconstructForm"}},
    },
}


@router.post(
    "/reconstruct",
    summary="Denoise images",
    response_model=ReconstructResponse,
    response_model_exclude_none=True,
    openapi_extra={"requestBody": REQUEST_BODY},
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON results, or with `Accept: image/png` the denoised PNG (header X-Mean-L1-Error)",
        },
        **error_responses(401, 403, 404, 406, 413, 415, 422, 503),
    },
)
async def reconstruct_images(
    settings: SettingsDep,
    inference: InferenceDep,
    caller: PrincipalDep,
    call: Annotated[ParsedCall, Depends(read_call)],
    png_only: Annotated[bool, Depends(wants_png)],
    format: Annotated[
        OutputFormat, Query(description="`png`: denoised as base64 PNG; `array`: also as floats; `f32`: base64 float32 only.")
    ] = "png",
    error_format: Annotated[
        ErrorFormat, Query(description="Error map as `json` arrays, base64 `f32`, 8-bit `png`, or `none`.")
    ] = "json",
    heatmap: Annotated[bool, Query(description="Include the error heatmap PNG.")] = True,
) -> Response:
    """Denoise one image or a batch; returns each denoised image, its L1 error map |input − denoised|, heatmap and stats."""
    options = AnswerOptions(format=format, error_format=error_format, heatmap=heatmap)
    return await reconstruct(call, settings, inference, options, caller, wants_png=png_only)
