"""Reading a /reconstruct call: the body (JSON or multipart) into a ParsedCall, then every image's header read
and the request's limits checked (OpenedCall) before any pixel is decoded (DESIGN.md §5)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from anyio import to_thread
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from dae.errors import InvalidImage, PayloadTooLarge
from service.config import Settings
from service.imaging.codec import PendingImage, open_base64_image, open_image_bytes, open_pixels, open_raw_array
from service.reconstruct.schemas import AddNoise, ImageSources, ParsedCall, ReconstructRequest

T = TypeVar("T")

#: Parsing, decoding and encoding move to a worker thread above this many body bytes (read so far, so chunked bodies
#: count too) or pixel values (from the images' headers), so one big request does not stall every other request on
#: the event loop; small ones stay inline (a thread hop costs ~50 µs).
INLINE_WORK_LIMIT = 128 * 1024


async def in_thread(function: Callable[[], T]) -> T:
    """Run large CPU work in a worker thread (small work runs inline: a thread hop costs ~50 µs)."""
    return await to_thread.run_sync(function)


async def wants_png(request: Request) -> bool:
    """Whether the client asks for image/png and not for JSON (Swagger's response-type picker does this)."""
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


async def read_call(request: Request) -> ParsedCall:
    """The call from a JSON or a multipart body (the route's dependency); 415 for another content type, 422
    (RequestValidationError) for invalid fields."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    if content_type not in ("application/json", ""):
        raise HTTPException(
            415,
            f"Unsupported request content type. Expected application/json or multipart/form-data. Received: {content_type}",
        )
    body = await request.body()
    return parse_json_call(body) if len(body) <= INLINE_WORK_LIMIT else await in_thread(lambda: parse_json_call(body))


def parse_json_call(body: bytes) -> ParsedCall:
    """The call of a JSON body; 422 (RequestValidationError) for invalid fields."""
    try:
        return ReconstructRequest.model_validate_json(body).to_call(len(body))
    except ValidationError as error:
        raise RequestValidationError(_located(error, "body")) from None


def _located(error: ValidationError, where: str, field_prefix: str = "") -> list[dict[str, Any]]:
    """Pydantic errors located like FastAPI's own errors: (where, field, ...) with where "body" or "query"."""
    entries = []
    for entry in error.errors(include_url=False, include_context=False):
        location = list(entry["loc"])
        if location and field_prefix:
            location[0] = f"{field_prefix}{location[0]}"
        entries.append({**entry, "loc": (where, *location)})
    return entries


async def _read_multipart(request: Request) -> ParsedCall:
    """The call of a multipart body (fields as ReconstructForm documents them); the form's files closed at once."""
    async with request.form(max_files=2, max_fields=8) as form:
        files: dict[str, bytes] = {}
        for field in ("file", "clean"):
            value = form.get(field)
            if isinstance(value, UploadFile):
                files[field] = await value.read()
            elif value is not None:
                raise InvalidImage(
                    f"Form field {field!r} must be a file upload. Expected a PNG or JPEG file. Received: text"
                )
        model_ref = form.get("model")
        noise_type = form.get("noise_type")
        noise_fields = {"type": noise_type, "level": form.get("noise_level") or 0.2, "seed": form.get("noise_seed") or 0}
    if "file" not in files:
        raise InvalidImage("The form has no image. Expected a file field named 'file'. Received: no 'file'")
    if not isinstance(model_ref, str) or not model_ref:
        raise InvalidImage(
            "The form has no model. Expected a text field 'model' (id, name or name:version). Received: none"
        )
    noise = None
    if isinstance(noise_type, str) and noise_type:
        try:
            noise = AddNoise.model_validate(noise_fields)
        except ValidationError as error:
            raise RequestValidationError(_located(error, "body", field_prefix="noise_")) from None
    clean: list[ImageSources | bytes] | None = [files["clean"]] if "clean" in files else None
    return ParsedCall(model=model_ref[:200], inputs=[files["file"]], clean=clean, add_noise=noise,
                      body_bytes=sum(len(content) for content in files.values()))


@dataclass(slots=True)
class OpenedCall:
    """A call whose images' headers are read and whose limits hold: nothing is decoded yet."""

    inputs: list[PendingImage]
    clean: list[PendingImage] | None
    images: int  # input images (a 4-D array counts its N)
    values: int  # float32 values of every decoded image, inputs and clean references together


def count_images(sources: list[ImageSources | bytes]) -> int:
    """Images in `sources` without reading any of them: one per source, N for a 4-D array."""
    return sum(
        source.array.shape[0] if not isinstance(source, bytes) and source.array is not None
        and len(source.array.shape) == 4 else 1
        for source in sources
    )


def open_sources(sources: list[ImageSources | bytes], settings: Settings, what: str) -> list[PendingImage]:
    """Every source's header read (sides checked, nothing decoded), after the image-count limit."""
    one_image = len(sources) == 1 and (isinstance(sources[0], bytes) or sources[0].array is None)
    if not one_image:  # one encoded image or nested list is within any limit: skip counting (the common request)
        count = count_images(sources)
        if count > settings.max_batch_images:
            raise PayloadTooLarge(
                f"Too many {'clean ' if what == 'clean' else ''}images in one request. Expected at most "
                f"{settings.max_batch_images} (DAE_MAX_BATCH_IMAGES). Received: {count}"
            )
    max_side = settings.max_image_side
    pending = []
    for index, source in enumerate(sources):
        field = what if len(sources) == 1 else f"{what}[{index}]"
        if isinstance(source, bytes):
            pending.append(open_image_bytes(source, max_side=max_side, field=field))
        elif source.image is not None:
            pending.append(open_base64_image(source.image, max_side=max_side, field=field))
        elif source.pixels is not None:
            pending.append(open_pixels(source.pixels, max_side=max_side, field=field))
        elif source.array is not None:
            array = source.array
            pending.append(open_raw_array(array.data, array.shape, array.dtype, max_side=max_side, field=field))
        else:  # ImageInput and ReconstructRequest refuse this already; a ParsedCall built in code might not
            raise InvalidImage(f"{field} has no pixels. Expected one of image, pixels, array. Received: none")
    return pending


def open_call(call: ParsedCall, settings: Settings) -> OpenedCall:
    """Read every image's header and check the request's limits (count, sides, DAE_MAX_REQUEST_PIXELS): a 413
    comes before any pixel is decoded or any large array allocated."""
    inputs = open_sources(call.inputs, settings, "image")
    count = input_values = 0
    for image in inputs:
        count += image.count
        input_values += image.values
    clean = None if call.clean is None else open_sources(call.clean, settings, "clean")
    clean_values = 0 if clean is None else sum(image.values for image in clean)
    values = input_values + clean_values
    if values > settings.max_request_pixels:
        received = f"{values} values in {count} image(s)"
        if clean is not None:
            received = (f"{values} values ({input_values} in {count} image(s), {clean_values} in "
                        f"{sum(image.count for image in clean)} clean image(s))")
        raise PayloadTooLarge(
            "The request's images are too large to decode. Expected at most "
            f"{settings.max_request_pixels} pixel values (height × width × channels, summed over all images and "
            f"clean references; DAE_MAX_REQUEST_PIXELS). Received: {received}"
        )
    return OpenedCall(inputs, clean, count, values)


