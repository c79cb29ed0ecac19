"""The inference engine: a reference resolves through the caller's owner view of the store
(service.inference.resolver) to a loaded model (service.inference.sessions), images run through
the micro-batcher (service.inference.batcher) in pieces, and every batch comes back as outputs clipped to [0, 1]
with their L1 error maps and statistics (Denoised); encoding the answer is the caller's (service.reconstruct).

`denoise_pieces(model, images)` pads conv inputs to a multiple of the model's downsampling factor (reflect padding
at the bottom and right, cropped back afterwards) and cuts a request into micro-batch-sized pieces (at most
`batch_max_size` images and `batch_max_values` values each) queued under (model, padded H, padded W): images of
different sizes never share a run, and no run is larger than a micro-batch. The values waiting or running are
bounded: above `queue_max_values` a request raises Overloaded (503), and one larger than the bound PayloadTooLarge.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from core.store import ModelStore
from dae.errors import InvalidImage, Overloaded, PayloadTooLarge
from dae.spec import DEFAULT_OWNER
from service.imaging.error_maps import ErrorMaps
from service.inference.batcher import BatchStats, MicroBatcher
from service.inference.memory import release_free_memory
from service.inference.resolver import ModelResolver
from service.inference.sessions import LoadedModel, SessionCache, load_model

#: A batch of at most this many values is clipped and measured on the event loop once its run is back, a larger one
#: in the worker thread: numpy keeps the GIL on small arrays, so a thread only adds wake-ups (bench/README.md).
LOOP_POSTPROCESS_MAX_VALUES = 128 * 1024
#: Defaults of the micro-batch value bound and the queue bound (DAE_INFERENCE_BATCH_MAX_VALUES and
#: DAE_INFERENCE_QUEUE_MAX_VALUES; see service/config.py for the reasons).
DEFAULT_BATCH_MAX_VALUES = 256 * 1024
DEFAULT_QUEUE_MAX_VALUES = 64 * 1024 * 1024

#: A trim runs this long after a large answer, and at most once per this long (see release_free_memory_soon).
TRIM_DELAY_S = 1.0


def _ready_to_run(images: np.ndarray) -> bool:
    """Whether onnxruntime can take the array as it is (no copy needed)."""
    return images.dtype == np.float32 and images.flags.c_contiguous


def _run_input(images: np.ndarray, padded_h: int, padded_w: int) -> np.ndarray:
    """Contiguous float32 (N, padded_h, padded_w, C): reflect padding at the bottom and right edges if needed."""
    _, height, width, _ = images.shape
    if (padded_h, padded_w) != (height, width):
        images = np.pad(images, ((0, 0), (0, padded_h - height), (0, padded_w - width), (0, 0)), mode="reflect")
    return np.ascontiguousarray(images, dtype=np.float32)


def _cropped_pieces(inputs: list[np.ndarray], pieces: list[Denoised], height: int, width: int) -> list[Denoised]:
    """Padded pieces cropped back to (height, width) and measured against the unpadded inputs (contiguous
    outputs, as the unpadded path gives)."""
    return [
        Denoised.of(images[:, :height, :width, :], np.ascontiguousarray(piece.outputs[:, :height, :width, :]))
        for images, piece in zip(inputs, pieces, strict=True)
    ]

@dataclass(slots=True)
class Denoised:
    """Outputs (N, H, W, C) clipped to [0, 1] and their L1 error maps against the inputs the model saw."""

    outputs: np.ndarray
    errors: ErrorMaps

    @classmethod
    def of(cls, inputs: np.ndarray, outputs: np.ndarray) -> Denoised:
        """The error maps and statistics of a batch's outputs, in vectorized passes over the batch."""
        return cls(outputs, ErrorMaps.between(inputs, outputs))

    def rows(self, start: int, stop: int) -> Denoised:
        """Images start..stop (views)."""
        return Denoised(self.outputs[start:stop], self.errors.rows(start, stop))

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
        )


def _postprocess(inputs: np.ndarray, outputs: np.ndarray) -> Denoised:
    """A batch's outputs clipped to [0, 1] (in place) with their error maps (Denoised.of)."""
    np.clip(outputs, 0.0, 1.0, out=outputs)
    return Denoised.of(inputs, outputs)


@dataclass(slots=True)
class _BatchRun:
    """A finished run: the batch, onnxruntime's raw outputs, and for a large batch the finished Denoised."""

    inputs: np.ndarray
    outputs: np.ndarray
    denoised: Denoised | None


def run_batch(model: LoadedModel, arrays: list[np.ndarray]) -> _BatchRun:
    """In a worker thread: one onnxruntime run over the concatenated batch (and, for a large batch, its errors)."""
    inputs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
    output = model.session.run([model.output_name], {model.input_name: inputs})[0]
    large = inputs.size > LOOP_POSTPROCESS_MAX_VALUES
    return _BatchRun(inputs, output, _postprocess(inputs, output) if large else None)


def split_batch(run: _BatchRun, arrays: list[np.ndarray]) -> list[Denoised]:
    """On the event loop: the batch's Denoised (computed here for a small batch), one slice per caller."""
    result = run.denoised if run.denoised is not None else _postprocess(run.inputs, run.outputs)
    shares = []
    start = 0
    for images in arrays:
        shares.append(result.rows(start, start + len(images)))
        start += len(images)
    return shares


class InferenceStats:
    """Counters of one engine (also exported as Prometheus metrics): its batcher's and its model loads."""

    def __init__(self, batches: BatchStats) -> None:
        self._batches = batches
        self.loads = 0

    @property
    def batches(self) -> int:
        return self._batches.batches

    @property
    def images(self) -> int:
        return self._batches.items

    @property
    def recent_batch_sizes(self) -> list[int] | object:
        return self._batches.recent_batch_sizes


class InferenceEngine:
    """Loaded models + micro-batcher; create inside the app's lifespan, `close()` at shutdown."""

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
        self.store = store
        self.resolver = ModelResolver(store)
        self.cache = SessionCache(max_sessions=cache_size, memory_budget_bytes=int(memory_budget_mib * 1024 * 1024))
        self.batcher: MicroBatcher[np.ndarray, _BatchRun, Denoised] = MicroBatcher(
            run_batch, split_batch, max_size=batch_max_size, max_values=batch_max_values,
            timeout_s=batch_timeout_ms / 1000.0, queue_max_values=queue_max_values, workers=workers,
            thread_name_prefix="dae-onnx", on_batch=on_batch,
        )
        self.batch_max_size = batch_max_size
        self.batch_max_values = batch_max_values
        self.queue_max_values = queue_max_values
        self.intra_op_threads = intra_op_threads
        self.retry_after_s = retry_after_s
        self.stats = InferenceStats(self.batcher.stats)
        self.executor = self.batcher.executor  # batches run here
        # Model loads and trims get their own thread so a slow load never delays serving.
        self._load_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dae-onnx-load")
        self._loading: dict[str, asyncio.Future[LoadedModel]] = {}
        self._trim: asyncio.TimerHandle | None = None

    # -- models ----------------------------------------------------------------------------------

    async def model(self, ref: str, owner: str = DEFAULT_OWNER, *, every_owner: bool = True) -> LoadedModel:
        """The loaded model for a reference (id | name | name:version) as `owner` sees the store (every owner's ids
        with `every_owner`; names always inside `owner`); loads it on a cache miss. ModelNotFound otherwise.

        Resolved through the store's owner view (service.inference.resolver): a deleted model stops serving at
        once, a newly published version of a name within NAME_CACHE_TTL_S.
        """
        model_id = self.resolver.resolve(ref, owner, every_owner=every_owner)
        model = self.cache.get(model_id)
        if model is not None:
            return model
        pending = self._loading.get(model_id)
        if pending is None:
            view = self.resolver.view(owner, every_owner)
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._load_executor, self._load, view, model_id)
            self._loading[model_id] = pending
            pending.add_done_callback(lambda _: self._loading.pop(model_id, None))
        return await asyncio.shield(pending)

    def _load(self, view: ModelStore, model_id: str) -> LoadedModel:
        cached = self.cache.get(model_id)  # loaded by an earlier queued load
        if cached is not None:
            return cached
        card = view.read_card(model_id)
        onnx_path = view.artifact_path(model_id, "model.onnx")
        model = load_model(card, onnx_path, intra_op_threads=self.intra_op_threads)
        self.cache.put(model)
        self.stats.loads += 1
        return model

    def evict(self, model_id: str) -> bool:
        """Forget a model's session and every resolution to it (after DELETE /models); True if it was loaded."""
        self.resolver.forget(model_id)
        return self.cache.remove(model_id)

    # -- running ---------------------------------------------------------------------------------

    @property
    def queued_images(self) -> int:
        """Images accepted and not yet answered (waiting or running)."""
        return self.batcher.queued_size

    @property
    def queued_values(self) -> int:
        """Pixel values (padded) accepted and not yet answered: what `queue_max_values` bounds."""
        return self.batcher.queued_values

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
        if not self.batcher.try_reserve(count, values):
            raise Overloaded(
                f"The inference queue is full. Expected at most {self.queue_max_values} pixel values waiting "
                f"(DAE_INFERENCE_QUEUE_MAX_VALUES); retry after {self.retry_after_s} s. Received: {values} more "
                f"with {self.batcher.queued_values} waiting"
            )
        padded = (padded_h, padded_w) != (height, width)
        if values > LOOP_POSTPROCESS_MAX_VALUES and (padded or not _ready_to_run(images)):
            try:  # a large copy happens off the event loop (the values are reserved meanwhile)
                images = await asyncio.to_thread(_run_input, images, padded_h, padded_w)
            except BaseException:
                self.batcher.release(count, values)
                raise
        elif padded:
            images = _run_input(images, padded_h, padded_w)
        else:
            images = np.ascontiguousarray(images, dtype=np.float32)  # the same array when it already is
        per_piece = max(1, min(self.batch_max_size, self.batch_max_values // per_image))
        key = (model.model_id, padded_h, padded_w)
        if count <= per_piece:  # the common case: one piece (a cancelled caller cancels its future)
            inputs = [images]
            futures = [self.batcher.submit(key, model, images, count, values)]
            pieces: list[Denoised] = [await futures[0]]
        else:
            inputs = [images[start : start + per_piece] for start in range(0, count, per_piece)]
            futures = [self.batcher.submit(key, model, piece, len(piece), piece.size) for piece in inputs]
            try:
                pieces = [await future for future in futures]
            except BaseException:
                for future in futures:  # a failed piece or a caller gone: the other pieces need not run
                    future.cancel()
                raise
        if not padded:
            return pieces
        # The batch's maps cover the padding: crop the outputs and measure them against the original images.
        if values > LOOP_POSTPROCESS_MAX_VALUES:
            return await asyncio.to_thread(_cropped_pieces, inputs, pieces, height, width)
        return _cropped_pieces(inputs, pieces, height, width)

    def release_free_memory_soon(self) -> None:
        """After a large answer: release_free_memory in a thread TRIM_DELAY_S from now, unless one is pending.

        Delayed and coalesced because each trim makes the next large request fault its pages in again; this way a
        stream of large requests pays one trim per second and the memory still goes back within a second."""
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
        self.batcher.close()
        self._load_executor.shutdown(wait=True, cancel_futures=True)
