"""Peer (c) of bench/serve.py: BentoML serving the gateway's `model.onnx` with its adaptive batching.

    BENCH_ONNX_MODEL=/path/model.onnx bentoml serve bench.baselines.bentoml_service:Denoiser --port 3000

Runs in the benchmark's own virtual environment (bench/baselines/bentoml_env.py installs it), not the project's.
`POST /reconstruct` with `{"pixels": [H×W nested lists, ...]}` (a batchable BentoML API takes a batch per request:
one image is a list of one) answers one entry per image, the same fields and numbers as the gateway's
`POST /reconstruct?format=array&error_format=json&heatmap=false` with `pixels` in: `shape`, `denoised` (H×W×1),
`error_map` (|input − denoised|, H×W) and `error_stats` (mean, max, p99). BentoML's dispatcher merges concurrent
requests into one onnxruntime run of at most BENCH_BENTOML_MAX_BATCH_SIZE images (default 64, the gateway's
micro-batch) and sheds a request (503) that it predicts would wait more than BENCH_BENTOML_MAX_LATENCY_MS
(default 2000: it queues instead of shedding at concurrency 32). onnxruntime runs with the gateway's options
(BENCH_ONNX_THREADS intra-op threads, sequential, no spinning, no arena), so the two differ in the serving stack only.
"""

from __future__ import annotations

import os
from typing import Annotated

import bentoml
import numpy as np
import onnxruntime as ort
from bentoml.validators import ContentType, DType
from pydantic import BaseModel

MAX_BATCH_SIZE = int(os.environ.get("BENCH_BENTOML_MAX_BATCH_SIZE", "64"))
MAX_LATENCY_MS = int(os.environ.get("BENCH_BENTOML_MAX_LATENCY_MS", "2000"))
ERROR_PERCENTILE = 99.0


class ErrorStats(BaseModel):
    """Summary of one L1 error map."""

    mean: float
    max: float
    p99: float


class Reconstructed(bentoml.IODescriptor):  # BentoML's pydantic base: array fields are validated and sent as lists
    """One denoised image and its error map, as JSON arrays."""

    shape: list[int]
    denoised: Annotated[np.ndarray, DType("float32")]
    error_map: Annotated[np.ndarray, DType("float32")]
    error_stats: ErrorStats


def session_options(threads: int) -> ort.SessionOptions:
    """The gateway's onnxruntime options (service/inference.py), so that only the serving stack differs."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_cpu_mem_arena = False
    return options


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class Denoiser:
    """The dense DAE of bench/serve.py behind one batchable API."""

    def __init__(self) -> None:
        threads = int(os.environ.get("BENCH_ONNX_THREADS", "1"))
        self.session = ort.InferenceSession(
            os.environ["BENCH_ONNX_MODEL"], session_options(threads), providers=["CPUExecutionProvider"]
        )
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.output_name = self.session.get_outputs()[0].name
        _, height, width, channels = model_input.shape
        self.session.run([self.output_name], {self.input_name: np.zeros((1, height, width, channels), np.float32)})

    @bentoml.api(route="/reconstruct", batchable=True, max_batch_size=MAX_BATCH_SIZE, max_latency_ms=MAX_LATENCY_MS)
    def reconstruct(
        self, pixels: Annotated[np.ndarray, DType("float32")]
    ) -> Annotated[list[Reconstructed], ContentType("application/json")]:  # else a JSON schema is built per answer
        """Denoise (N, H, W) gray images in [0, 1]: per image the output clipped to [0, 1], |input − output|, stats."""
        images = np.ascontiguousarray(pixels[..., np.newaxis])
        outputs = self.session.run([self.output_name], {self.input_name: images})[0]
        np.clip(outputs, 0.0, 1.0, out=outputs)
        error_maps = np.abs(images - outputs)[..., 0]
        flat = error_maps.reshape(len(error_maps), -1)
        means, maxima = flat.mean(axis=1), flat.max(axis=1)
        p99s = np.percentile(flat, ERROR_PERCENTILE, axis=1)
        return [
            Reconstructed(
                shape=list(output.shape), denoised=output, error_map=error_map,
                error_stats=ErrorStats(mean=float(mean), max=float(top), p99=float(p99)),
            )
            for output, error_map, mean, top, p99 in zip(outputs, error_maps, means, maxima, p99s, strict=True)
        ]
