"""onnxruntime sessions: the options they run with (in one place), loading and warming a model, and a cache of
loaded models bounded by count and by an estimate of their memory.

Options (session_options): `intra_op_num_threads` defaults to half the cores (the event loop, JSON and PNG work
need the rest; small DAE graphs gain little from more threads); one inter-op thread with sequential execution (an
autoencoder is a chain of layers); no spinning (idle threads would burn the event loop's CPU); no CPU memory arena
(it keeps each session's largest run allocated for good, which no budget could count; bench/README.md). A session
then holds its weights and little else, which the cache's estimate (twice the file plus 4 MiB) bounds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from dae.errors import InvalidImage
from dae.spec import ModelCard

logger = logging.getLogger(__name__)

#: Fixed per-session overhead in the memory estimate (graph, allocator, kernels), bytes: above what was measured
#: with the arena off (bench/README.md, 2026-12-02).
SESSION_OVERHEAD_BYTES = 4 * 1024 * 1024
#: onnxruntime keeps the initializers plus pre-packed copies of the weights: about twice the file.
WEIGHTS_MEMORY_FACTOR = 2.0

def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """onnxruntime options for serving small DAEs (the reasons are in the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The arena keeps every session's largest run allocated for good; measured no slower off (bench/README.md).
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return options


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to serve: its card, its onnxruntime session and the facts the request path needs."""

    model_id: str
    card: ModelCard
    session: ort.InferenceSession
    input_name: str
    output_name: str
    channels: int
    fixed_size: tuple[int, int] | None  # (H, W) for dense models; None for conv models (any size)
    downsampling_factor: int  # conv inputs are padded to a multiple of this
    memory_bytes: int  # estimate used by the cache budget
    load_seconds: float
    #: The answer's `model` object (ModelSummary), built once per load: which model answered and its training noise.
    summary: dict[str, Any]

    def padded_size(self, height: int, width: int) -> tuple[int, int]:
        """The (H, W) the session runs on for an input of (height, width)."""
        factor = self.downsampling_factor
        return height + (-height) % factor, width + (-width) % factor

    def check_size(self, height: int, width: int, *, field: str = "image") -> None:
        """InvalidImage unless a dense model gets exactly its training size."""
        if self.fixed_size is not None and (height, width) != self.fixed_size:
            expected_h, expected_w = self.fixed_size
            raise InvalidImage(
                f"{field} does not fit model {self.model_id}: a dense model takes exactly its training size. "
                f"Expected {expected_h}x{expected_w}x{self.channels}. Received: {height}x{width}"
            )


def load_model(card: ModelCard, onnx_path: Path, *, intra_op_threads: int) -> LoadedModel:
    """Create the onnxruntime session of a model and warm it up with one run on zeros (blocking)."""
    started = time.perf_counter()
    session = ort.InferenceSession(
        str(onnx_path), session_options(intra_op_threads), providers=["CPUExecutionProvider"]
    )
    height, width, channels = (int(side) for side in card.trained_shape)
    is_conv = card.spec.architecture.is_fully_convolutional  # conv, unet and residual take any size
    factor = card.spec.architecture.downsampling_factor if is_conv else 1
    input_name = session.get_inputs()[0].name
    output_name = session.get_outputs()[0].name
    warm_up = np.zeros((1, height + (-height) % factor, width + (-width) % factor, channels), np.float32)
    session.run([output_name], {input_name: warm_up})
    seconds = time.perf_counter() - started
    logger.info("loaded model %s (%s v%d) in %.1f ms", card.id, card.name, card.version, seconds * 1000)
    return LoadedModel(
        model_id=card.id,
        card=card,
        session=session,
        input_name=input_name,
        output_name=output_name,
        channels=channels,
        fixed_size=None if is_conv else (height, width),
        downsampling_factor=factor,
        memory_bytes=int(onnx_path.stat().st_size * WEIGHTS_MEMORY_FACTOR) + SESSION_OVERHEAD_BYTES,
        load_seconds=seconds,
        summary={"id": card.id, "name": card.name, "version": card.version,
                 "trained_noise": card.trained_noise.model_dump(mode="json")},
    )


class SessionCache:
    """Loaded models, least recently used first out; bounded by count and by estimated memory. Thread-safe."""

    def __init__(self, *, max_sessions: int, memory_budget_bytes: int) -> None:
        if max_sessions < 1 or memory_budget_bytes <= 0:
            raise ValueError(
                f"Expected max_sessions >= 1 and memory_budget_bytes > 0. "
                f"Received: max_sessions={max_sessions}, memory_budget_bytes={memory_budget_bytes}"
            )
        self.max_sessions = max_sessions
        self.memory_budget_bytes = memory_budget_bytes
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, model_id: str) -> LoadedModel | None:
        """The loaded model (now most recently used), or None."""
        with self._lock:
            model = self._models.get(model_id)
            if model is not None:
                self._models.move_to_end(model_id)
            return model

    def put(self, model: LoadedModel) -> list[str]:
        """Insert a model and evict least recently used ones until both bounds hold; returns the evicted ids.

        The model just inserted always stays, even if it alone exceeds the memory budget.
        """
        evicted = []
        with self._lock:
            self._models[model.model_id] = model
            self._models.move_to_end(model.model_id)
            while len(self._models) > 1 and (
                len(self._models) > self.max_sessions or self._total_bytes() > self.memory_budget_bytes
            ):
                model_id, _ = self._models.popitem(last=False)
                evicted.append(model_id)
            self.evictions += len(evicted)
        for model_id in evicted:
            logger.info("evicted model %s from the session cache", model_id)
        return evicted

    def remove(self, model_id: str) -> bool:
        """Drop a model (e.g. it was deleted); True if it was loaded."""
        with self._lock:
            return self._models.pop(model_id, None) is not None

    def _total_bytes(self) -> int:
        return sum(model.memory_bytes for model in self._models.values())

    @property
    def total_bytes(self) -> int:
        """Estimated memory of all loaded sessions."""
        with self._lock:
            return self._total_bytes()

    def model_ids(self) -> list[str]:
        """Loaded model ids, least recently used first."""
        with self._lock:
            return list(self._models)

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)


