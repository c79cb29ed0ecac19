"""Serving models: a bounded cache of onnxruntime sessions and a micro-batcher in front of them.

How a /reconstruct call reaches onnxruntime:

1. `InferenceEngine.model(ref)` resolves the reference to a model id and returns the loaded model, loading it
   (in a worker thread, once even under concurrent requests) on a cache miss. The cache is an LRU bounded both
   by the number of sessions and by an estimate of their memory; a new session is warmed up with one run on
   zeros before it serves, so the first real request does not pay onnxruntime's lazy initialisation.
2. `InferenceEngine.denoise_pieces(model, images)` (or `denoise` for one Denoised, `run` for the outputs alone)
   pads conv inputs to a multiple of the model's downsampling factor (reflect padding at the bottom and right
   edges, cropped back afterwards), cuts a request larger than a micro-batch into micro-batch-sized pieces
   (consecutive images; at most `batch_max_size` images and `batch_max_values` values each) and queues them in a
   *lane*, one per (model, padded height, padded width): images of different sizes are never batched together.
   No onnxruntime run is larger than a micro-batch, whatever a request holds (one image larger than
   `batch_max_values` runs alone).
3. A lane becomes a batch when it holds `batch_max_size` images or `batch_max_values` values, or
   `batch_timeout_s` after its first request arrived (TF Serving's `batch_timeout_micros`). While every worker
   thread is busy, ready lanes wait and keep filling, so batches grow with load instead of queueing as many small
   runs. The batch runs in a thread
   (onnxruntime releases the GIL). The L1 error maps |input − output|, their statistics and the PNG rows are
   computed for the whole batch at once (service.error_maps, service.images): on the event loop when the run is
   back for a small batch, in the worker thread for a large one (see LOOP_POSTPROCESS_MAX_VALUES). Each awaiting
   caller gets its slice (asyncio futures).
4. The pixel values (padded H × W × channels, summed over images) waiting or running are bounded: above
   `queue_max_values` a request raises Overloaded (HTTP 503 with Retry-After) instead of letting latency and
   memory grow without limit; a request larger than the whole bound raises PayloadTooLarge (413: it never fits).

onnxruntime threading (see `session_options`): `intra_op_num_threads` defaults to half the cores, because the
event loop, JSON and PNG work need the rest and small DAE graphs gain little from more threads (measured on
2 cores: 1 thread beat 2 for batches of 1-64 28x28 images); `inter_op_num_threads=1` with sequential execution,
because an autoencoder is a chain of layers with no parallel branches to run side by side; spinning is off so
idle onnxruntime threads do not burn the CPU the event loop needs between requests; the CPU memory arena is off,
because it keeps the peak of each session's largest run allocated for the session's life (the default conv DAE held
1.9 GiB after one 16x512² run, 20 MiB after a 64x28² one), which no budget could count, while freeing each run's
memory measured no slower (bench/README.md, 2026-12-02). A session then holds its weights and little else, and the
cache's memory estimate (twice the file plus 4 MiB) bounds it; one run's working memory is bounded by the
micro-batch (`batch_max_values`) and is returned when the run ends.

Served outputs are clipped to [0, 1].
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from core.store import CARD_FILE, ModelStore, is_model_id
from dae.errors import InvalidImage, Overloaded, PayloadTooLarge
from dae.spec import ModelCard
from service.error_maps import ErrorMaps
from service.images import heatmap_rows, png_rows

logger = logging.getLogger(__name__)

#: Fixed per-session overhead in the memory estimate (graph, allocator, kernels), bytes. Measured with the arena
#: off, after a 64-image run: 0.8-2.5 MiB per session for models of 15 KiB-1.9 MiB, under the estimate's 4-7.6 MiB.
SESSION_OVERHEAD_BYTES = 4 * 1024 * 1024
#: onnxruntime keeps the initializers plus pre-packed copies of the weights: about twice the file.
WEIGHTS_MEMORY_FACTOR = 2.0
#: How long a name (or name:version) keeps resolving to the same model id without looking at the store again:
#: a newly published version of a name serves within this time.
NAME_CACHE_TTL_S = 1.0
NAME_CACHE_SIZE = 4096
#: A batch of at most this many pixel values is clipped and measured (error maps, statistics, PNG rows) on the
#: event loop once its onnxruntime run is back; a larger one in the worker thread, right after the run.
#: numpy keeps the GIL on small arrays, so for a small batch the worker thread gains no parallelism, and while it
#: waits for the GIL of a busy event loop every release by the loop wakes it in vain (strace: ~57 futex calls per
#: batch; perf: ~36 µs of futex time per request on a 2-core VM). Measured on 2 cores, dense 28x28, c=32:
#: three paired runs gave 3,417/3,158/3,049 req/s with the work in the worker thread, 3,936/3,717/3,763 on the loop.
LOOP_POSTPROCESS_MAX_VALUES = 128 * 1024
#: Defaults of the micro-batch value bound and the queue bound (DAE_INFERENCE_BATCH_MAX_VALUES and
#: DAE_INFERENCE_QUEUE_MAX_VALUES; see service/config.py for the reasons).
DEFAULT_BATCH_MAX_VALUES = 256 * 1024
DEFAULT_QUEUE_MAX_VALUES = 64 * 1024 * 1024


#: glibc's malloc_trim (None on other C libraries): see release_free_memory.
_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None) if os.name == "posix" else None


#: A trim runs this long after a large answer, and at most once per this long (see release_free_memory_soon).
TRIM_DELAY_S = 1.0


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; a no-op elsewhere).

    glibc keeps most of what a large request freed (its threshold for returning blocks rises with the blocks it
    sees): measured after a 16x512² batch, the gateway's RSS stayed ~200 MiB higher, used by nothing. Trimming
    after such an answer (~8 ms, in a worker thread) left ~20 MiB; returning every block at once instead
    (MALLOC_MMAP_THRESHOLD_) did too but doubled the request's time in page faults.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def session_options(intra_op_threads: int) -> ort.SessionOptions:
    """onnxruntime options for serving small DAEs (the reasons are in the module docstring)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # The arena keeps every session's largest run for good (a 16x512² batch: +1.9 GiB held); measured no slower off.
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
    is_conv = card.spec.architecture.type == "conv"
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


@dataclass(slots=True)  # per request: plain slots (a frozen dataclass sets each field via object.__setattr__)
class Denoised:
    """Outputs (N, H, W, C), clipped to [0, 1], their L1 error maps against the inputs the model saw, and both
    as PNG-ready rows (service.images.png_rows / heatmap_rows): what every /reconstruct answer is built from."""

    outputs: np.ndarray
    errors: ErrorMaps
    png_rows: np.ndarray
    heatmap_rows: np.ndarray

    @classmethod
    def of(cls, inputs: np.ndarray, outputs: np.ndarray) -> Denoised:
        """Everything derived from a batch's outputs, in vectorized passes over the batch."""
        errors = ErrorMaps.between(inputs, outputs)
        return cls(outputs, errors, png_rows(outputs), heatmap_rows(errors.maps, errors.maxima))

    def rows(self, start: int, stop: int) -> Denoised:
        """Images start..stop (views)."""
        return Denoised(self.outputs[start:stop], self.errors.rows(start, stop), self.png_rows[start:stop],
                        self.heatmap_rows[start:stop])

    @classmethod
    def concat(cls, pieces: list[Denoised]) -> Denoised:
        """Consecutive pieces as one (copies; the route uses the pieces directly)."""
        if len(pieces) == 1:
            return pieces[0]
        errors = [piece.errors for piece in pieces]
        return cls(
            np.concatenate([piece.outputs for piece in pieces]),
            ErrorMaps(*(np.concatenate([getattr(error, name) for error in errors])
                        for name in ("maps", "means", "maxima", "p99s"))),
            np.concatenate([piece.png_rows for piece in pieces]),
            np.concatenate([piece.heatmap_rows for piece in pieces]),
        )


def _ready_to_run(images: np.ndarray) -> bool:
    """Whether onnxruntime can take the array as it is (no copy needed)."""
    return images.dtype == np.float32 and images.flags.c_contiguous


def _run_input(images: np.ndarray, padded_h: int, padded_w: int) -> np.ndarray:
    """Contiguous float32 (N, padded_h, padded_w, C): reflect padding at the bottom and right edges if needed."""
    _, height, width, _ = images.shape
    if (padded_h, padded_w) != (height, width):
        images = np.pad(images, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)), mode="reflect")
    return np.ascontiguousarray(images, dtype=np.float32)


def _cropped_pieces(requests: list[_Request], pieces: list[Denoised], height: int, width: int) -> list[Denoised]:
    """Padded pieces cropped back to (height, width) and measured against the unpadded inputs (contiguous
    outputs, as the unpadded path gives)."""
    return [
        Denoised.of(request.images[:, :height, :width, :],
                    np.ascontiguousarray(piece.outputs[:, :height, :width, :]))
        for request, piece in zip(requests, pieces, strict=True)
    ]


def _postprocess(inputs: np.ndarray, outputs: np.ndarray) -> Denoised:
    """A batch's outputs clipped to [0, 1] (in place) with everything derived from them (Denoised.of)."""
    np.clip(outputs, 0.0, 1.0, out=outputs)
    return Denoised.of(inputs, outputs)


@dataclass(slots=True)
class _BatchRun:
    """What a worker thread hands back: the batch, onnxruntime's raw outputs, the run's seconds, and for a large
    batch (over LOOP_POSTPROCESS_MAX_VALUES) the finished Denoised."""

    inputs: np.ndarray
    outputs: np.ndarray
    seconds: float
    denoised: Denoised | None


@dataclass
class _Request:
    """Images of one caller (or one piece of a caller's images) waiting in a lane, and the future its result goes to."""

    images: np.ndarray
    future: asyncio.Future
    values: int  # images.size, counted against the queue and batch bounds


@dataclass
class _Lane:
    """Requests for one (model, padded H, padded W) that may share a batch."""

    model: LoadedModel
    requests: deque[_Request] = field(default_factory=deque)
    images: int = 0
    values: int = 0
    timer: asyncio.TimerHandle | None = None
    ready: bool = False  # waiting in the ready queue for a free worker


@dataclass
class InferenceStats:
    """Counters of one engine (also exported as Prometheus metrics)."""

    batches: int = 0
    images: int = 0
    loads: int = 0
    recent_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


class InferenceEngine:
    """Session cache + micro-batcher; create inside the app's lifespan, `close()` at shutdown."""

    def __init__(
        self,
        store: ModelStore,
        *,
        cache_size: int = 16,
        memory_budget_mib: float = 1024.0,
        batch_max_size: int = 64,
        batch_max_values: int = DEFAULT_BATCH_MAX_VALUES,
        batch_timeout_ms: float = 1.0,
        queue_max_values: int = DEFAULT_QUEUE_MAX_VALUES,
        intra_op_threads: int = 1,
        workers: int = 1,
        retry_after_s: int = 1,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if min(batch_max_size, batch_max_values, queue_max_values, workers) < 1 or batch_timeout_ms < 0:
            raise ValueError(
                "Expected batch_max_size, batch_max_values, queue_max_values and workers >= 1 and batch_timeout_ms "
                f">= 0. Received: batch_max_size={batch_max_size}, batch_max_values={batch_max_values}, "
                f"queue_max_values={queue_max_values}, workers={workers}, batch_timeout_ms={batch_timeout_ms}"
            )
        self.store = store
        self.cache = SessionCache(max_sessions=cache_size, memory_budget_bytes=int(memory_budget_mib * 1024 * 1024))
        self.batch_max_size = batch_max_size
        self.batch_max_values = batch_max_values
        self.batch_timeout_s = batch_timeout_ms / 1000.0
        self.queue_max_values = queue_max_values
        self.intra_op_threads = intra_op_threads
        self.workers = workers
        self.retry_after_s = retry_after_s
        self.on_batch = on_batch
        self.stats = InferenceStats()
        # Batches run here; model loads get their own thread so a slow load never delays serving.
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dae-onnx")
        self._load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dae-onnx-load")
        self._loading: dict[str, asyncio.Future] = {}
        self._names: dict[str, tuple[str, float]] = {}  # name or name:version -> (model id, expiry)
        self._card_paths: dict[str, str] = {}  # model id -> path of its card.json
        self._lanes: dict[tuple[str, int, int], _Lane] = {}
        self._ready: deque[tuple[str, int, int]] = deque()
        self._running = 0
        self._queued_images = 0
        self._queued_values = 0
        self._trim: asyncio.TimerHandle | None = None

    # -- models ----------------------------------------------------------------------------------

    async def model(self, ref: str) -> LoadedModel:
        """The loaded model for a reference (id | name | name:version); loads it on a cache miss.

        The model's existence is checked on every call (one stat), so a deleted model stops serving at once;
        a name's newest version is looked up at most every NAME_CACHE_TTL_S seconds (a directory listing).
        """
        model_id = self._resolve(ref)
        model = self.cache.get(model_id)
        if model is not None:
            return model
        pending = self._loading.get(model_id)
        if pending is None:
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._load_executor, self._load, model_id)
            self._loading[model_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(model_id, None))
        return await asyncio.shield(pending)

    def _resolve(self, ref: str) -> str:
        if is_model_id(ref):
            if self._is_published(ref):
                return ref
            return self.store.resolve_model_id(ref)  # ModelNotFound, with the store's message
        cached = self._names.get(ref)
        if cached is not None and cached[1] > time.monotonic() and self._is_published(cached[0]):
            return cached[0]
        model_id = self.store.resolve_model_id(ref)
        if model_id != ref:
            if len(self._names) >= NAME_CACHE_SIZE:
                self._names.clear()
            self._names[ref] = (model_id, time.monotonic() + NAME_CACHE_TTL_S)
        return model_id

    def _is_published(self, model_id: str) -> bool:
        """Whether the model's card is on disk: ModelStore.resolve_model_id's test, as one stat of a cached path."""
        path = self._card_paths.get(model_id)
        if path is None:
            if len(self._card_paths) >= NAME_CACHE_SIZE:
                self._card_paths.clear()
            path = self._card_paths[model_id] = os.path.join(self.store.models_dir, model_id, CARD_FILE)
        return os.path.isfile(path)

    def _load(self, model_id: str) -> LoadedModel:
        cached = self.cache.get(model_id)  # loaded by an earlier queued load
        if cached is not None:
            return cached
        card = self.store.read_card(model_id)
        onnx_path = self.store.artifact_path(model_id, "model.onnx")
        model = load_model(card, onnx_path, intra_op_threads=self.intra_op_threads)
        self.cache.put(model)
        self.stats.loads += 1
        return model

    def evict(self, model_id: str) -> bool:
        """Forget a model's session (after DELETE /models); True if it was loaded."""
        return self.cache.remove(model_id)

    # -- running ---------------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        """Images accepted and not yet answered (waiting in lanes or running)."""
        return self._queued_images

    @property
    def queued_values(self) -> int:
        """Pixel values (padded) accepted and not yet answered: what `queue_max_values` bounds."""
        return self._queued_values

    async def run(self, model: LoadedModel, images: np.ndarray) -> np.ndarray:
        """Denoise (N, H, W, C) float32 images in the model's channels; returns (N, H, W, C) clipped to [0, 1]."""
        return (await self.denoise(model, images)).outputs

    async def denoise(self, model: LoadedModel, images: np.ndarray) -> Denoised:
        """Denoise (N, H, W, C) float32 images in the model's channels: outputs and error maps |images − outputs|.

        Raises InvalidImage for a dense model and the wrong size, Overloaded when the queue is full.
        """
        return Denoised.concat(await self.denoise_pieces(model, images))

    async def denoise_pieces(self, model: LoadedModel, images: np.ndarray) -> list[Denoised]:
        """denoise() as consecutive micro-batch-sized pieces, in order (one piece when the images fit one batch).

        The whole request is counted against the queue bound when it arrives; its pieces queue at once and run as
        micro-batches, so no onnxruntime run holds more than one micro-batch's activations.
        """
        count, height, width, channels = images.shape
        model.check_size(height, width)
        if channels != model.channels:
            raise InvalidImage(
                f"Model {model.model_id} takes {model.channels} channel(s). Expected images shaped "
                f"(N, H, W, {model.channels}). Received: shape={list(images.shape)}"
            )
        padded_h, padded_w = model.padded_size(height, width)
        per_image = padded_h * padded_w * channels
        values = count * per_image
        if values > self.queue_max_values:
            raise PayloadTooLarge(
                f"The request is larger than the whole inference queue. Expected at most {self.queue_max_values} "
                f"pixel values (DAE_INFERENCE_QUEUE_MAX_VALUES). Received: {values}"
            )
        if self._queued_values + values > self.queue_max_values:
            raise Overloaded(
                f"The inference queue is full. Expected at most {self.queue_max_values} pixel values waiting "
                f"(DAE_INFERENCE_QUEUE_MAX_VALUES); retry after {self.retry_after_s} s. Received: {values} more "
                f"with {self._queued_values} waiting"
            )
        padded = (padded_h, padded_w) != (height, width)
        self._queued_values += values
        self._queued_images += count
        if values > LOOP_POSTPROCESS_MAX_VALUES and (padded or not _ready_to_run(images)):
            try:  # a large copy happens off the event loop (the values are reserved meanwhile)
                images = await asyncio.to_thread(_run_input, images, padded_h, padded_w)
            except BaseException:
                self._queued_values -= values
                self._queued_images -= count
                raise
        elif padded:
            images = _run_input(images, padded_h, padded_w)
        else:
            images = np.ascontiguousarray(images, dtype=np.float32)  # the same array when it already is
        per_piece = max(1, min(self.batch_max_size, self.batch_max_values // per_image))
        loop = asyncio.get_running_loop()
        key = (model.model_id, padded_h, padded_w)
        if count <= per_piece:  # the common case: one piece (a cancelled caller cancels its future)
            requests = [self._enqueue(key, model, images, loop)]
            pieces: list[Denoised] = [await requests[0].future]
        else:
            requests = [self._enqueue(key, model, images[start : start + per_piece], loop)
                        for start in range(0, count, per_piece)]
            try:
                pieces = [await request.future for request in requests]
            except BaseException:
                for request in requests:  # a failed piece or a caller gone: the other pieces need not run
                    request.future.cancel()
                raise
        if not padded:
            return pieces
        # The batch's maps cover the padding: crop the outputs and measure them against the original images.
        if values > LOOP_POSTPROCESS_MAX_VALUES:
            return await asyncio.to_thread(_cropped_pieces, requests, pieces, height, width)
        return _cropped_pieces(requests, pieces, height, width)

    def _enqueue(self, key: tuple[str, int, int], model: LoadedModel, images: np.ndarray,
                 loop: asyncio.AbstractEventLoop) -> _Request:
        """Queue (already counted) images in their lane; close the lane's batch when it is full."""
        request = _Request(images, loop.create_future(), images.size)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(model)
        lane.requests.append(request)
        lane.images += len(images)
        lane.values += request.values
        if lane.images >= self.batch_max_size or lane.values >= self.batch_max_values:
            self._close_batch(key)
        elif lane.timer is None and not lane.ready:
            lane.timer = loop.call_later(self.batch_timeout_s, self._close_batch, key)
        return request

    def _close_batch(self, key: tuple[str, int, int]) -> None:
        """A lane's batch is complete (full or timed out): run it now, or as soon as a worker is free."""
        lane = self._lanes.get(key)
        if lane is None:
            return
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        if lane.ready:
            return
        if self._running >= self.workers:
            lane.ready = True
            self._ready.append(key)
            return
        self._start_batch(key, lane)

    def _start_batch(self, key: tuple[str, int, int], lane: _Lane) -> None:
        batch: list[_Request] = []
        size = values = 0
        while lane.requests and (not batch or (size + len(lane.requests[0].images) <= self.batch_max_size
                                               and values + lane.requests[0].values <= self.batch_max_values)):
            request = lane.requests.popleft()
            lane.images -= len(request.images)
            lane.values -= request.values
            if request.future.cancelled():  # the client went away while waiting
                self._queued_images -= len(request.images)
                self._queued_values -= request.values
                continue
            batch.append(request)
            size += len(request.images)
            values += request.values
        if lane.requests:
            # Leftovers start a new batch window (or close at once if already full).
            loop = asyncio.get_running_loop()
            if lane.images >= self.batch_max_size or lane.values >= self.batch_max_values:
                loop.call_soon(self._close_batch, key)
            else:
                lane.timer = loop.call_later(self.batch_timeout_s, self._close_batch, key)
        else:
            del self._lanes[key]
        if not batch:
            return
        self._running += 1
        arrays = [request.images for request in batch]
        future = asyncio.get_running_loop().run_in_executor(self.executor, self._run_batch, lane.model, arrays)
        future.add_done_callback(lambda done: self._finish_batch(batch, size, values, done))

    def _run_batch(self, model: LoadedModel, arrays: list[np.ndarray]) -> _BatchRun:
        """In a worker thread: one onnxruntime run over the concatenated batch (and, for a large batch, its errors)."""
        started = time.perf_counter()
        inputs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        output = model.session.run([model.output_name], {model.input_name: inputs})[0]
        seconds = time.perf_counter() - started
        large = inputs.size > LOOP_POSTPROCESS_MAX_VALUES
        return _BatchRun(inputs, output, seconds, _postprocess(inputs, output) if large else None)

    def _finish_batch(self, batch: list[_Request], size: int, values: int, done: asyncio.Future) -> None:
        """On the event loop: hand every caller its slice, then start the next ready lane."""
        self._running -= 1
        self._queued_images -= size
        self._queued_values -= values
        self.stats.batches += 1
        self.stats.images += size
        self.stats.recent_batch_sizes.append(size)
        error = RuntimeError("The inference engine shut down before this batch ran.") if done.cancelled() else done.exception()
        result: Denoised | None = None
        if error is None:
            run: _BatchRun = done.result()
            if self.on_batch is not None:
                self.on_batch(len(run.inputs), run.seconds)
            try:
                result = run.denoised if run.denoised is not None else _postprocess(run.inputs, run.outputs)
            except Exception as postprocess_error:  # never leave a caller waiting
                error = postprocess_error
        start = 0
        for request in batch:
            count = len(request.images)
            if not request.future.done():
                if result is None:
                    request.future.set_exception(error)
                else:
                    request.future.set_result(result.rows(start, start + count))
            start += count
        while self._ready and self._running < self.workers:
            key = self._ready.popleft()
            lane = self._lanes.get(key)
            if lane is not None:
                lane.ready = False
                self._start_batch(key, lane)

    def release_free_memory_soon(self) -> None:
        """After a large answer: release_free_memory in a thread TRIM_DELAY_S from now, unless one is pending.

        Delayed and coalesced because each trim makes the next large request fault its pages in again (measured:
        +750 page faults per 256-image batch when trimming after every one); this way a stream of large requests
        pays one trim per second and the memory still goes back within a second of the last one."""
        if self._trim is None:
            loop = asyncio.get_running_loop()
            self._trim = loop.call_later(TRIM_DELAY_S, self._start_trim, loop)

    def _start_trim(self, loop: asyncio.AbstractEventLoop) -> None:
        self._trim = None
        loop.run_in_executor(self._load_executor, release_free_memory)

    def close(self) -> None:
        """Stop the worker threads (waiting for running batches)."""
        if self._trim is not None:
            self._trim.cancel()
        self.executor.shutdown(wait=True, cancel_futures=True)
        self._load_executor.shutdown(wait=True, cancel_futures=True)

