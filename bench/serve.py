"""Serving speed of the gateway's POST /reconstruct against two baselines measured in the same run.

    .venv/bin/python -m bench.serve [--duration 5] [--levels 1,8,32,128] [--quick] [--generator auto|wrk|python]

What it does, on this machine, one server at a time:
1. Trains two small DAEs on Fashion-MNIST (1 epoch on a few thousand images, dae.training.fit_autoencoder) and
   publishes them with dae.publish.publish_training_result into a temporary model store: `bench-dense` (the
   default dense architecture, 28x28x1) and `bench-conv` (the default conv architecture).
2. Starts a redis-server and the real gateway (`uvicorn service.main:app`, one process, configured by DAE_*), then:
   - cold path: the first /reconstruct of each model (nothing loaded yet), and of fresh copies published later;
   - load: one noisy 28x28 test image as base64 PNG at each concurrency level, (1) with the full default response
     (denoised PNG, error map as JSON arrays, heatmap PNG, statistics), (2) compact (`error_format=f32&heatmap=false`:
     the denoised PNG, the error map as base64 float32, statistics: every number of (1) but the heatmap, in compact
     form) and (3) with the denoised image and its statistics only (`error_format=none&heatmap=false`, what the
     Keras baseline returns plus the error statistics); (1) also for the conv model and, dense, with the
     nested-list `pixels` input the Keras baseline gets;
   - batch: 256 images in one request as a base64 uint8 array (8-bit pixels, as images are), compact response
     (`format=f32&error_format=f32&heatmap=false`: denoised images and error maps as base64 float32), images/s;
     also with the images sent as base64 float32;
   - memory: resident set size of the gateway with 10 models loaded.
3. Baseline (a), bench/baselines/keras_app.py: FastAPI + Keras `model.predict` per request, nested-list JSON in
   and out, the same dense model (its model.keras).
4. Baseline (b), bench/baselines/constant_app.py: the same FastAPI/uvicorn stack answering a constant JSON body,
   swept like the gateway; then `--rounds` paired rounds at concurrency 32: each response variant's run directly
   followed by a ceiling run (both servers up, one loaded at a time). The ceiling share target is judged on the
   median of the per-round ratios, because the CPU this machine offers drifts within minutes.

Every server runs with the same uvicorn flags (one process, no access log) and is driven by the same load
generator (wrk if installed, else a Python asyncio client; see bench/harness.py). Prints one table per
scenario and a PASS/FAIL line per target of issue 6. The machine's load average is printed at start and end:
other work on the machine lowers every figure.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx
import numpy as np
from PIL import Image

from bench.harness import (
    LoadResult,
    UvicornServer,
    format_table,
    load_average,
    load_generator_name,
    run_load,
    verdict,
)
from bench.interference import StolenCpu
from dae.spec import ModelCard, NoiseSpec, TrainingSpec
from dae.store import ModelStore, new_model_id
from testing.redis_server import RedisServer

# Targets of issue 6.
TARGET_SPEEDUP_VS_KERAS = 50.0
TARGET_SHARE_OF_CEILING = 0.40
TARGET_P99_MS = 50.0
TARGET_BATCH_IMAGES_PER_S = 10_000.0
TARGET_COLD_MS = 500.0
TARGET_RSS_MIB = 400.0
HEADLINE_CONCURRENCY = 32

BATCH_IMAGES = 256
BATCH_QUERY = "format=f32&error_format=f32&heatmap=false"
LEAN_QUERY = "error_format=none&heatmap=false"
COMPACT_QUERY = "error_format=f32&heatmap=false"
KERAS_MIN_DURATION_S = 10.0
KERAS_TIMEOUT_S = 30.0
MODELS_FOR_MEMORY = 10
NOISE = NoiseSpec(type="gaussian", level=0.3)


@dataclass
class Bodies:
    """The request bodies, prepared once."""

    dense_png: bytes
    dense_pixels: bytes
    conv_png: bytes
    batch_u8: bytes
    batch_f32: bytes
    keras_pixels: bytes


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def train_models(store: ModelStore, train_images: int) -> tuple[ModelCard, ModelCard, np.ndarray]:
    """Train and publish bench-dense and bench-conv (1 epoch each); returns their cards and the test images."""
    from dae.data import load_dataset  # noqa: PLC0415
    from dae.publish import publish_training_result  # noqa: PLC0415
    from dae.training import fit_autoencoder  # noqa: PLC0415 - imports TensorFlow

    cards = []
    data = None
    for kind in ("dense", "conv"):
        spec = TrainingSpec.model_validate({
            "name": f"bench-{kind}", "dataset": "fashion_mnist", "architecture": {"type": kind}, "epochs": 1,
            "max_train_images": train_images, "noise": NOISE.model_dump(),
        })
        started = time.perf_counter()
        data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=train_images)
        result = fit_autoencoder(spec, data)
        card = publish_training_result(result, spec, store)
        print(f"  trained and published {card.name} ({card.parameters:,} parameters) in "
              f"{time.perf_counter() - started:.1f} s")
        cards.append(card)
    return cards[0], cards[1], data.test


def publish_copy(store: ModelStore, source: ModelCard, name: str) -> ModelCard:
    """Publish the artifacts of `source` again under a new id and name (a distinct model for the gateway)."""
    staging = store.staging_dir()
    source_dir = store.models_dir / source.id
    for artifact in ("model.onnx", "history.png", "samples.png"):
        shutil.copyfile(source_dir / artifact, staging / artifact)
    card = source.model_copy(update={
        "id": new_model_id(), "name": name, "version": store.reserve_version(name), "created_at": datetime.now(UTC),
    })
    return store.publish_model(staging, card)


# ---------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------


def png_base64(image: np.ndarray) -> str:
    """An (H, W, 1) float image in [0, 1] as base64 8-bit PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.rint(image[..., 0] * 255).astype(np.uint8)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_bodies(test_images: np.ndarray, dense: ModelCard, conv: ModelCard) -> Bodies:
    """Noisy test images (gaussian 0.3, clipped, quantized to 8 bits like a real picture) in every request form."""
    from dae.noise import add_noise  # noqa: PLC0415

    noisy = add_noise(test_images[: max(BATCH_IMAGES, 1)], NOISE, seed=[0, 1])
    noisy = np.rint(noisy * 255) / 255
    single = noisy[0]
    pixels = [[float(value) for value in row] for row in single[..., 0].astype(np.float64)]
    batch = np.ascontiguousarray(noisy[:BATCH_IMAGES], dtype="<f4")
    batch_u8 = np.rint(batch * 255).astype(np.uint8)
    return Bodies(
        dense_png=json.dumps({"model": dense.name, "image": png_base64(single)}).encode(),
        dense_pixels=json.dumps({"model": dense.name, "pixels": pixels}).encode(),
        conv_png=json.dumps({"model": conv.name, "image": png_base64(single)}).encode(),
        batch_u8=json.dumps({"model": dense.name, "array": {
            "data": base64.b64encode(batch_u8.tobytes()).decode(), "shape": list(batch.shape), "dtype": "uint8",
        }}).encode(),
        batch_f32=json.dumps({"model": dense.name, "array": {
            "data": base64.b64encode(batch.tobytes()).decode(), "shape": list(batch.shape), "dtype": "float32",
        }}).encode(),
        keras_pixels=json.dumps({"pixels": pixels}).encode(),
    )


def check_answer(url: str, body: bytes) -> None:
    """One request that must succeed (a benchmark of error answers would be worthless)."""
    response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text[:500]}")


def timed_first_request(base_url: str, body: bytes) -> float:
    """Milliseconds of one /reconstruct on an open keep-alive connection (the connection set-up is not timed)."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        client.get("/healthz")
        started = time.perf_counter()
        response = client.post("/reconstruct", content=body, headers={"content-type": "application/json"})
        elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"cold /reconstruct answered {response.status_code}: {response.text[:500]}")
    return elapsed


# ---------------------------------------------------------------------------------------------
# Runs
# ---------------------------------------------------------------------------------------------


def sweep(url: str, body: bytes, label: str, levels: list[int], duration_s: float, generator: str,
          warm_up_s: float, timeout_s: float = 10.0) -> list[LoadResult]:
    """A short warm-up, then one load run per concurrency level."""
    if warm_up_s > 0:
        run_load(url, body, concurrency=min(8, max(levels)), duration_s=warm_up_s, label="warm-up",
                 generator=generator, timeout_s=timeout_s)
    results = []
    for level in levels:
        stolen = StolenCpu()
        result = run_load(url, body, concurrency=level, duration_s=duration_s, label=label, generator=generator,
                          timeout_s=timeout_s)
        print(f"  {label:<32} c={level:<4} {result.rps:9.1f} req/s  p50 {result.p50_ms:8.2f} ms  "
              f"p99 {result.p99_ms:8.2f} ms  errors {result.errors}  (stolen {stolen.fraction():.0%})", flush=True)
        results.append(result)
    return results


def result_rows(results: list[LoadResult], images_per_request: int = 1) -> list[list[str]]:
    """Table rows of load runs."""
    rows = []
    for result in results:
        row = [result.label, str(result.concurrency), f"{result.rps:,.1f}", f"{result.p50_ms:.2f}",
               f"{result.p95_ms:.2f}", f"{result.p99_ms:.2f}", f"{result.errors}"]
        if images_per_request > 1:
            row.append(f"{result.rps * images_per_request:,.0f}")
        rows.append(row)
    return rows


def at_level(results: list[LoadResult], level: int) -> LoadResult | None:
    """The run at `level`, if measured."""
    return next((result for result in results if result.concurrency == level), None)


def main() -> int:
    """Build, serve, measure, compare; print the tables and the verdicts."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load level (default 5)")
    parser.add_argument("--levels", default="1,8,32,128", help="concurrency levels (default 1,8,32,128)")
    parser.add_argument("--quick", action="store_true", help="2 s per level, levels 1 and 32, smaller training")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator (default: wrk when installed)")
    parser.add_argument("--train-images", type=int, default=3000, help="training images per model (default 3000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired gateway/ceiling rounds at c=32 for the headline ratios (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (store, logs)")
    arguments = parser.parse_args()
    levels = [int(level) for level in arguments.levels.split(",")]
    duration = arguments.duration
    warm_up = 1.0
    if arguments.quick:
        duration, levels, warm_up = 2.0, [1, HEADLINE_CONCURRENCY], 0.5
        arguments.rounds = min(arguments.rounds, 2)
        arguments.train_images = min(arguments.train_images, 1000)
    generator = load_generator_name(arguments.generator)
    if HEADLINE_CONCURRENCY not in levels:
        levels = sorted({*levels, HEADLINE_CONCURRENCY})

    workdir = Path(tempfile.mkdtemp(prefix="dae-bench-serve-"))
    print(f"bench/serve.py: load generator {generator}, {duration:g} s per level, levels {levels}")
    print(f"load average at start: {load_average()}")
    whole_run = StolenCpu()
    print(f"work directory: {workdir}")
    redis_server = RedisServer(workdir / "redis")
    try:
        return run(arguments, workdir, redis_server.url, levels, duration, warm_up, generator)
    finally:
        print(f"CPU stolen by the host (other virtual machines) during the run: {whole_run.fraction():.0%} of the "
              "cores' time; figures from runs with much steal are not comparable with quiet ones")
        redis_server.stop()
        if not arguments.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def run(arguments: argparse.Namespace, workdir: Path, redis_url: str, levels: list[int], duration: float,
        warm_up: float, generator: str) -> int:
    """The measurements (see the module docstring)."""
    store = ModelStore(workdir / "store")
    print("\n== building models")
    dense, conv, test_images = train_models(store, arguments.train_images)
    bodies = make_bodies(test_images, dense, conv)
    copies = [publish_copy(store, dense if index % 2 == 0 else conv, f"bench-copy-{index}")
              for index in range(MODELS_FOR_MEMORY - 2)]

    # -- the gateway --------------------------------------------------------------------------------
    print("\n== gateway (uvicorn service.main:app)")
    gateway_env = {"DAE_REDIS_URL": redis_url, "DAE_STORE_DIR": str(store.root)}
    with UvicornServer("service.main:app", env=gateway_env, log_path=workdir / "gateway.log") as gateway:
        endpoint = gateway.url + "/reconstruct"
        lean = f"{endpoint}?{LEAN_QUERY}"
        cold_ms = {"bench-dense (first request of the process)": timed_first_request(gateway.url, bodies.dense_png),
                   "bench-conv": timed_first_request(gateway.url, bodies.conv_png)}
        check_answer(endpoint, bodies.dense_pixels)
        check_answer(f"{endpoint}?{BATCH_QUERY}", bodies.batch_u8)
        full = sweep(endpoint, bodies.dense_png, "gateway dense PNG, full", levels, duration, generator, warm_up)
        compact = sweep(f"{endpoint}?{COMPACT_QUERY}", bodies.dense_png, "gateway dense PNG, compact", levels,
                        duration, generator, warm_up)
        image_only = sweep(lean, bodies.dense_png, "gateway dense PNG, image+stats", levels, duration, generator,
                           warm_up)
        pixels = sweep(endpoint, bodies.dense_pixels, "gateway dense pixels, full", [HEADLINE_CONCURRENCY],
                       duration, generator, warm_up)
        conv_full = sweep(endpoint, bodies.conv_png, "gateway conv PNG, full", levels, duration, generator, warm_up)
        batch_levels = [1, 2] if arguments.quick else [1, 2, 4]
        batch = sweep(f"{endpoint}?{BATCH_QUERY}", bodies.batch_u8, f"batch {BATCH_IMAGES}, uint8 in", batch_levels,
                      duration, generator, warm_up)
        batch += sweep(f"{endpoint}?{BATCH_QUERY}", bodies.batch_f32, f"batch {BATCH_IMAGES}, float32 in", [2],
                       duration, generator, 0)
        memory_before = gateway.memory_mib()
        for copy in copies:
            source = dense if copy.spec.architecture.type == "dense" else conv
            body = (bodies.dense_png if source is dense else bodies.conv_png).replace(
                f'"model": "{source.name}"'.encode(), f'"model": "{copy.name}"'.encode())
            cold_ms[copy.name] = timed_first_request(gateway.url, body)
        metrics_text = httpx.get(gateway.url + "/metrics", timeout=10).text
        sessions = next((int(float(line.split()[-1])) for line in metrics_text.splitlines()
                         if line.startswith("dae_inference_sessions ")), -1)
        rss_mib, peak_mib = gateway.memory_mib()

        # -- baseline (b), then gateway and ceiling in alternation --------------------------------------
        print("\n== baseline (b): constant JSON on the same stack")
        with UvicornServer("bench.baselines.constant_app:app", log_path=workdir / "constant.log") as constant:
            constant_url = constant.url + "/reconstruct"
            constant_results = sweep(constant_url, bodies.dense_png, "constant JSON", levels, duration, generator,
                                     warm_up)
            variants = {"full response": endpoint, "compact response": f"{endpoint}?{COMPACT_QUERY}",
                        "image+stats response": lean}
            paired = paired_rounds(gateway, variants, constant, constant_url, bodies.dense_png, arguments.rounds,
                                   duration, generator)
    print("\n== baseline (a): FastAPI + Keras model.predict, nested lists")
    keras_env = {"BENCH_KERAS_MODEL": str(store.artifact_path(dense.id, "model.keras"))}
    # Each predict takes tens of ms, so at high concurrency answers take seconds: longer runs, longer timeouts.
    keras_duration = max(duration, KERAS_MIN_DURATION_S)
    with UvicornServer("bench.baselines.keras_app:app", env=keras_env, log_path=workdir / "keras.log") as keras_app:
        check_answer(keras_app.url + "/reconstruct", bodies.keras_pixels)
        keras_results = sweep(keras_app.url + "/reconstruct", bodies.keras_pixels, "keras model.predict", levels,
                              keras_duration, generator, warm_up, timeout_s=KERAS_TIMEOUT_S)

    # -- report -------------------------------------------------------------------------------------
    print("\n" + "=" * 100)
    print(f"RESULTS  (load generator {generator}; {duration:g} s per level, Keras {keras_duration:g} s; "
          "one uvicorn process per server)")
    headers = ["scenario", "conc.", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    print(format_table(headers, result_rows(full + compact + image_only + pixels + conv_full + constant_results
                                            + keras_results)))
    print("full = default response (denoised PNG, error map JSON, heatmap PNG, stats); compact = "
          f"?{COMPACT_QUERY} (denoised PNG, error map base64 float32, stats); image+stats = ?{LEAN_QUERY}")
    print()
    print(format_table([*headers, "images/s"], result_rows(batch, BATCH_IMAGES)))
    print(f"batch: {BATCH_IMAGES} images (28x28) per request as a base64 array, response ?{BATCH_QUERY}")
    print("\ncold path (first /reconstruct of a model not loaded yet, ms): "
          + ", ".join(f"{name} {value:.0f}" for name, value in cold_ms.items()))
    print(f"gateway memory: RSS {rss_mib:.0f} MiB with {sessions} models loaded (peak {peak_mib:.0f} MiB; "
          f"{memory_before[0]:.0f} MiB with 2 loaded, after the load runs)")

    print("\nTARGETS (issue 6)")
    checks = []
    keras_headline = at_level(keras_results, HEADLINE_CONCURRENCY)
    constant_headline = at_level(constant_results, HEADLINE_CONCURRENCY)
    print(f"(the ceiling share is the median over {arguments.rounds} rounds in which the gateway and the constant "
          f"app ran back to back; the single sweep above gave "
          + ", ".join(f"{label} {at_level(results, HEADLINE_CONCURRENCY).rps / constant_headline.rps:.0%}"
                      for label, results in (("full", full), ("compact", compact), ("image+stats", image_only)))
          + ")")
    for label, rounds in paired.items():
        checks += headline_checks(label, rounds, keras_headline)
    batch_u8 = [result for result in batch if "uint8" in result.label]
    best_batch = max(batch_u8, key=lambda result: result.rps)
    batch_rate = best_batch.rps * BATCH_IMAGES
    checks.append((f"batch of {BATCH_IMAGES} (uint8 in), compact response: {batch_rate:,.0f} images/s "
                   f"(best of c={[result.concurrency for result in batch_u8]}: c={best_batch.concurrency}, "
                   f"{best_batch.errors} errors)", f">= {TARGET_BATCH_IMAGES_PER_S:,.0f}",
                   batch_rate >= TARGET_BATCH_IMAGES_PER_S and best_batch.errors == 0))
    worst_cold = max(cold_ms.values())
    checks.append((f"cold path: worst first /reconstruct {worst_cold:.0f} ms (median "
                   f"{statistics.median(cold_ms.values()):.0f} ms over {len(cold_ms)} models)",
                   f"<= {TARGET_COLD_MS:.0f} ms", worst_cold <= TARGET_COLD_MS))
    checks.append((f"gateway RSS with {sessions} models loaded: {rss_mib:.0f} MiB", f"<= {TARGET_RSS_MIB:.0f} MiB",
                   rss_mib <= TARGET_RSS_MIB and sessions >= MODELS_FOR_MEMORY))
    for description, target, passed in checks:
        print(f"  {verdict(passed)}  {description}  (target {target})")
    paired_runs = [pair.gateway for rounds in paired.values() for pair in rounds]
    all_errors = sum(result.errors for result in full + compact + image_only + pixels + conv_full + batch + paired_runs)
    print(f"\nall gateway runs: {all_errors} errors")
    print(f"load average at end: {load_average()}")
    return 0 if all(passed for _, _, passed in checks) else 1


@dataclass
class PairedRound:
    """One gateway run at the headline concurrency and the ceiling run right after it, with the CPU each server
    spent per answered request (its event-loop thread, and the whole process) during its run."""

    gateway: LoadResult
    ceiling: LoadResult
    gateway_loop_us: float
    gateway_process_us: float
    ceiling_loop_us: float

    @property
    def share(self) -> float:
        return self.gateway.rps / self.ceiling.rps if self.ceiling.rps > 0 else float("nan")

    @property
    def cpu_share(self) -> float:
        """Ceiling loop CPU per request / gateway loop CPU per request: the share each server's one event-loop
        thread allows, which CPU stolen by the host barely moves (time not running is not counted)."""
        return self.ceiling_loop_us / self.gateway_loop_us if self.gateway_loop_us > 0 else float("nan")


def measured_run(server: UvicornServer, url: str, body: bytes, label: str, duration_s: float,
                 generator: str) -> tuple[LoadResult, float, float]:
    """A load run at the headline concurrency and the server's (loop thread, process) CPU µs per request in it."""
    loop_before, process_before = server.cpu_seconds()
    result = run_load(url, body, concurrency=HEADLINE_CONCURRENCY, duration_s=duration_s, label=label,
                      generator=generator)
    loop_after, process_after = server.cpu_seconds()
    answered = max(result.requests, 1)
    return result, (loop_after - loop_before) / answered * 1e6, (process_after - process_before) / answered * 1e6


def paired_rounds(gateway: UvicornServer, variants: dict[str, str], constant: UvicornServer, constant_url: str,
                  body: bytes, rounds: int, duration_s: float, generator: str) -> dict[str, list[PairedRound]]:
    """At the headline concurrency, each variant's run directly followed by a run of the ceiling, `rounds` times.

    On a shared machine the available CPU drifts within minutes (the ceiling alone was measured anywhere from
    2,200 to 7,900 req/s on one machine in one afternoon, as other virtual machines took up to a third of the
    time); a ratio of two runs seconds apart is steadier than one of two sweeps minutes apart, and the CPU each
    server spends per request is steadier still.
    """
    print(f"\n== paired rounds at c={HEADLINE_CONCURRENCY}: each gateway run followed by a ceiling run")
    paired: dict[str, list[PairedRound]] = {label: [] for label in variants}
    stolen = StolenCpu()
    for round_index in range(rounds):
        for label, url in variants.items():
            stolen.start()
            gateway_run, loop_us, process_us = measured_run(gateway, url, body, label, duration_s, generator)
            ceiling_run, ceiling_loop_us, _ = measured_run(constant, constant_url, body, "constant JSON", duration_s,
                                                           generator)
            pair = PairedRound(gateway_run, ceiling_run, loop_us, process_us, ceiling_loop_us)
            paired[label].append(pair)
            print(f"  round {round_index + 1}: {label:<22} {gateway_run.rps:8.1f} req/s (p99 {gateway_run.p99_ms:6.2f} "
                  f"ms, errors {gateway_run.errors}) vs ceiling {ceiling_run.rps:8.1f}: {pair.share:4.0%};  loop CPU "
                  f"{loop_us:4.0f} vs {ceiling_loop_us:4.0f} µs/request: {pair.cpu_share:4.0%} (gateway process "
                  f"{process_us:4.0f} µs/request);  stolen by the host {stolen.fraction():.0%}", flush=True)
    return paired


def headline_checks(label: str, rounds: list[PairedRound], keras: LoadResult) -> list[tuple]:
    """(description, target, passed) of the four c=32 targets for one response variant, from its paired rounds
    (medians over the rounds; every round's figure is printed)."""
    gateway_rps = statistics.median(pair.gateway.rps for pair in rounds)
    shares = [pair.share for pair in rounds]
    share = statistics.median(shares)
    cpu_share = statistics.median(pair.cpu_share for pair in rounds)
    p99s = [pair.gateway.p99_ms for pair in rounds]
    p99 = statistics.median(p99s)
    errors = sum(pair.gateway.errors for pair in rounds)
    speedup = gateway_rps / keras.rps if keras.rps > 0 else float("nan")
    prefix = f"dense 28x28 c={HEADLINE_CONCURRENCY}, {label}:"
    keras_note = "" if keras.requests else " (the baseline completed no request: raise --duration)"
    return [
        (f"{prefix} {speedup:.0f}x the req/s of Keras model.predict ({gateway_rps:,.0f} vs {keras.rps:,.1f})"
         f"{keras_note}", f">= {TARGET_SPEEDUP_VS_KERAS:.0f}x", speedup >= TARGET_SPEEDUP_VS_KERAS),
        (f"{prefix} {share:.0%} of the constant-JSON ceiling (median of rounds: "
         + ", ".join(f"{value:.0%}" for value in shares) + f"; by event-loop CPU per request: {cpu_share:.0%})",
         f">= {TARGET_SHARE_OF_CEILING:.0%}", share >= TARGET_SHARE_OF_CEILING),
        (f"{prefix} p99 {p99:.1f} ms (median of rounds: " + ", ".join(f"{value:.1f}" for value in p99s) + ")",
         f"<= {TARGET_P99_MS:.0f} ms", p99 <= TARGET_P99_MS),
        (f"{prefix} {errors} errors", "0", errors == 0),
    ]


if __name__ == "__main__":
    sys.exit(main())
