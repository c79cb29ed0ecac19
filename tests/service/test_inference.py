"""The inference engine: micro-batching, backpressure, the session LRU, conv padding and dense shape checks."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from core.store import ModelStore
from dae.errors import InvalidImage, ModelNotFound, Overloaded, PayloadTooLarge
from service.inference.engine import InferenceEngine
from tests.service.tiny_models import TinyModel, publish_tiny_model, run_onnx

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


def test_a_request_larger_than_the_max_size_runs_in_micro_batch_pieces(store, dense_card, tiny_models):
    engine = make_engine(store, batch_max_size=4)
    batch = images(10)
    try:
        output = asyncio.run(_run_once(engine, dense_card.id, batch))
    finally:
        engine.close()
    assert output.shape == (10, 8, 8, 1)
    assert list(engine.stats.recent_batch_sizes) == [4, 4, 2]
    np.testing.assert_allclose(output, run_onnx(tiny_models["dense"].onnx_path, batch), atol=1e-6)
    assert engine.queued_images == engine.queued_values == 0


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
    engine = make_engine(store, queue_max_values=3 * 64, batch_timeout_ms=0.0)  # three 8x8 images
    gate = threading.Event()

    async def scenario():
        model = await engine.model(dense_card.id)
        engine.executor.submit(gate.wait)  # the only worker is busy: batches wait
        waiting = asyncio.create_task(engine.run(model, images(2)))
        await asyncio.sleep(0.05)
        assert engine.queued_images == 2 and engine.queued_values == 128
        with pytest.raises(Overloaded, match=r"at most 192 pixel values waiting .*Received: 128 more with 128"):
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
    import service.inference.engine as inference_module  # noqa: PLC0415

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


# ---------------------------------------------------------------------------------------------
# Bounded memory: micro-batch pieces, the value bounds, the arena
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, height, width", [("dense", 8, 8), ("conv", 12, 16), ("conv", 7, 9)])
def test_micro_batch_pieces_give_exactly_what_one_whole_run_gives(store, tiny_models, kind, height, width):
    """The fast path (pieces) behaves like the ordinary one: a request cut into pieces of 3 images, or of 2
    images' values, returns the same outputs, error maps and statistics as one run of all 10."""
    card = publish_tiny_model(store, tiny_models[kind], f"{kind}-pieces")
    batch = images(10, height, width) * 1.4 - 0.2  # outside [0, 1] too: clipping happens per piece
    per_image = (height + (-height) % 4) * (width + (-width) % 4) if kind == "conv" else height * width
    results = {}
    for label, options in {"whole": {}, "3 images": {"batch_max_size": 3},
                           "2 images' values": {"batch_max_values": 2 * per_image}}.items():
        engine = make_engine(store, batch_timeout_ms=0.0, **options)

        async def scenario(engine=engine):
            model = await engine.model(card.id)
            return await engine.denoise_pieces(model, batch), await engine.denoise(model, batch)

        try:
            results[label] = asyncio.run(scenario())
        finally:
            engine.close()
        results[label] += (list(engine.stats.recent_batch_sizes),)
    whole_pieces, whole, sizes = results["whole"]
    assert len(whole_pieces) == 1 and sizes == [10, 10]
    assert [len(piece.outputs) for piece in results["3 images"][0]] == [3, 3, 3, 1]
    assert results["3 images"][2] == [3, 3, 3, 1] * 2
    assert results["2 images' values"][2] == [2] * 10
    for label in ("3 images", "2 images' values"):
        pieces, joined, _ = results[label]
        np.testing.assert_array_equal(joined.outputs, whole.outputs, err_msg=f"{label} outputs")
        for name in ("maps", "means", "maxima", "p99s"):
            np.testing.assert_array_equal(getattr(joined.errors, name), getattr(whole.errors, name), err_msg=label)
        np.testing.assert_array_equal(np.concatenate([piece.outputs for piece in pieces]), whole.outputs)
    assert whole.outputs.shape == (10, height, width, 1) and whole.outputs.flags.c_contiguous


def test_a_batch_closes_at_its_value_bound_exactly(store, dense_card):
    """batch_max_values = 3 images' values: three 1-image callers share a run, a fourth starts the next one."""
    engine = make_engine(store, batch_max_values=3 * 64, batch_timeout_ms=200.0)

    async def scenario():
        model = await engine.model(dense_card.id)
        started = time.perf_counter()
        await asyncio.gather(*(engine.run(model, images(1)) for _ in range(3)))
        full_batch_s = time.perf_counter() - started
        await asyncio.gather(*(engine.run(model, images(1)) for _ in range(4)))
        return full_batch_s

    try:
        full_batch_s = asyncio.run(scenario())
    finally:
        engine.close()
    assert list(engine.stats.recent_batch_sizes) == [3, 3, 1]
    assert full_batch_s < 0.15  # closed by its values, not by the 200 ms window


def test_an_image_larger_than_the_value_bound_runs_alone(store, conv_card):
    engine = make_engine(store, batch_max_values=100, batch_timeout_ms=0.0)  # one 16x16 image is 256 values
    try:
        output = asyncio.run(_run_once(engine, conv_card.id, images(3, 16, 16)))
    finally:
        engine.close()
    assert output.shape == (3, 16, 16, 1) and list(engine.stats.recent_batch_sizes) == [1, 1, 1]


def test_the_queue_bound_counts_values_at_its_boundary(store, dense_card):
    """queue_max_values = 4 images' values: 3 waiting + 1 fits exactly, + 2 is a 503, a 5-image request a 413."""
    engine = make_engine(store, queue_max_values=4 * 64, batch_timeout_ms=0.0)
    gate = threading.Event()

    async def scenario():
        model = await engine.model(dense_card.id)
        engine.executor.submit(gate.wait)  # the only worker is busy: everything waits
        waiting = [asyncio.create_task(engine.run(model, images(3)))]
        await asyncio.sleep(0.02)
        with pytest.raises(Overloaded, match=r"at most 256 pixel values waiting \(DAE_INFERENCE_QUEUE_MAX_VALUES\)"
                                             r".*Received: 128 more with 192 waiting"):
            await engine.run(model, images(2))
        waiting.append(asyncio.create_task(engine.run(model, images(1))))  # 192 + 64 = 256: at the bound
        await asyncio.sleep(0.02)
        assert engine.queued_values == 256 and engine.queued_images == 4
        gate.set()
        done = await asyncio.gather(*waiting)
        with pytest.raises(PayloadTooLarge, match=r"larger than the whole inference queue. Expected at most 256 pixel "
                                                  r"values \(DAE_INFERENCE_QUEUE_MAX_VALUES\). Received: 320"):
            await engine.run(model, images(5))
        return done

    try:
        done = asyncio.run(scenario())
    finally:
        gate.set()
        engine.close()
    assert [output.shape[0] for output in done] == [3, 1]
    assert engine.queued_values == engine.queued_images == 0


def test_the_queue_bound_counts_padded_values_and_is_released_by_cancelled_callers(store, conv_card):
    engine = make_engine(store, queue_max_values=10_000, batch_timeout_ms=0.0)
    gate = threading.Event()

    async def scenario():
        model = await engine.model(conv_card.id)
        engine.executor.submit(gate.wait)
        caller = asyncio.create_task(engine.run(model, images(2, 7, 9)))  # padded to 8 x 12: 2 x 96 values
        await asyncio.sleep(0.02)
        assert engine.queued_values == 192
        caller.cancel()
        await asyncio.sleep(0)
        gate.set()
        await asyncio.sleep(0.1)
        return engine.queued_values, engine.queued_images

    try:
        assert asyncio.run(scenario()) == (0, 0)
    finally:
        gate.set()
        engine.close()


def test_large_padding_and_cropping_happen_off_the_event_loop(store, conv_card, tiny_models, monkeypatch):
    import service.inference.engine as inference_module  # noqa: PLC0415

    threads: list[str] = []

    def recording(function):
        def wrapper(*args):
            try:
                asyncio.get_running_loop()
                threads.append(f"{function.__name__} on the loop")
            except RuntimeError:
                threads.append(f"{function.__name__} in a thread")
            return function(*args)
        return wrapper

    monkeypatch.setattr(inference_module, "_run_input", recording(inference_module._run_input))
    monkeypatch.setattr(inference_module, "_cropped_pieces", recording(inference_module._cropped_pieces))
    monkeypatch.setattr(inference_module, "LOOP_POSTPROCESS_MAX_VALUES", 1000)
    engine = make_engine(store, batch_timeout_ms=0.0)
    small, large = images(1, 7, 9), images(2, 31, 31)  # 96 and 2 x 1024 padded values
    try:
        small_out = asyncio.run(_run_once(engine, conv_card.id, small))
        large_out = asyncio.run(_run_once(engine, conv_card.id, large))
    finally:
        engine.close()
    assert threads == ["_run_input on the loop", "_cropped_pieces on the loop",
                       "_run_input in a thread", "_cropped_pieces in a thread"]
    padded = np.pad(large, ((0, 0), (0, 1), (0, 1), (0, 0)), mode="reflect")
    np.testing.assert_allclose(large_out, run_onnx(tiny_models["conv"].onnx_path, padded)[:, :31, :31], atol=1e-6)
    assert small_out.shape == (1, 7, 9, 1)


def test_sessions_run_without_the_memory_arena_and_the_defaults_agree_with_the_settings():
    """The arena would keep each session's largest run allocated (bench/README.md, 2026-12-02)."""
    import service.inference.engine as inference_module  # noqa: PLC0415
    from service.config import Settings  # noqa: PLC0415
    from service.inference.sessions import session_options  # noqa: PLC0415

    assert session_options(1).enable_cpu_mem_arena is False
    defaults = {name: field.default for name, field in Settings.model_fields.items()}  # not the environment's
    assert defaults["inference_batch_max_values"] == inference_module.DEFAULT_BATCH_MAX_VALUES
    assert defaults["inference_queue_max_values"] == inference_module.DEFAULT_QUEUE_MAX_VALUES
    assert defaults["inference_queue_max_values"] >= defaults["max_request_pixels"]  # the largest request fits


def test_the_removed_image_count_queue_bound_refuses_to_start(monkeypatch):
    from service.config import Settings  # noqa: PLC0415

    monkeypatch.setenv("DAE_INFERENCE_QUEUE_BOUND", "4096")
    with pytest.raises(ValueError, match="DAE_INFERENCE_QUEUE_BOUND counted images and was removed. Expected "
                                         "DAE_INFERENCE_QUEUE_MAX_VALUES"):
        Settings()
