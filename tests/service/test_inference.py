"""The inference engine: micro-batching, backpressure, the session LRU, conv padding and dense shape checks."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from dae.errors import InvalidImage, ModelNotFound, Overloaded
from dae.store import ModelStore
from service.inference import InferenceEngine
from tests.service.conftest import TinyModel, publish_tiny_model, run_onnx

RNG = np.random.default_rng(1)


def make_engine(store: ModelStore, **overrides) -> InferenceEngine:
    options = {"batch_timeout_ms": 50.0, "intra_op_threads": 1, **overrides}
    return InferenceEngine(store, **options)


def images(count: int, height: int = 8, width: int = 8) -> np.ndarray:
    return RNG.random((count, height, width, 1), dtype=np.float32)


def test_concurrent_requests_share_one_batch_and_get_their_own_rows(store, dense_card, tiny_models):
    engine = make_engine(store)
    inputs = [images(1) for _ in range(8)]

    async def scenario():
        model = await engine.model("dense-test")
        return await asyncio.gather(*(engine.run(model, batch) for batch in inputs))

    try:
        outputs = asyncio.run(scenario())
    finally:
        engine.close()
    assert list(engine.stats.recent_batch_sizes) == [8]
    expected = run_onnx(tiny_models["dense"].onnx_path, np.concatenate(inputs))
    for index, output in enumerate(outputs):
        assert output.shape == (1, 8, 8, 1)
        np.testing.assert_allclose(output[0], expected[index], atol=1e-6)
    assert engine.queued_images == 0


def test_a_batch_closes_at_its_max_size_and_leftovers_wait_for_the_timeout(store, dense_card):
    engine = make_engine(store, batch_max_size=4, batch_timeout_ms=200.0)

    async def scenario():
        model = await engine.model(dense_card.id)
        started = time.perf_counter()
        await asyncio.gather(*(engine.run(model, images(1)) for _ in range(10)))
        return time.perf_counter() - started

    try:
        elapsed = asyncio.run(scenario())
    finally:
        engine.close()
    assert list(engine.stats.recent_batch_sizes) == [4, 4, 2]
    assert elapsed >= 0.18  # the last two waited for the batch window


def test_a_request_larger_than_the_max_size_runs_as_one_batch(store, dense_card):
    engine = make_engine(store, batch_max_size=4)
    try:
        output = asyncio.run(_run_once(engine, dense_card.id, images(10)))
    finally:
        engine.close()
    assert output.shape == (10, 8, 8, 1)
    assert list(engine.stats.recent_batch_sizes) == [10]


async def _run_once(engine: InferenceEngine, ref: str, batch: np.ndarray) -> np.ndarray:
    return await engine.run(await engine.model(ref), batch)


def test_images_of_different_sizes_are_not_batched_together(store, conv_card):
    engine = make_engine(store)

    async def scenario():
        model = await engine.model("conv-test")
        return await asyncio.gather(
            engine.run(model, images(1, 8, 8)), engine.run(model, images(1, 12, 12)), engine.run(model, images(1, 8, 8))
        )

    try:
        outputs = asyncio.run(scenario())
    finally:
        engine.close()
    assert [output.shape[1:3] for output in outputs] == [(8, 8), (12, 12), (8, 8)]
    assert sorted(engine.stats.recent_batch_sizes) == [1, 2]


def test_a_full_queue_raises_overloaded_until_it_drains(store, dense_card):
    engine = make_engine(store, queue_bound=3, batch_timeout_ms=0.0)
    gate = threading.Event()

    async def scenario():
        model = await engine.model(dense_card.id)
        engine.executor.submit(gate.wait)  # the only worker is busy: batches wait
        waiting = asyncio.create_task(engine.run(model, images(2)))
        await asyncio.sleep(0.05)
        assert engine.queued_images == 2
        with pytest.raises(Overloaded, match="at most 3 images waiting"):
            await engine.run(model, images(2))
        gate.set()
        first = await waiting
        second = await engine.run(model, images(2))  # room again
        return first, second

    try:
        first, second = asyncio.run(scenario())
    finally:
        gate.set()
        engine.close()
    assert first.shape == second.shape == (2, 8, 8, 1)
    assert engine.queued_images == 0


def test_conv_inputs_are_reflect_padded_to_the_downsampling_factor_and_cropped_back(store, conv_card, tiny_models):
    engine = make_engine(store)
    odd = images(2, 7, 9)
    try:
        output = asyncio.run(_run_once(engine, conv_card.id, odd))
        tiny = asyncio.run(_run_once(engine, conv_card.id, images(1, 1, 1)))
    finally:
        engine.close()
    assert output.shape == (2, 7, 9, 1)
    padded = np.pad(odd, ((0, 0), (0, 1), (0, 3), (0, 0)), mode="reflect")  # 8 x 12: multiples of 4
    expected = run_onnx(tiny_models["conv"].onnx_path, padded)[:, :7, :9, :]
    np.testing.assert_allclose(output, expected, atol=1e-6)
    assert tiny.shape == (1, 1, 1, 1)
    assert 0.0 <= output.min() and output.max() <= 1.0


def test_dense_models_need_their_training_size(store, dense_card):
    engine = make_engine(store)
    try:
        with pytest.raises(InvalidImage, match=r"Expected 8x8x1\. Received: 9x9"):
            asyncio.run(_run_once(engine, dense_card.id, images(1, 9, 9)))
    finally:
        engine.close()


def test_session_cache_evicts_least_recently_used_by_count(store, tiny_models: dict[str, TinyModel]):
    cards = [publish_tiny_model(store, tiny_models["dense"], f"lru-{index}") for index in range(3)]
    engine = make_engine(store, cache_size=2)

    async def scenario():
        await engine.model(cards[0].id)
        await engine.model(cards[1].id)
        await engine.model(cards[0].id)  # 0 is now the most recently used
        await engine.model(cards[2].id)  # evicts 1
        assert engine.cache.model_ids() == [cards[0].id, cards[2].id]
        await engine.model(cards[1].id)  # reloaded on demand, evicts 0
        assert engine.cache.model_ids() == [cards[2].id, cards[1].id]

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.stats.loads == 4
    assert engine.cache.evictions == 2


def test_session_cache_evicts_by_estimated_memory(store, tiny_models: dict[str, TinyModel]):
    cards = [publish_tiny_model(store, tiny_models["dense"], f"mem-{index}") for index in range(2)]
    probe = make_engine(store)
    try:
        one_model_bytes = asyncio.run(probe.model(cards[0].id)).memory_bytes
    finally:
        probe.close()
    engine = make_engine(store, cache_size=10, memory_budget_mib=1.5 * one_model_bytes / 2**20)

    async def scenario():
        await engine.model(cards[0].id)
        await engine.model(cards[1].id)

    try:
        asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.cache.model_ids() == [cards[1].id]
    assert engine.cache.total_bytes == one_model_bytes


def test_concurrent_first_requests_load_a_model_once(store, dense_card):
    engine = make_engine(store)

    async def scenario():
        return await asyncio.gather(*(engine.model(ref) for ref in ["dense-test", dense_card.id, "dense-test:1"] * 3))

    try:
        models = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.stats.loads == 1
    assert len({id(model) for model in models}) == 1
    assert models[0].load_seconds < 0.5  # the cold-path budget of one load (plus warm-up run)


def test_a_deleted_model_stops_serving_even_if_cached(store, dense_card):
    engine = make_engine(store)
    try:
        asyncio.run(engine.model(dense_card.id))
        store.delete_model(dense_card.id)
        with pytest.raises(ModelNotFound):
            asyncio.run(engine.model(dense_card.id))
    finally:
        engine.close()


def test_error_maps_come_with_each_callers_rows_and_padded_sizes_are_measured_unpadded(store, dense_card, conv_card):
    """denoise(): each caller's maps are |its images − its outputs| (channel mean) with matching statistics,
    in a shared batch (dense) and for a padded conv size, where the padding must not enter the statistics."""
    engine = make_engine(store)
    dense_inputs = [images(count) for count in (1, 3, 2)]
    odd = images(2, 7, 9)

    async def scenario():
        dense, conv = await engine.model(dense_card.id), await engine.model(conv_card.id)
        shared = await asyncio.gather(*(engine.denoise(dense, batch) for batch in dense_inputs))
        return shared, await engine.denoise(conv, odd)

    try:
        shared, padded = asyncio.run(scenario())
    finally:
        engine.close()
    assert engine.stats.batches == 2  # the three dense callers shared one batch
    for inputs, denoised in [*zip(dense_inputs, shared, strict=True), (odd, padded)]:
        expected = np.abs(inputs - denoised.outputs).mean(axis=-1)
        assert denoised.errors.maps.shape == inputs.shape[:3]
        np.testing.assert_allclose(denoised.errors.maps, expected, atol=1e-7)
        flat = expected.reshape(len(expected), -1)
        np.testing.assert_allclose(denoised.errors.means, flat.mean(axis=1), rtol=1e-5)
        np.testing.assert_allclose(denoised.errors.maxima, flat.max(axis=1), rtol=1e-6)
        np.testing.assert_allclose(denoised.errors.p99s, np.percentile(flat, 99, axis=1), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("limit, expected_thread", [(10**9, "event loop"), (0, "worker")])
def test_small_batches_are_measured_on_the_loop_and_large_ones_in_the_worker_with_the_same_results(
    store, dense_card, tiny_models, monkeypatch, limit, expected_thread
):
    """Where a batch's outputs are clipped and measured depends on its size (LOOP_POSTPROCESS_MAX_VALUES); the
    results must not: outputs = onnxruntime's clipped to [0, 1], maps |input − output|, and on_batch sees the run."""
    import service.inference as inference_module  # noqa: PLC0415

    threads: list[str] = []
    postprocess = inference_module._postprocess

    def recording_postprocess(inputs, outputs):
        threads.append("event loop" if threading.current_thread() is threading.main_thread() else "worker")
        return postprocess(inputs, outputs)

    monkeypatch.setattr(inference_module, "LOOP_POSTPROCESS_MAX_VALUES", limit)
    monkeypatch.setattr(inference_module, "_postprocess", recording_postprocess)
    observed: list[tuple[int, float]] = []
    engine = make_engine(store, on_batch=lambda size, seconds: observed.append((size, seconds)))
    batch = images(5) * 1.5 - 0.25  # outside [0, 1] too: the model's raw outputs may need clipping

    async def scenario():
        return await engine.denoise(await engine.model(dense_card.id), batch)

    try:
        denoised = asyncio.run(scenario())
    finally:
        engine.close()
    assert threads == [expected_thread]
    assert [size for size, _ in observed] == [5] and observed[0][1] > 0
    expected = np.clip(run_onnx(tiny_models["dense"].onnx_path, batch), 0.0, 1.0)
    np.testing.assert_allclose(denoised.outputs, expected, atol=1e-6)
    np.testing.assert_allclose(denoised.errors.maps, np.abs(batch - denoised.outputs).mean(axis=-1), atol=1e-6)
