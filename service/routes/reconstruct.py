"""POST /reconstruct: denoise images with a trained model and report the per-pixel error.

Input (JSON): one image as `image` (base64 PNG/JPEG), `pixels` (nested lists) or `array` (base64 float32/uint8
buffer with a shape; a 4-D shape is a batch), or a batch as `images` (a list of such objects). Optional `clean`
references (as many images as the input) add error/PSNR/SSIM against them; optional `add_noise` corrupts the
input first (seeded), to try a model with nothing but a clean image. Input (multipart): fields `model`, `file`,
optionally `clean` (file), `noise_type`, `noise_level`, `noise_seed`.

For every image: the denoised image (clipped to [0, 1]), the L1 error map |input − denoised| (H×W, mean over the
model's channels; `input` is what the model saw: after colour conversion and noise), its heatmap and statistics.
The error map is computed from the float output, before PNG quantization. `Accept: image/png` (one image) answers
with just the denoised PNG and the mean L1 error in the `X-Mean-L1-Error` header.

Limits, each checked before the work it bounds (DESIGN.md §5): the body's bytes as they are read
(DAE_MAX_UPLOAD_MB, service.middleware); the number of images, from the request's structure; each image's sides
and the decoded size of all images and clean references together (DAE_MAX_REQUEST_PIXELS), from the images'
headers (open_call), before any pixel is decoded; then, in the inference engine, the serving queue's values
(DAE_INFERENCE_QUEUE_MAX_VALUES, 503) and micro-batch-sized runs. Large bodies and large images are parsed, decoded
and encoded in worker threads, large answers serialized in blocks (json_fragment), so the event loop stays free.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from anyio import to_thread
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from dae.errors import InvalidImage, PayloadTooLarge
from dae.metrics import psnr_per_image, ssim_per_image
from dae.noise import add_noise
from dae.spec import NoiseSpec
from service.config import Settings
from service.deps import ApiKeyRequired, InferenceDep, SettingsDep
from service.error_maps import ErrorMaps
from service.images import (
    PendingImage,
    encode_png_base64,
    float32_base64,
    heatmap_png_base64_from_rows,
    open_base64_image,
    open_image_bytes,
    open_pixels,
    open_raw_array,
    png_base64_from_rows,
    png_from_rows,
    to_channels,
)
from service.inference import Denoised, InferenceEngine, LoadedModel
from service.responses import OrjsonResponse
from service.schemas import error_responses


class ReconstructRoute(APIRoute):
    """The /reconstruct route: documented by FastAPI like any route, served by a lean handler (serve_reconstruct).

    Per request FastAPI resolves an endpoint's dependencies and parameters one by one (here the settings, the
    inference engine, the API-key scheme and three query parameters): measured at ~0.3 ms on a 2-core machine,
    more than denoising a 28x28 image takes. serve_reconstruct reads the very same inputs directly: the settings and
    the inference engine from app.state (exactly what SettingsDep and InferenceDep return; dependency_overrides do
    not apply to this route), the query parameters through ReconstructQuery (same types, defaults and 422 errors
    located at ("query", name)), and nothing for the API key, which ApiKeyMiddleware has already checked
    (ApiKeyRequired only documents it). The endpoint's signature still defines the OpenAPI operation.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return serve_reconstruct


router = APIRouter(tags=["reconstruct"], dependencies=[ApiKeyRequired], route_class=ReconstructRoute)

#: Parsing, decoding and encoding move to a worker thread above this many body bytes (read so far, so chunked bodies
#: count too) or pixel values (from the images' headers), so one big request does not stall every other request on
#: the event loop; small ones stay inline (a thread hop costs ~50 µs).
INLINE_WORK_LIMIT = 128 * 1024

# The first scikit-learn digit (a "0", 8x8 gray) as base64 PNG: works with a dense model trained on `digits`
# (the POST /jobs example), so the Swagger examples can be pressed in order.
EXAMPLE_PNG_8X8 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAgAAAAICAAAAADhZOFXAAAARklEQVR42gXBYRVAMBgAwHt7/vsiaGCaLIJGIqyCBp4EI4E1III7lLYFaG99i0G"
    "elh55T+LqbpI4GUm+WeQP01PqAdZW8QOg+BHx1aT2vAAAAABJRU5ErkJggg=="
)


# ---------------------------------------------------------------------------------------------
# Request and response models
# ---------------------------------------------------------------------------------------------


class RawArray(BaseModel):
    """Pixels as one base64 buffer: the compact alternative to nested lists (no per-number JSON parsing)."""

    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="base64 of the pixel values, row-major, little-endian.")
    shape: list[Annotated[int, Field(ge=1, le=65536)]] = Field(
        min_length=2, max_length=4, description="(H, W), (H, W, C) or a batch (N, H, W, C); C in {1, 3, 4}."
    )
    dtype: Literal["float32", "uint8"] = Field("float32", description="float32 in [0, 1] or uint8 in 0-255.")


class _ImageSources(BaseModel):
    """The three ways to send pixels."""

    model_config = ConfigDict(extra="forbid")

    image: str | None = Field(None, description="base64 PNG or JPEG (a `data:image/png;base64,` URL is fine).")
    pixels: list[Any] | None = Field(None, description="H×W or H×W×C nested lists of numbers in [0, 1].")
    array: RawArray | None = Field(None, description="A base64 float32/uint8 buffer with its shape.")

    def given_sources(self) -> list[str]:
        """Names of the sources that are set."""
        return [name for name in ("image", "pixels", "array") if getattr(self, name) is not None]


class ImageInput(_ImageSources):
    """One image (or, for a 4-D `array`, a batch): exactly one of `image`, `pixels`, `array`."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> ImageInput:
        given = self.given_sources()
        if len(given) != 1:
            raise ValueError(
                f"An image needs exactly one source. Expected one of image, pixels, array. Received: {given or 'none'}"
            )
        return self


class AddNoise(NoiseSpec):
    """Corrupt the input before denoising (seeded, same formulas as training)."""

    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed of the noise draw; image i uses (seed, i).")


class ReconstructRequest(_ImageSources):
    """A /reconstruct call: the model and one image (`image` | `pixels` | `array`) or a batch (`images`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": "digits-demo", "image": EXAMPLE_PNG_8X8},
                {"model": "digits-demo", "image": EXAMPLE_PNG_8X8, "add_noise": {"type": "gaussian", "level": 0.2, "seed": 1},
                 "clean": {"image": EXAMPLE_PNG_8X8}},
                {"model": "digits-demo", "images": [{"image": EXAMPLE_PNG_8X8}, {"pixels": [[0.5] * 8] * 8}]},
            ]
        },
    )

    model: str = Field(max_length=200, description="Model id, name (latest version) or name:version.")
    images: list[ImageInput] | None = Field(None, min_length=1, description="A batch of images.")
    clean: ImageInput | list[ImageInput] | None = Field(
        None, description="Clean reference(s), as many images as the input, in order: adds error/PSNR/SSIM vs clean."
    )
    add_noise: AddNoise | None = Field(None, description="Corrupt the input first (to try a model on a clean image).")

    @model_validator(mode="after")
    def _one_kind_of_input(self) -> ReconstructRequest:
        single = self.given_sources()
        if self.images is not None and single:
            raise ValueError(f"Send one image or a batch, not both. Expected `images` alone. Received: images and {single}")
        if self.images is None and len(single) != 1:
            raise ValueError(
                "Nothing to reconstruct. Expected exactly one of image, pixels, array (one image) or images (a batch). "
                f"Received: {single or 'none'}"
            )
        return self

    def to_call(self, body_bytes: int) -> ParsedCall:
        """The call with its inputs and references as lists, in order."""
        # One image: the request itself holds its source (image | pixels | array), as an ImageInput would.
        inputs = self.images if self.images is not None else [self]
        clean = None if self.clean is None else (self.clean if isinstance(self.clean, list) else [self.clean])
        return ParsedCall(model=self.model, inputs=list(inputs), clean=clean, add_noise=self.add_noise,
                          body_bytes=body_bytes)


@dataclass
class ParsedCall:
    """A /reconstruct call from either body type: sources are ImageInput objects or uploaded file bytes."""

    model: str
    inputs: list[_ImageSources | bytes]
    clean: list[_ImageSources | bytes] | None
    add_noise: AddNoise | None
    body_bytes: int  # the body's size as read (chunked bodies included)


class ErrorStats(BaseModel):
    """Summary of an L1 error map."""

    mean: float
    max: float
    p99: float = Field(description="99th percentile.")


class CleanComparison(BaseModel):
    """The denoised image (and the input) against the clean reference."""

    psnr: float = Field(description="dB, data range 1, capped at 100.")
    ssim: float | None = Field(description="None for images under 3x3 pixels.")
    input_psnr: float = Field(description="PSNR of the input the model saw (after noise): the gain is psnr − input_psnr.")
    input_ssim: float | None
    error_stats: ErrorStats = Field(description="Of |clean − denoised| (mean over channels).")
    error_map: list[list[float]] | None = Field(None, description="|clean − denoised|, with error_format=json.")
    error_map_f32: str | None = Field(None, description="With error_format=f32.")
    error_map_png: str | None = Field(None, description="With error_format=png.")


class ReconstructedImage(BaseModel):
    """One denoised image, its error map and statistics. Fields appear according to format/error_format/heatmap."""

    shape: list[int] = Field(description="(H, W, C) of the denoised image (C = the model's channels).")
    denoised_png: str | None = Field(None, description="base64 PNG (format=png or array).")
    denoised: list[Any] | None = Field(None, description="H×W×C floats in [0, 1] (format=array).")
    denoised_f32: str | None = Field(None, description="base64 little-endian float32 H×W×C (format=f32).")
    noisy_png: str | None = Field(None, description="With add_noise: the corrupted input the model saw, base64 PNG.")
    error_map: list[list[float]] | None = Field(None, description="|input − denoised|, H×W (error_format=json).")
    error_map_f32: str | None = Field(None, description="The error map as base64 float32 H×W (error_format=f32).")
    error_map_png: str | None = Field(None, description="The error map as 8-bit gray PNG, 255 = 1.0 (error_format=png).")
    error_heatmap_png: str | None = Field(
        None, description="The error map in the inferno colormap, black = 0, yellow-white = this image's max error."
    )
    error_stats: ErrorStats
    clean: CleanComparison | None = None


class ModelSummary(BaseModel):
    """Which model answered."""

    id: str
    name: str
    version: int


class ReconstructResponse(BaseModel):
    """Results in input order."""

    model: ModelSummary
    results: list[ReconstructedImage]
    mean_error: float = Field(description="Mean L1 error over all images.")


OutputFormat = Literal["png", "array", "f32"]
ErrorFormat = Literal["json", "f32", "png", "none"]


class ReconstructQuery(BaseModel):
    """The query parameters of POST /reconstruct (documented on the endpoint's signature)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    format: OutputFormat = "png"
    error_format: ErrorFormat = "json"
    heatmap: bool = True


_DEFAULT_QUERY = ReconstructQuery()
#: Valid query strings seen lately and what they mean: clients repeat the same few, and parsing plus validating
#: one costs ~40 µs, a tenth of a whole 28x28 request. Bounded; cleared when full.
_QUERY_CACHE: dict[bytes, ReconstructQuery] = {}
_QUERY_CACHE_SIZE = 256


def read_query(request: Request) -> ReconstructQuery:
    """The validated query parameters (the last value of a repeated one, as FastAPI takes); 422 when invalid."""
    query_string = request.scope.get("query_string", b"")
    if not query_string:
        return _DEFAULT_QUERY
    cached = _QUERY_CACHE.get(query_string)
    if cached is not None:
        return cached
    parameters = request.query_params
    values = {name: parameters[name] for name in ReconstructQuery.model_fields if name in parameters}
    try:
        query = ReconstructQuery.model_validate(values) if values else _DEFAULT_QUERY
    except ValidationError as error:
        raise RequestValidationError(_located(error, "query")) from None
    if len(_QUERY_CACHE) >= _QUERY_CACHE_SIZE:
        _QUERY_CACHE.clear()
    _QUERY_CACHE[query_string] = query
    return query


# ---------------------------------------------------------------------------------------------
# Request parsing
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)  # per request: plain slots (a frozen dataclass sets each field via object.__setattr__)
class CallHeaders:
    """The request headers /reconstruct looks at, read in one pass over the raw headers (Starlette's Headers
    mapping decodes and compares every header per lookup: ~5 µs for these three, ~0.5 µs this way)."""

    content_type: str
    accept: str
    content_length: int | None

    @classmethod
    def of(cls, request: Request) -> CallHeaders:
        found: dict[bytes, bytes] = {}
        for name, value in request.scope["headers"]:  # names arrive lower-cased (ASGI)
            if name in _CALL_HEADERS and name not in found:  # the first of repeated headers, as Starlette's get()
                found[name] = value
        length = found.get(b"content-length", b"")
        return cls(
            content_type=found.get(b"content-type", b"").decode("latin-1").split(";")[0].strip().lower(),
            accept=found.get(b"accept", b"").decode("latin-1"),
            content_length=int(length) if length.isdigit() else None,
        )


_CALL_HEADERS = frozenset({b"content-type", b"accept", b"content-length"})


async def read_request(request: Request, content_type: str) -> ParsedCall:
    """The call from a JSON or a multipart body; 422 (RequestValidationError) for invalid fields."""
    if content_type == "multipart/form-data":
        return await _read_multipart(request)
    if content_type not in ("application/json", ""):
        raise HTTPException(
            415,
            f"Unsupported request content type. Expected application/json or multipart/form-data. Received: {content_type}",
        )
    body = await request.body()
    return parse_json_call(body) if len(body) <= INLINE_WORK_LIMIT else await _in_thread(parse_json_call, body)


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
    form = await request.form(max_files=2, max_fields=8)
    files: dict[str, bytes] = {}
    for field in ("file", "clean"):
        value = form.get(field)
        if isinstance(value, UploadFile):
            files[field] = await value.read()
        elif value is not None:
            raise InvalidImage(f"Form field {field!r} must be a file upload. Expected a PNG or JPEG file. Received: text")
    if "file" not in files:
        raise InvalidImage("The form has no image. Expected a file field named 'file'. Received: no 'file'")
    model_ref = form.get("model")
    if not isinstance(model_ref, str) or not model_ref:
        raise InvalidImage(
            "The form has no model. Expected a text field 'model' (id, name or name:version). Received: none"
        )
    noise = None
    noise_type = form.get("noise_type")
    if isinstance(noise_type, str) and noise_type:
        fields = {"type": noise_type, "level": form.get("noise_level") or 0.2, "seed": form.get("noise_seed") or 0}
        try:
            noise = AddNoise.model_validate(fields)
        except ValidationError as error:
            raise RequestValidationError(_located(error, "body", field_prefix="noise_")) from None
    clean = [files["clean"]] if "clean" in files else None
    return ParsedCall(model=model_ref[:200], inputs=[files["file"]], clean=clean, add_noise=noise,
                      body_bytes=sum(len(content) for content in files.values()))


# ---------------------------------------------------------------------------------------------
# The work
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OpenedCall:
    """A call whose images' headers are read and whose limits hold: nothing is decoded yet."""

    inputs: list[PendingImage]
    clean: list[PendingImage] | None
    images: int  # input images (a 4-D array counts its N)
    values: int  # float32 values of every decoded image, inputs and clean references together


def count_images(sources: list[_ImageSources | bytes]) -> int:
    """Images in `sources` without reading any of them: one per source, N for a 4-D array."""
    return sum(
        source.array.shape[0] if not isinstance(source, bytes) and source.array is not None
        and len(source.array.shape) == 4 else 1
        for source in sources
    )


def open_sources(sources: list[_ImageSources | bytes], settings: Settings, what: str) -> list[PendingImage]:
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
        else:
            array = source.array
            pending.append(open_raw_array(array.data, array.shape, array.dtype, max_side=max_side, field=field))
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


def decode_sources(pending: list[PendingImage]) -> list[np.ndarray]:
    """Decode opened sources into chunks of (n, H, W, C) float32 in [0, 1], in order (a 4-D array stays one chunk)."""
    chunks = []
    for image in pending:
        pixels = image.decode()
        chunks.append(pixels if pixels.ndim == 4 else pixels[np.newaxis])
    return chunks


def prepare_inputs(
    chunks: list[np.ndarray], model: LoadedModel, noise: AddNoise | None
) -> tuple[list[np.ndarray], bool]:
    """Convert to the model's channels, check dense sizes, add noise. Returns the chunks and whether noise was added."""
    prepared = []
    first_index = 0
    for chunk_index, chunk in enumerate(chunks):
        field = "image" if len(chunks) == 1 else f"images[{chunk_index}]"
        chunk = to_channels(chunk, model.channels, field=field)
        model.check_size(chunk.shape[1], chunk.shape[2], field=field)
        if noise is not None:
            chunk = np.stack(
                [add_noise(image, noise, seed=[noise.seed, first_index + offset]) for offset, image in enumerate(chunk)]
            )
        prepared.append(chunk)
        first_index += len(chunk)
    return prepared, noise is not None


def group_by_size(chunks: list[np.ndarray]) -> list[tuple[np.ndarray, Sequence[int]]]:
    """[(images (n, H, W, C), their positions in the request)] per distinct (H, W), in first-seen order."""
    if len(chunks) == 1:  # one image or one array: the whole request is one group
        return [(chunks[0], range(len(chunks[0])))]
    members: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {}
    position = 0
    for chunk in chunks:
        members.setdefault((chunk.shape[1], chunk.shape[2]), []).append((chunk, position))
        position += len(chunk)
    groups = []
    for parts in members.values():
        images = parts[0][0] if len(parts) == 1 else np.concatenate([chunk for chunk, _ in parts])
        positions = np.concatenate([np.arange(start, start + len(chunk)) for chunk, start in parts])
        groups.append((images, positions))
    return groups


#: Most values one orjson call serializes on the heavy path: a thread holding the GIL for a whole 2048² error map
#: (~1 s) would stall the event loop as surely as running on it; a block takes ~10 ms.
JSON_BLOCK_VALUES = 64 * 1024


def json_fragment(array: np.ndarray) -> orjson.Fragment:
    """What orjson writes for a C-contiguous array (nested lists), byte for byte, serialized in row blocks of at
    most JSON_BLOCK_VALUES values so another thread (the event loop) gets the GIL between blocks."""
    rows = max(1, JSON_BLOCK_VALUES // max(1, array[0].size))
    if len(array) <= rows:
        return orjson.Fragment(orjson.dumps(array, option=orjson.OPT_SERIALIZE_NUMPY))
    blocks = [orjson.dumps(array[start : start + rows], option=orjson.OPT_SERIALIZE_NUMPY)[1:-1]
              for start in range(0, len(array), rows)]
    return orjson.Fragment(b"[" + b",".join(blocks) + b"]")


def _error_map_encoder(error_format: ErrorFormat, fragments: bool = False) -> Callable[[np.ndarray], dict[str, Any]]:
    if error_format == "json":
        if fragments:
            return lambda error_map: {"error_map": json_fragment(error_map)}
        return lambda error_map: {"error_map": error_map}  # orjson writes the float32 array directly
    if error_format == "f32":
        return lambda error_map: {"error_map_f32": float32_base64(error_map)}
    if error_format == "png":
        return lambda error_map: {"error_map_png": encode_png_base64(error_map)}
    return lambda error_map: {}


def build_results(
    inputs: np.ndarray,
    pieces: list[Denoised],
    cleans: np.ndarray | None,
    *,
    noisy: bool,
    output_format: OutputFormat,
    error_format: ErrorFormat,
    heatmap: bool,
    fragments: bool = False,
) -> list[dict[str, Any]]:
    """The response entries of one size group, from its micro-batch pieces (consecutive images, in order; error
    maps and statistics come with the outputs), encoded per image.

    With `fragments` (large answers, built in a worker thread) arrays are serialized here, in blocks (json_fragment).
    """
    encode_error_map = _error_map_encoder(error_format, fragments)
    shape = list(pieces[0].outputs.shape[1:])
    width = shape[1]
    results = []
    start = 0
    for denoised in pieces:
        outputs = denoised.outputs
        error_maps = denoised.errors.maps
        stats = denoised.errors.stats()
        stop = start + len(outputs)
        clean_entries: list[dict[str, Any]] | None = None
        if cleans is not None:
            clean_entries = _clean_comparisons(inputs[start:stop], outputs, cleans[start:stop], encode_error_map)
        for index, output in enumerate(outputs):
            entry: dict[str, Any] = {"shape": shape}
            if output_format != "f32":
                entry["denoised_png"] = png_base64_from_rows(denoised.png_rows[index], width)
            if output_format == "array":
                entry["denoised"] = json_fragment(output) if fragments else output
            elif output_format == "f32":
                entry["denoised_f32"] = float32_base64(output)
            if noisy:
                entry["noisy_png"] = encode_png_base64(inputs[start + index])
            entry.update(encode_error_map(error_maps[index]))
            if heatmap:
                entry["error_heatmap_png"] = heatmap_png_base64_from_rows(denoised.heatmap_rows[index], width)
            entry["error_stats"] = stats[index]
            if clean_entries is not None:
                entry["clean"] = clean_entries[index]
            results.append(entry)
        start = stop
    return results


def _clean_comparisons(
    inputs: np.ndarray,
    outputs: np.ndarray,
    cleans: np.ndarray,
    encode_error_map: Callable[[np.ndarray], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Per image: PSNR/SSIM of the output and of the input against the clean reference, and |clean − output|."""
    clean_errors = ErrorMaps.between(cleans, outputs)
    clean_maps = clean_errors.maps
    stats = clean_errors.stats()
    psnr, input_psnr = psnr_per_image(cleans, outputs).tolist(), psnr_per_image(cleans, inputs).tolist()
    ssim, input_ssim = _ssim_or_none(cleans, outputs), _ssim_or_none(cleans, inputs)
    return [
        {
            "psnr": psnr[index],
            "ssim": None if ssim is None else float(ssim[index]),
            "input_psnr": input_psnr[index],
            "input_ssim": None if input_ssim is None else float(input_ssim[index]),
            "error_stats": stats[index],
            **encode_error_map(clean_maps[index]),
        }
        for index in range(len(outputs))
    ]


def _ssim_or_none(clean: np.ndarray, estimate: np.ndarray) -> np.ndarray | None:
    if min(clean.shape[1], clean.shape[2]) < 3:
        return None
    return ssim_per_image(clean, estimate)


def _clean_groups(clean_chunks: list[np.ndarray], groups: list[tuple[np.ndarray, Sequence[int]]]) -> list[np.ndarray]:
    """The clean references stacked like the input groups; InvalidImage for a count or size mismatch."""
    cleans = [image for chunk in clean_chunks for image in chunk]
    total = sum(len(positions) for _, positions in groups)
    if len(cleans) != total:
        raise InvalidImage(
            f"clean must hold one reference per input image. Expected {total} clean image(s). Received: {len(cleans)}"
        )
    stacked = []
    for images, positions in groups:
        for position in positions:
            if cleans[position].shape != images.shape[1:]:
                raise InvalidImage(
                    f"clean[{position}] does not match its input. Expected shape {list(images.shape[1:])} (after "
                    f"conversion to the model's channels). Received: {list(cleans[position].shape)}"
                )
        stacked.append(np.stack([cleans[position] for position in positions]))
    return stacked


@dataclass(slots=True)
class PreparedCall:
    """The decoded inputs grouped by size, their clean references stacked alike, and whether noise was added."""

    groups: list[tuple[np.ndarray, Sequence[int]]]
    cleans: list[np.ndarray | None]
    noisy: bool


def decode_call(opened: OpenedCall, model: LoadedModel, noise: AddNoise | None) -> PreparedCall:
    """Decode, convert to the model's channels, add noise, group by size: the request's CPU work before inference."""
    chunks, noisy = prepare_inputs(decode_sources(opened.inputs), model, noise)
    groups = group_by_size(chunks)
    del chunks  # grouped copies replace them
    if opened.clean is None:
        return PreparedCall(groups, [None] * len(groups), noisy)
    clean_chunks = [to_channels(chunk, model.channels, field="clean") for chunk in decode_sources(opened.clean)]
    return PreparedCall(groups, list(_clean_groups(clean_chunks, groups)), noisy)


async def _in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run large CPU work in a worker thread (small work runs inline: a thread hop costs ~50 µs)."""
    return await to_thread.run_sync(lambda: function(*args, **kwargs))


# ---------------------------------------------------------------------------------------------
# The route
# ---------------------------------------------------------------------------------------------

_REQUEST_BODY = {
    "required": True,
    "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/ReconstructRequest"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["model", "file"],
                "properties": {
                    "model": {"type": "string", "description": "Model id, name or name:version.", "example": "digits-demo"},
                    "file": {"type": "string", "format": "binary", "description": "A PNG or JPEG image."},
                    "clean": {"type": "string", "format": "binary", "description": "Optional clean reference."},
                    "noise_type": {
                        "type": "string",
                        "enum": ["gaussian", "salt_pepper", "masking", "speckle"],
                        "description": "Optional: corrupt the image first.",
                    },
                    "noise_level": {"type": "number", "description": "Noise level (default 0.2)."},
                    "noise_seed": {"type": "integer", "description": "Noise seed (default 0)."},
                },
            }
        },
    },
}


async def serve_reconstruct(request: Request) -> Response:
    """The handler of ReconstructRoute: POST /reconstruct without FastAPI's per-request parameter resolution."""
    query = read_query(request)
    return await reconstruct(request, request.app.state.settings, request.app.state.resources.inference, query)


@router.post(
    "/reconstruct",
    summary="Denoise images",
    response_model=ReconstructResponse,
    response_model_exclude_none=True,
    openapi_extra={"requestBody": _REQUEST_BODY},
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "JSON results, or with `Accept: image/png` the denoised PNG (header X-Mean-L1-Error)",
        },
        **error_responses(401, 403, 404, 406, 413, 415, 422, 503),
    },
)
async def reconstruct_images(
    request: Request,
    settings: SettingsDep,
    inference: InferenceDep,
    format: Annotated[
        OutputFormat, Query(description="`png`: denoised as base64 PNG; `array`: also as floats; `f32`: base64 float32 only.")
    ] = "png",
    error_format: Annotated[
        ErrorFormat, Query(description="Error map as `json` arrays, base64 `f32`, 8-bit `png`, or `none`.")
    ] = "json",
    heatmap: Annotated[bool, Query(description="Include the error heatmap PNG.")] = True,
) -> Response:
    """Denoise one image or a batch; returns each denoised image, its L1 error map |input − denoised|, heatmap and stats."""
    # This signature defines the OpenAPI operation; requests reach reconstruct() through ReconstructRoute's handler.
    return await reconstruct(request, settings, inference, ReconstructQuery(format=format, error_format=error_format,
                                                                            heatmap=heatmap))


async def reconstruct(
    request: Request, settings: Settings, inference: InferenceEngine, query: ReconstructQuery
) -> Response:
    """The work of POST /reconstruct for a request whose query parameters are already validated."""
    format, error_format, heatmap = query.format, query.error_format, query.heatmap
    headers = CallHeaders.of(request)
    call = await read_request(request, headers.content_type)
    wants_png = _prefers_png(headers.accept)
    large_body = call.body_bytes > INLINE_WORK_LIMIT
    # 413s come here, before anything is decoded.
    opened = await _in_thread(open_call, call, settings) if large_body else open_call(call, settings)
    if wants_png and opened.images != 1:
        raise HTTPException(406, "Accept: image/png returns one image. Expected one input image. Received: a batch")
    model = await inference.model(call.model)
    heavy = large_body or opened.values > INLINE_WORK_LIMIT
    if heavy:
        prepared = await _in_thread(decode_call, opened, model, call.add_noise)
    else:
        prepared = decode_call(opened, model, call.add_noise)
    image_count = opened.images
    del opened, call  # decoded now: the encoded images' bytes need not live until the answer is sent
    groups, cleans = prepared.groups, prepared.cleans

    # Each group comes back in micro-batch-sized pieces (see InferenceEngine.denoise_pieces).
    if len(groups) == 1:  # the common case; gather() would wrap the call in a task
        outputs = [await inference.denoise_pieces(model, groups[0][0])]
    else:
        outputs = await asyncio.gather(*(inference.denoise_pieces(model, images) for images, _ in groups))

    total_values = sum(images.size for images, _ in groups)
    heavy_output = total_values > INLINE_WORK_LIMIT
    if heavy_output:  # what a large request freed goes back to the system, once it is answered
        inference.release_free_memory_soon()
    if wants_png:
        first = outputs[0][0]
        error = float(first.errors.means[0])
        return Response(
            png_from_rows(first.png_rows[0], first.outputs.shape[2]),
            media_type="image/png",
            headers={"X-Mean-L1-Error": f"{error:.6g}", "X-Model-Id": model.model_id},
        )
    results: list[dict[str, Any] | None] = [None] * image_count
    for (images, positions), pieces, clean in zip(groups, outputs, cleans, strict=True):
        options = {"noisy": prepared.noisy, "output_format": format, "error_format": error_format, "heatmap": heatmap}
        if heavy_output:
            entries = await _in_thread(build_results, images, pieces, clean, fragments=True, **options)
        else:
            entries = build_results(images, pieces, clean, **options)
        for position, entry in zip(positions, entries, strict=True):
            results[position] = entry
    mean_error = math.fsum(entry["error_stats"]["mean"] for entry in results) / len(results)
    card = model.card
    body = {
        "model": {"id": card.id, "name": card.name, "version": card.version},
        "results": results,
        "mean_error": mean_error,
    }
    if total_values > ANSWER_BLOCK_VALUES:
        blocks = _answer_blocks(body, entries_per_block=max(1, ANSWER_BLOCK_VALUES * len(results) // total_values))
        return StreamingResponse(blocks, media_type="application/json")
    return OrjsonResponse(body)


#: An answer for more pixel values than this is streamed in blocks of entries worth about this many, each serialized
#: on the event loop in one orjson call: a copy, its arrays being fragments already (a whole 58 MB answer in one
#: call took 43 ms; serialized in a worker thread instead, each 2 MB cost ~1,100 more page faults: glibc's
#: per-thread arenas). Smaller answers are one call (streaming cost the 256-image batch ~30% of its images/s).
ANSWER_BLOCK_VALUES = 1024 * 1024


async def _answer_blocks(body: dict[str, Any], *, entries_per_block: int) -> AsyncIterator[bytes]:
    """orjson.dumps(body), byte for byte, as consecutive blocks of its `results` (so the loop serves others between
    blocks and no second copy of the whole answer is made)."""
    results = body["results"]
    yield b'{"model":' + orjson.dumps(body["model"]) + b',"results":['
    for start in range(0, len(results), entries_per_block):
        block = orjson.dumps(results[start : start + entries_per_block], option=orjson.OPT_SERIALIZE_NUMPY)
        yield (b"," if start else b"") + block[1:-1]
    yield b'],"mean_error":' + orjson.dumps(body["mean_error"]) + b"}"


def reconstruct_route() -> APIRoute:
    """The POST /reconstruct route of this module's router (service.direct_lane serves it directly)."""
    return next(route for route in router.routes if isinstance(route, ReconstructRoute))


def _prefers_png(accept: str) -> bool:
    """True when the client asks for image/png and not for JSON (Swagger's response-type picker does this)."""
    if "image/png" not in accept:
        return False
    return "application/json" not in accept

