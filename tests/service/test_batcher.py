"""The micro-batcher knows nothing of images: any payload, a batch function, limits."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import service.inference.batcher as batcher_module
from service.inference.batcher import MicroBatcher


def test_it_imports_nothing_of_the_gateway():
    tree = ast.parse(Path(batcher_module.__file__).read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not {name for name in imported if name and (name.startswith("service") or name.startswith("dae"))}


def test_callers_of_one_key_share_a_batch_and_get_their_own_share():
    runs: list[tuple[str, list[str]]] = []

    def run(context: str, payloads: list[str]) -> list[str]:
        runs.append((context, payloads))
        return [f"{context}:{payload.upper()}" for payload in payloads]

    batcher: MicroBatcher[str, list[str], str] = MicroBatcher(
        run, lambda result, _payloads: result, max_size=3, max_values=100, timeout_s=0.05, queue_max_values=100)

    async def scenario() -> list[str]:
        futures = []
        for word in ("a", "b", "c", "d"):
            assert batcher.try_reserve(1, 1)
            futures.append(batcher.submit("words", "ctx", word, 1, 1))
        return list(await asyncio.gather(*futures))

    try:
        answers = asyncio.run(scenario())
    finally:
        batcher.close()
    assert answers == ["ctx:A", "ctx:B", "ctx:C", "ctx:D"]
    assert [payloads for _, payloads in runs] == [["a", "b", "c"], ["d"]]  # full at 3, then the timeout
    assert list(batcher.stats.recent_batch_sizes) == [3, 1] and batcher.queued_values == 0


def test_the_queue_bound_counts_values_and_a_failed_batch_fails_its_callers():
    def run(_context: None, _payloads: list[int]) -> list[int]:
        raise RuntimeError("the batch function failed")

    batcher: MicroBatcher[int, list[int], int] = MicroBatcher(
        run, lambda result, _payloads: result, max_size=8, max_values=8, timeout_s=0.0, queue_max_values=10)

    async def scenario() -> str:
        assert batcher.try_reserve(1, 6)
        assert not batcher.try_reserve(1, 5)  # 11 > 10: refused, nothing counted
        future = batcher.submit("k", None, 1, 1, 6)
        try:
            await future
        except RuntimeError as error:
            return str(error)
        return "no error"

    try:
        assert asyncio.run(scenario()) == "the batch function failed"
    finally:
        batcher.close()
    assert batcher.queued_values == 0 and batcher.queued_size == 0
