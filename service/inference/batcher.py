"""A payload-agnostic micro-batcher: callers' items queue per key, run together through a batch function in worker
threads, and each caller gets its slice back (in the spirit of Ray Serve's `serve.batch`).

An item has a size (what `max_size` counts, e.g. images) and values (what `max_values` and the queue bound count).
A key's batch closes when it holds `max_size` or `max_values`, or `timeout_s` after its first item arrived; while
all `workers` are busy, closed batches wait and keep filling, so batches grow with load. What is queued or running
is bounded by the caller through `try_reserve` (values are reserved before items are submitted).

`run(context, payloads)` runs in a worker thread; `split(result, payloads)` runs on the event loop and returns one
answer per payload, in order. Nothing here knows what a payload is.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

P = TypeVar("P")  # one caller's payload
R = TypeVar("R")  # what the batch function returns for a whole batch
S = TypeVar("S")  # one caller's share of it


@dataclass(eq=False)
class _Item(Generic[P, S]):
    """One caller's payload waiting in a lane, and the future its share goes to."""

    payload: P
    size: int
    values: int
    future: asyncio.Future[S]


@dataclass(eq=False)
class _Lane(Generic[P, S]):
    """Items of one key that may share a batch, and the context the batch function gets."""

    context: Any
    items: deque[_Item[P, S]] = field(default_factory=deque)
    size: int = 0
    values: int = 0
    timer: asyncio.TimerHandle | None = None
    ready: bool = False  # waiting in the ready queue for a free worker


@dataclass
class BatchStats:
    """Counters of one batcher."""

    batches: int = 0
    items: int = 0  # summed sizes
    recent_batch_sizes: deque[int] = field(default_factory=lambda: deque(maxlen=4096))


class MicroBatcher(Generic[P, R, S]):
    """Batches of `run` over items submitted under the same key; see the module docstring."""

    def __init__(
        self,
        run: Callable[[Any, list[P]], R],
        split: Callable[[R, list[P]], list[S]],
        *,
        max_size: int,
        max_values: int,
        timeout_s: float,
        queue_max_values: int,
        workers: int = 1,
        thread_name_prefix: str = "batch",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if min(max_size, max_values, queue_max_values, workers) < 1 or timeout_s < 0:
            raise ValueError(
                "Expected max_size, max_values, queue_max_values and workers >= 1 and timeout_s >= 0. Received: "
                f"max_size={max_size}, max_values={max_values}, queue_max_values={queue_max_values}, "
                f"workers={workers}, timeout_s={timeout_s}"
            )
        self.run = run
        self.split = split
        self.max_size = max_size
        self.max_values = max_values
        self.timeout_s = timeout_s
        self.queue_max_values = queue_max_values
        self.workers = workers
        self.on_batch = on_batch
        self.stats = BatchStats()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=thread_name_prefix)
        self._lanes: dict[Hashable, _Lane[P, S]] = {}
        self._ready: deque[Hashable] = deque()
        self._running = 0
        self.queued_size = 0
        self.queued_values = 0

    def try_reserve(self, size: int, values: int) -> bool:
        """Count `values` against the queue bound; False (nothing counted) when they do not fit now."""
        if self.queued_values + values > self.queue_max_values:
            return False
        self.queued_size += size
        self.queued_values += values
        return True

    def release(self, size: int, values: int) -> None:
        """Give back a reservation whose items will not be submitted."""
        self.queued_size -= size
        self.queued_values -= values

    def submit(self, key: Hashable, context: Any, payload: P, size: int, values: int) -> asyncio.Future[S]:
        """Queue a reserved item under `key` (a new lane takes `context`); a cancelled future's item is skipped."""
        loop = asyncio.get_running_loop()
        item: _Item[P, S] = _Item(payload, size, values, loop.create_future())
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(context)
        lane.items.append(item)
        lane.size += size
        lane.values += values
        if lane.size >= self.max_size or lane.values >= self.max_values:
            self._close_batch(key)
        elif lane.timer is None and not lane.ready:
            lane.timer = loop.call_later(self.timeout_s, self._close_batch, key)
        return item.future

    def _close_batch(self, key: Hashable) -> None:
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

    def _start_batch(self, key: Hashable, lane: _Lane[P, S]) -> None:
        batch: list[_Item[P, S]] = []
        size = values = 0
        while lane.items and (not batch or (size + lane.items[0].size <= self.max_size
                                            and values + lane.items[0].values <= self.max_values)):
            item = lane.items.popleft()
            lane.size -= item.size
            lane.values -= item.values
            if item.future.cancelled():  # the caller went away while waiting
                self.release(item.size, item.values)
                continue
            batch.append(item)
            size += item.size
            values += item.values
        loop = asyncio.get_running_loop()
        if lane.items:  # leftovers start a new batch window (or close at once if already full)
            if lane.size >= self.max_size or lane.values >= self.max_values:
                loop.call_soon(self._close_batch, key)
            else:
                lane.timer = loop.call_later(self.timeout_s, self._close_batch, key)
        else:
            del self._lanes[key]
        if not batch:
            return
        self._running += 1
        payloads = [item.payload for item in batch]
        future = loop.run_in_executor(self.executor, self._timed_run, lane.context, payloads)
        future.add_done_callback(lambda done: self._finish_batch(batch, size, values, done))

    def _timed_run(self, context: Any, payloads: list[P]) -> tuple[R, float]:
        started = time.perf_counter()
        result = self.run(context, payloads)
        return result, time.perf_counter() - started

    def _finish_batch(
        self, batch: list[_Item[P, S]], size: int, values: int, done: asyncio.Future[tuple[R, float]]
    ) -> None:
        """On the event loop: hand every caller its share, then start the next ready lane."""
        self._running -= 1
        self.release(size, values)
        self.stats.batches += 1
        self.stats.items += size
        self.stats.recent_batch_sizes.append(size)
        error: BaseException | None
        if done.cancelled():
            error = RuntimeError("The batcher shut down before this batch ran.")
        else:
            error = done.exception()
        shares: list[S] | None = None
        if error is None:
            result, seconds = done.result()
            if self.on_batch is not None:
                self.on_batch(size, seconds)
            try:
                shares = self.split(result, [item.payload for item in batch])
            except Exception as split_error:  # never leave a caller waiting
                error = split_error
        for index, item in enumerate(batch):
            if not item.future.done():
                if shares is None:
                    item.future.set_exception(error or RuntimeError("The batch gave no result."))
                else:
                    item.future.set_result(shares[index])
        while self._ready and self._running < self.workers:
            key = self._ready.popleft()
            lane = self._lanes.get(key)
            if lane is not None:
                lane.ready = False
                self._start_batch(key, lane)

    def close(self) -> None:
        """Stop the worker threads (waiting for running batches)."""
        self.executor.shutdown(wait=True, cancel_futures=True)
