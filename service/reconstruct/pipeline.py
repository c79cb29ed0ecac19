"""The work of POST /reconstruct: read the call, decode, denoise in micro-batches, answer in the asked format.

Large bodies and large images are parsed, decoded and encoded in worker threads, large answers serialized in
blocks, so the event loop stays free (INLINE_WORK_LIMIT).
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.exceptions import HTTPException
from starlette.responses import Response, StreamingResponse

from dae.errors import InvalidImage
from dae.noise import add_noise
from service.auth import Principal
from service.config import Settings
from service.imaging.codec import PendingImage, encode_png, to_channels
from service.inference.engine import InferenceEngine
from service.inference.sessions import LoadedModel
from service.reconstruct.formats import ANSWER_BLOCK_VALUES, answer_blocks, build_results
from service.reconstruct.parsing import INLINE_WORK_LIMIT, OpenedCall, in_thread, open_call
from service.reconstruct.schemas import AddNoise, AnswerOptions, ParsedCall
from service.responses import OrjsonResponse

#: The positions in the request of a size group's images (a range for a one-group request).
Positions = Sequence[int] | np.ndarray


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


def group_by_size(chunks: list[np.ndarray]) -> list[tuple[np.ndarray, Positions]]:
    """[(images (n, H, W, C), their positions in the request)] per distinct (H, W), in first-seen order."""
    if len(chunks) == 1:  # one image or one array: the whole request is one group
        return [(chunks[0], range(len(chunks[0])))]
    members: dict[tuple[int, int], list[tuple[np.ndarray, int]]] = {}
    position = 0
    for chunk in chunks:
        members.setdefault((chunk.shape[1], chunk.shape[2]), []).append((chunk, position))
        position += len(chunk)
    groups: list[tuple[np.ndarray, Positions]] = []
    for parts in members.values():
        images = parts[0][0] if len(parts) == 1 else np.concatenate([chunk for chunk, _ in parts])
        positions = np.concatenate([np.arange(start, start + len(chunk)) for chunk, start in parts])
        groups.append((images, positions))
    return groups


def _clean_groups(clean_chunks: list[np.ndarray], groups: list[tuple[np.ndarray, Positions]]) -> list[np.ndarray]:
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

    groups: list[tuple[np.ndarray, Positions]]
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


async def reconstruct(
    call: ParsedCall,
    settings: Settings,
    inference: InferenceEngine,
    options: AnswerOptions,
    caller: Principal,
    *,
    wants_png: bool,
) -> Response:
    """The answer to a parsed call: the denoised PNG alone when `wants_png`, else JSON as `options` ask. The model
    is the caller's: a name resolves inside its owner, another owner's id only for an admin (else 404)."""
    noise = call.add_noise
    large_body = call.body_bytes > INLINE_WORK_LIMIT
    # 413s come here, before anything is decoded.
    opened = await in_thread(functools.partial(open_call, call, settings)) if large_body else open_call(call, settings)
    if wants_png and opened.images != 1:
        raise HTTPException(406, "Accept: image/png returns one image. Expected one input image. Received: a batch")
    model = await inference.model(call.model, caller.owner, every_owner=caller.sees_every_owner)
    heavy = large_body or opened.values > INLINE_WORK_LIMIT
    if heavy:
        prepared = await in_thread(functools.partial(decode_call, opened, model, noise))
    else:
        prepared = decode_call(opened, model, noise)
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
            encode_png(first.outputs[0]),
            media_type="image/png",
            headers={"X-Mean-L1-Error": f"{error:.6g}", "X-Model-Id": model.model_id},
        )
    results: list[dict[str, Any]] = [{}] * image_count
    for (images, positions), pieces, clean in zip(groups, outputs, cleans, strict=True):
        if heavy_output:
            entries = await in_thread(functools.partial(build_results, images, pieces, clean, prepared.noisy, options,
                                                        fragments=True))
        else:
            entries = build_results(images, pieces, clean, prepared.noisy, options)
        for position, entry in zip(positions, entries, strict=True):
            results[position] = entry
    mean_error = math.fsum(entry["error_stats"]["mean"] for entry in results) / len(results)
    body = {
        "model": model.summary,
        "results": results,
        "mean_error": mean_error,
    }
    if total_values > ANSWER_BLOCK_VALUES:
        blocks = answer_blocks(body, entries_per_block=max(1, ANSWER_BLOCK_VALUES * len(results) // total_values))
        return StreamingResponse(blocks, media_type="application/json")
    return OrjsonResponse(body)

