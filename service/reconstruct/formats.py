"""The JSON answer of /reconstruct: each image's entry encoded as the request's format, error_format and heatmap
ask, and large answers serialized in blocks."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import orjson

from dae.evaluation.metrics import psnr_per_image, ssim_per_image
from service.imaging.codec import base64_text, encode_png_base64, float32_base64, png_of_uint8, to_uint8
from service.imaging.error_maps import ErrorMaps
from service.imaging.heatmap import heatmap_pngs_base64
from service.inference.engine import Denoised
from service.reconstruct.schemas import AnswerOptions, ErrorFormat

#: Most values one orjson call serializes on the heavy path, so a thread never holds the GIL long enough to stall the loop.
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
    return lambda _error_map: {}


def build_results(
    inputs: np.ndarray,
    pieces: list[Denoised],
    cleans: np.ndarray | None,
    noisy: bool,
    options: AnswerOptions,
    *,
    fragments: bool = False,
) -> list[dict[str, Any]]:
    """The response entries of one size group, from its micro-batch pieces (consecutive images, in order; error
    maps and statistics come with the outputs), encoded per image.

    With `fragments` (large answers, built in a worker thread) arrays are serialized here, in blocks (json_fragment).
    """
    output_format, heatmap = options.format, options.heatmap
    encode_error_map = _error_map_encoder(options.error_format, fragments)
    shape = list(pieces[0].outputs.shape[1:])
    results = []
    start = 0
    for denoised in pieces:
        outputs = denoised.outputs
        error_maps = denoised.errors.maps
        stats = denoised.errors.stats()
        stop = start + len(outputs)
        # Only what the request asked for is encoded, each for the whole piece at once where it can be.
        pngs = [base64_text(png_of_uint8(pixels)) for pixels in to_uint8(outputs)] if output_format != "f32" else None
        heatmaps = heatmap_pngs_base64(error_maps, denoised.errors.maxima) if heatmap else None
        clean_entries: list[dict[str, Any]] | None = None
        if cleans is not None:
            clean_entries = _clean_comparisons(inputs[start:stop], outputs, cleans[start:stop], encode_error_map)
        for index, output in enumerate(outputs):
            entry: dict[str, Any] = {"shape": shape}
            if pngs is not None:
                entry["denoised_png"] = pngs[index]
            if output_format == "array":
                entry["denoised"] = json_fragment(output) if fragments else output
            elif output_format == "f32":
                entry["denoised_f32"] = float32_base64(output)
            if noisy:
                entry["noisy_png"] = encode_png_base64(inputs[start + index])
            entry.update(encode_error_map(error_maps[index]))
            if heatmaps is not None:
                entry["error_heatmap_png"] = heatmaps[index]
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


#: Answers over this many values stream in blocks of about this many (one orjson call each, on the loop), so no
#: second copy of the whole answer is made; smaller ones are one call (figures: bench/README.md, 2026-12-02).
ANSWER_BLOCK_VALUES = 1024 * 1024


async def answer_blocks(body: dict[str, Any], *, entries_per_block: int) -> AsyncIterator[bytes]:
    """orjson.dumps(body), byte for byte, as consecutive blocks of its `results` (so the loop serves others between
    blocks and no second copy of the whole answer is made)."""
    results = body["results"]
    yield b'{"model":' + orjson.dumps(body["model"]) + b',"results":['
    for start in range(0, len(results), entries_per_block):
        block = orjson.dumps(results[start : start + entries_per_block], option=orjson.OPT_SERIALIZE_NUMPY)
        yield (b"," if start else b"") + block[1:-1]
    yield b'],"mean_error":' + orjson.dumps(body["mean_error"]) + b"}"


