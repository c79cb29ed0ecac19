"""Serving speed of the gateway's POST /reconstruct against three peers measured in the same run, and the
performance guard of issue 13.

    .venv/bin/python -m bench.serve [--duration 5] [--levels 1,8,32,128] [--quick] [--generator auto|wrk|python]
    .venv/bin/python -m bench.serve --guard [--rounds 3] [--duration 4]     # the guard alone (~2 min)

What it does, on this machine, one server loaded at a time:
1. Trains two small DAEs on Fashion-MNIST (1 epoch on a few thousand images, dae.training.fit_autoencoder) and
   publishes them with dae.publish.publish_training_result into a temporary model store: `bench-dense` (the
   default dense architecture, 28x28x1) and `bench-conv` (the default conv architecture; not with --guard).
2. Starts a redis-server and the real gateway (`uvicorn service.main:app`, one process, configured by DAE_*), then
   (not with --guard):
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
3. Baseline (b), bench/baselines/constant_app.py, "the ceiling": the same FastAPI/uvicorn stack answering a
   constant JSON body, swept like the gateway; then `--rounds` paired rounds at concurrency 32: each response
   variant's run directly followed by a ceiling run (not with --guard).
4. Baseline (a), bench/baselines/keras_app.py: FastAPI + Keras `model.predict` per request, nested-list JSON in
   and out, the same dense model (its model.keras); swept like the gateway (not with --guard).
5. Peer (c), bench/baselines/bentoml_service.py: BentoML (in its own virtual environment, installed on first use
   from bench/baselines/bentoml-requirements.txt; skipped with the reason when it cannot be installed) serving the
   same model.onnx with adaptive batching, doing the same work as the gateway's `?format=array&heatmap=false` with
   `pixels` in (both answers are compared before the runs).
6. The guard: `--rounds` rounds at concurrency 32 of the gateway's same-work run directly followed by BentoML's,
   the ceiling's and the Keras baseline's; every ratio is the median of the per-round ratios of successful answers
   per second, because the CPU this machine offers drifts within minutes. Then BentoML once more with a 20 ms
   latency target, to show what it sheds.

Our servers run with the same uvicorn flags (one process, no access log); every server is driven by the same load
generator (wrk if installed, else a Python asyncio client; see bench/harness.py). Prints one table per scenario,
then the guard: PASS/FAIL for >= 3x BentoML's successful answers/s with a lower p99 and >= 100x the Keras
baseline's, and the ceiling share. The machine's load average is printed at start and end, and the CPU other
processes took during the rounds: other work on the machine lowers every figure.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
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

from bench.baselines.bentoml_env import (
    REQUIREMENTS,
    BentoMLServer,
    BentoMLUnavailable,
    ensure_environment,
    onnx_threads,
    pins,
)
from bench.harness import (
    LoadResult,
    UvicornServer,
    format_table,
    load_average,
    load_generator_name,
    run_load,
    verdict,
)
from bench.interference import OtherProcessesCpu, StolenCpu
from core.store import ModelStore, new_model_id
from dae.spec import ModelCard, NoiseSpec, TrainingSpec
from testing.redis_server import RedisServer

# The performance guard of issue 13, at HEADLINE_CONCURRENCY on the dense 28x28 model, the same work on both sides.
GUARD_TIMES_BENTOML = 3.0
GUARD_TIMES_KERAS = 100.0
HEADLINE_CONCURRENCY = 32
#: The gateway's form of BentoML's work: `pixels` in; the denoised image (H×W×1) and the L1 error map (H×W) as JSON
#: arrays, with statistics, out. No query turns off format=array's base64 PNG of the denoised image: the gateway
#: encodes that one more thing.
SAME_WORK_QUERY = "format=array&error_format=json&heatmap=false"
#: BentoML's adaptive batching: at most the gateway's micro-batch; a 2 s target queues at c=32 (see the README).
BENTOML_MAX_BATCH_SIZE = 64
BENTOML_QUEUEING_LATENCY_MS = 2000
BENTOML_TARGET_LATENCY_MS = 20
BENTOML_LABEL = "BentoML"
KERAS_LABEL = "Keras model.predict"
CEILING_LABEL = "constant JSON"

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
    bentoml_pixels: bytes  # a batchable BentoML API takes a batch per request: the same image as a list of one


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def train_models(store: ModelStore, train_images: int,
                 with_conv: bool = True) -> tuple[ModelCard, ModelCard | None, np.ndarray]:
    """Train and publish bench-dense and bench-conv (1 epoch each; the conv one only `with_conv`); returns their
    cards (None for a conv model not trained) and the test images."""
    from dae.data import load_dataset  # noqa: PLC0415
    from dae.publish import publish_training_result  # noqa: PLC0415
    from dae.training import fit_autoencoder  # noqa: PLC0415 - imports TensorFlow

    cards = []
    data = None
    for kind in ("dense", "conv") if with_conv else ("dense",):
        spec = TrainingSpec.model_validate({
            "name": f"bench-{kind}", "dataset": "fashion_mnist", "architecture": {"type": kind}, "epochs": 1,
            "max_train_images": train_images, "noise": NOISE.model_dump(),
        })
        started = time.perf_counter()
        data = load_dataset(spec.dataset, seed=spec.seed, max_train_images=train_images)
        result = fit_autoencoder(spec, data)
        card = publish_training_result(result, spec, store, model_id=new_model_id())
        print(f"  trained and published {card.name} ({card.parameters:,} parameters) in "
              f"{time.perf_counter() - started:.1f} s")
        cards.append(card)
    if data is None:
        raise RuntimeError("no model was trained")
    return cards[0], cards[1] if with_conv else None, data.test


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


def make_bodies(test_images: np.ndarray, dense: ModelCard, conv: ModelCard | None) -> Bodies:
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
        conv_png=json.dumps({"model": conv.name, "image": png_base64(single)}).encode() if conv else b"",
        batch_u8=json.dumps({"model": dense.name, "array": {
            "data": base64.b64encode(batch_u8.tobytes()).decode(), "shape": list(batch.shape), "dtype": "uint8",
        }}).encode(),
        batch_f32=json.dumps({"model": dense.name, "array": {
            "data": base64.b64encode(batch.tobytes()).decode(), "shape": list(batch.shape), "dtype": "float32",
        }}).encode(),
        keras_pixels=json.dumps({"pixels": pixels}).encode(),
        bentoml_pixels=json.dumps({"pixels": [pixels]}).encode(),
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
    parser.add_argument("--guard", action="store_true",
                        help="only the performance guard: the dense model at c=32 against BentoML, the Keras "
                             "baseline and the ceiling (no sweeps, batch, cold path or memory)")
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto",
                        help="load generator (default: wrk when installed)")
    parser.add_argument("--train-images", type=int, default=3000, help="training images per model (default 3000)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="paired rounds at c=32 for the headline ratios (default 5)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (store, logs)")
    arguments = parser.parse_args()
    levels = [int(level) for level in arguments.levels.split(",")]
    duration = arguments.duration
    warm_up = 1.0
    if arguments.quick:
        duration, levels, warm_up = 2.0, [1, HEADLINE_CONCURRENCY], 0.5
        arguments.rounds = min(arguments.rounds, 2)
        arguments.train_images = min(arguments.train_images, 1000)
    if arguments.guard:
        levels = [HEADLINE_CONCURRENCY]
    generator = load_generator_name(arguments.generator)
    if HEADLINE_CONCURRENCY not in levels:
        levels = sorted({*levels, HEADLINE_CONCURRENCY})

    workdir = Path(tempfile.mkdtemp(prefix="dae-bench-serve-"))
    print(f"bench/serve.py: load generator {generator}, {duration:g} s per level, levels {levels}"
          + (", guard only" if arguments.guard else ""))
    print(f"load average at start: {load_average()}")
    whole_run = StolenCpu()
    print(f"work directory: {workdir}")
    bentoml = bentoml_environment(workdir)
    redis_server = RedisServer(workdir / "redis")
    try:
        return run(arguments, workdir, redis_server.url, levels, duration, warm_up, generator, bentoml)
    finally:
        print(f"CPU stolen by the host (other virtual machines) during the run: {whole_run.fraction():.0%} of the "
              "cores' time; figures from runs with much steal are not comparable with quiet ones")
        redis_server.stop()
        if not arguments.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def bentoml_environment(workdir: Path) -> Path | str:
    """The BentoML peer's virtual environment (installed on first use, cached), or why it cannot be had."""
    started = time.perf_counter()
    try:
        venv = ensure_environment(workdir / "bentoml-install.log")
    except BentoMLUnavailable as error:
        print(f"BentoML peer SKIPPED: its environment could not be installed ({error})")
        return str(error)
    print(f"BentoML peer: {', '.join(f'{name}=={version}' for name, version in sorted(pins(REQUIREMENTS).items()))} "
          f"in {venv} ({time.perf_counter() - started:.1f} s to install or find)")
    return venv


@dataclass
class Scenarios:
    """What the full run measures on the gateway besides the guard."""

    sweeps: list[LoadResult]
    batch: list[LoadResult]
    cold_ms: dict[str, float]
    sessions: int
    rss_mib: float
    peak_mib: float
    rss_two_models_mib: float


def gateway_scenarios(gateway: UvicornServer, store: ModelStore, dense: ModelCard, conv: ModelCard, bodies: Bodies,
                      levels: list[int], duration: float, warm_up: float, generator: str,
                      quick: bool) -> Scenarios:
    """The sweeps of every response variant, the batch, the cold path and memory (see the module docstring)."""
    copies = [publish_copy(store, dense if index % 2 == 0 else conv, f"bench-copy-{index}")
              for index in range(MODELS_FOR_MEMORY - 2)]
    endpoint = gateway.url + "/reconstruct"
    cold_ms = {"bench-dense (first request of the process)": timed_first_request(gateway.url, bodies.dense_png),
               "bench-conv": timed_first_request(gateway.url, bodies.conv_png)}
    check_answer(f"{endpoint}?{BATCH_QUERY}", bodies.batch_u8)
    sweeps = sweep(endpoint, bodies.dense_png, "gateway dense PNG, full", levels, duration, generator, warm_up)
    sweeps += sweep(f"{endpoint}?{COMPACT_QUERY}", bodies.dense_png, "gateway dense PNG, compact", levels, duration,
                    generator, warm_up)
    sweeps += sweep(f"{endpoint}?{LEAN_QUERY}", bodies.dense_png, "gateway dense PNG, image+stats", levels, duration,
                    generator, warm_up)
    sweeps += sweep(endpoint, bodies.dense_pixels, "gateway dense pixels, full", [HEADLINE_CONCURRENCY], duration,
                    generator, warm_up)
    sweeps += sweep(endpoint, bodies.conv_png, "gateway conv PNG, full", levels, duration, generator, warm_up)
    batch_levels = [1, 2] if quick else [1, 2, 4]
    batch = sweep(f"{endpoint}?{BATCH_QUERY}", bodies.batch_u8, f"batch {BATCH_IMAGES}, uint8 in", batch_levels,
                  duration, generator, warm_up)
    batch += sweep(f"{endpoint}?{BATCH_QUERY}", bodies.batch_f32, f"batch {BATCH_IMAGES}, float32 in", [2],
                   duration, generator, 0)
    rss_two_models, _ = gateway.memory_mib()
    for copy in copies:
        source = dense if copy.spec.architecture.type == "dense" else conv
        body = (bodies.dense_png if source is dense else bodies.conv_png).replace(
            f'"model": "{source.name}"'.encode(), f'"model": "{copy.name}"'.encode())
        cold_ms[copy.name] = timed_first_request(gateway.url, body)
    metrics_text = httpx.get(gateway.url + "/metrics", timeout=10).text
    sessions = next((int(float(line.split()[-1])) for line in metrics_text.splitlines()
                     if line.startswith("dae_inference_sessions ")), -1)
    rss_mib, peak_mib = gateway.memory_mib()
    return Scenarios(sweeps, batch, cold_ms, sessions, rss_mib, peak_mib, rss_two_models)


def run(arguments: argparse.Namespace, workdir: Path, redis_url: str, levels: list[int], duration: float,
        warm_up: float, generator: str, bentoml: Path | str) -> int:
    """The measurements (see the module docstring)."""
    store = ModelStore(workdir / "store")
    print("\n== building models")
    dense, conv, test_images = train_models(store, arguments.train_images, with_conv=not arguments.guard)
    bodies = make_bodies(test_images, dense, conv)
    # Each predict takes tens of ms, so at high concurrency answers take seconds: longer runs, longer timeouts.
    keras_duration = max(duration, KERAS_MIN_DURATION_S)
    scenarios: Scenarios | None = None
    paired: dict[str, list[PairedRound]] = {}
    shedding: LoadResult | None = None
    with contextlib.ExitStack() as servers:
        print("\n== gateway (uvicorn service.main:app)")
        gateway_env = {"DAE_REDIS_URL": redis_url, "DAE_STORE_DIR": str(store.root)}
        gateway = servers.enter_context(UvicornServer("service.main:app", env=gateway_env,
                                                      log_path=workdir / "gateway.log"))
        endpoint = gateway.url + "/reconstruct"
        same_work = f"{endpoint}?{SAME_WORK_QUERY}"
        check_answer(same_work, bodies.dense_pixels)
        if conv is not None:
            scenarios = gateway_scenarios(gateway, store, dense, conv, bodies, levels, duration, warm_up, generator,
                                          arguments.quick)

        print("\n== baseline (b): constant JSON on the same stack")
        constant = servers.enter_context(UvicornServer("bench.baselines.constant_app:app",
                                                       log_path=workdir / "constant.log"))
        constant_url = constant.url + "/reconstruct"
        constant_results = [] if scenarios is None else sweep(constant_url, bodies.dense_png, "constant JSON", levels,
                                                              duration, generator, warm_up)
        if scenarios is not None:
            variants = {"full response": endpoint, "compact response": f"{endpoint}?{COMPACT_QUERY}",
                        "image+stats response": f"{endpoint}?{LEAN_QUERY}"}
            paired = paired_rounds(gateway, variants, constant, constant_url, bodies.dense_png, arguments.rounds,
                                   duration, generator)

        print("\n== baseline (a): FastAPI + Keras model.predict, nested lists")
        keras_env = {"BENCH_KERAS_MODEL": str(store.artifact_path(dense.id, "model.keras"))}
        keras_app = servers.enter_context(UvicornServer("bench.baselines.keras_app:app", env=keras_env,
                                                        log_path=workdir / "keras.log"))
        keras_url = keras_app.url + "/reconstruct"
        check_answer(keras_url, bodies.keras_pixels)
        keras_results = [] if scenarios is None else sweep(
            keras_url, bodies.keras_pixels, "keras model.predict", levels, keras_duration, generator, warm_up,
            timeout_s=KERAS_TIMEOUT_S)

        targets = [Target(CEILING_LABEL, constant_url, bodies.dense_pixels, duration),
                   Target(KERAS_LABEL, keras_url, bodies.keras_pixels, keras_duration, KERAS_TIMEOUT_S)]
        peer: BentoMLServer | None = None
        onnx_path = store.artifact_path(dense.id, "model.onnx")
        if isinstance(bentoml, Path):
            peer = servers.enter_context(bentoml_server(bentoml, onnx_path, BENTOML_QUEUEING_LATENCY_MS, workdir))
            check_same_answers(same_work, bodies.dense_pixels, peer.url + "/reconstruct", bodies.bentoml_pixels)
            targets.insert(0, Target(BENTOML_LABEL, peer.url + "/reconstruct", bodies.bentoml_pixels, duration))
        guard = guard_rounds(gateway, same_work, bodies.dense_pixels, targets, arguments.rounds, duration, generator,
                             warm_up)
        if isinstance(bentoml, Path) and peer is not None:
            peer.stop()
            with bentoml_server(bentoml, onnx_path, BENTOML_TARGET_LATENCY_MS, workdir) as shedding_peer:
                shedding = bentoml_run(shedding_peer.url + "/reconstruct", bodies.bentoml_pixels,
                                       f"BentoML max_latency_ms={BENTOML_TARGET_LATENCY_MS}", duration, generator,
                                       warm_up)

    print("\n" + "=" * 100)
    print(f"RESULTS  (load generator {generator}; {duration:g} s per run, Keras {keras_duration:g} s; one uvicorn "
          "process per server of ours)")
    if scenarios is not None:
        report_scenarios(scenarios, constant_results, keras_results, paired, arguments.rounds)
    passed = report_guard(guard, shedding, bentoml)
    print(f"load average at end: {load_average()}")
    return 0 if passed else 1


def report_scenarios(scenarios: Scenarios, constant_results: list[LoadResult], keras_results: list[LoadResult],
                     paired: dict[str, list[PairedRound]], rounds: int) -> None:
    """The tables and figures of the full run (informational: the guard below is what passes or fails)."""
    headers = ["scenario", "conc.", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]
    print(format_table(headers, result_rows(scenarios.sweeps + constant_results + keras_results)))
    print("full = default response (denoised PNG, error map JSON, heatmap PNG, stats); compact = "
          f"?{COMPACT_QUERY} (denoised PNG, error map base64 float32, stats); image+stats = ?{LEAN_QUERY}")
    print()
    print(format_table([*headers, "images/s"], result_rows(scenarios.batch, BATCH_IMAGES)))
    print(f"batch: {BATCH_IMAGES} images (28x28) per request as a base64 array, response ?{BATCH_QUERY}")
    batch_u8 = [result for result in scenarios.batch if "uint8" in result.label]
    best_batch = max(batch_u8, key=lambda result: result.rps)
    print(f"batch of {BATCH_IMAGES} (uint8 in), compact response: {best_batch.rps * BATCH_IMAGES:,.0f} images/s "
          f"(best of c={[result.concurrency for result in batch_u8]}: c={best_batch.concurrency}, "
          f"{best_batch.errors} errors)")
    cold_ms = scenarios.cold_ms
    print(f"cold path (first /reconstruct of a model not loaded yet): worst {max(cold_ms.values()):.0f} ms, median "
          f"{statistics.median(cold_ms.values()):.0f} ms over {len(cold_ms)} models: "
          + ", ".join(f"{name} {value:.0f}" for name, value in cold_ms.items()))
    print(f"gateway memory: RSS {scenarios.rss_mib:.0f} MiB with {scenarios.sessions} models loaded (peak "
          f"{scenarios.peak_mib:.0f} MiB; {scenarios.rss_two_models_mib:.0f} MiB with 2 loaded, after the load runs)")
    constant_headline = at_level(constant_results, HEADLINE_CONCURRENCY)
    if constant_headline is None:
        raise RuntimeError(f"the constant app was not swept at c={HEADLINE_CONCURRENCY}")
    print(f"\nceiling share at c={HEADLINE_CONCURRENCY}, PNG in (median of {rounds} rounds of the variant followed by "
          "the constant app; the single sweeps above gave "
          + ", ".join(f"{result.label.removeprefix('gateway dense PNG, ')} {result.rps / constant_headline.rps:.0%}"
                      for result in scenarios.sweeps
                      if result.label.startswith("gateway dense PNG") and result.concurrency == HEADLINE_CONCURRENCY)
          + "):")
    for label, variant_rounds in paired.items():
        print("  " + ceiling_line(label, variant_rounds))
    all_errors = sum(result.errors for result in scenarios.sweeps + scenarios.batch)
    all_errors += sum(pair.gateway.errors for variant_rounds in paired.values() for pair in variant_rounds)
    print(f"all gateway runs above: {all_errors} errors")


def ceiling_line(label: str, rounds: list[PairedRound]) -> str:
    """One variant's c=32 figures from its paired rounds: req/s, share of the ceiling, p99, errors (medians)."""
    shares = [pair.share for pair in rounds]
    p99s = [pair.gateway.p99_ms for pair in rounds]
    return (f"{label}: {statistics.median(pair.gateway.rps for pair in rounds):,.0f} req/s, "
            f"{statistics.median(shares):.0%} of the ceiling (rounds: " + ", ".join(f"{value:.0%}" for value in shares)
            + f"; by event-loop CPU per request: {statistics.median(pair.cpu_share for pair in rounds):.0%}), "
            f"p99 {statistics.median(p99s):.1f} ms (rounds: " + ", ".join(f"{value:.1f}" for value in p99s)
            + f"), {sum(pair.gateway.errors for pair in rounds)} errors")


# ---------------------------------------------------------------------------------------------
# The gateway against the ceiling, in alternation
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The performance guard: the gateway against BentoML doing the same work
# ---------------------------------------------------------------------------------------------


def bentoml_server(venv: Path, onnx_path: Path, max_latency_ms: int, workdir: Path) -> BentoMLServer:
    """BentoML serving `onnx_path` with adaptive batching (not started: use it as a context manager)."""
    print(f"\n== peer (c): BentoML, adaptive batching max_batch_size={BENTOML_MAX_BATCH_SIZE}, "
          f"max_latency_ms={max_latency_ms}")
    return BentoMLServer(venv, onnx_path=onnx_path, threads=onnx_threads(), max_batch_size=BENTOML_MAX_BATCH_SIZE,
                         max_latency_ms=max_latency_ms, log_path=workdir / f"bentoml-{max_latency_ms}ms.log",
                         home=workdir / "bentoml-home")


def check_same_answers(gateway_url: str, gateway_body: bytes, bentoml_url: str, bentoml_body: bytes) -> None:
    """Both answer the same image with the same denoised image, error map and statistics (else it is not the
    same work); raises RuntimeError otherwise."""
    answers = []
    for url, body in ((gateway_url, gateway_body), (bentoml_url, bentoml_body)):
        response = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        if response.status_code != 200:
            raise RuntimeError(f"POST {url} answered {response.status_code}: {response.text[:500]}")
        answers.append(response.json())
    ours, theirs = answers[0]["results"][0], answers[1][0]
    differences = {name: float(np.max(np.abs(np.asarray(ours[name], np.float64) - np.asarray(theirs[name]))))
                   for name in ("denoised", "error_map")}
    differences |= {f"error_stats.{name}": abs(ours["error_stats"][name] - theirs["error_stats"][name])
                    for name in ("mean", "max", "p99")}
    if ours["shape"] != theirs["shape"] or max(differences.values()) > 1e-4:
        raise RuntimeError(f"the gateway and BentoML answered differently (shape {ours['shape']} vs "
                           f"{theirs['shape']}; largest differences {differences})")
    extra = sorted(set(ours) - set(theirs))
    print(f"  same answer from both (largest difference {max(differences.values()):.1e}); the gateway also sends "
          f"{', '.join(extra)} (and the model and mean_error around the result)")


@dataclass
class Target:
    """A server the guard rounds load right after the gateway, with its request and run length."""

    label: str
    url: str
    body: bytes
    duration_s: float
    timeout_s: float = 10.0


@dataclass
class GuardRound:
    """The gateway's same-work run, then each target's run (BentoML first), seconds apart."""

    gateway: LoadResult
    targets: dict[str, LoadResult]
    other_cores: float  # cores other processes on the machine used during the round

    def times(self, label: str) -> float:
        """Successful answers per second, gateway / the target's."""
        other = self.targets[label].ok_rps
        return self.gateway.ok_rps / other if other > 0 else float("inf")


def bentoml_run(url: str, body: bytes, label: str, duration_s: float, generator: str, warm_up_s: float) -> LoadResult:
    """A warm-up (BentoML's batching learns its batch latency), then one run at the headline concurrency."""
    if warm_up_s > 0:
        run_load(url, body, concurrency=HEADLINE_CONCURRENCY, duration_s=warm_up_s, label="warm-up",
                 generator=generator)
    result = run_load(url, body, concurrency=HEADLINE_CONCURRENCY, duration_s=duration_s, label=label,
                      generator=generator)
    print(f"  {label}: {result.rps:,.1f} answers/s, {result.ok_rps:,.1f} successful/s, p50 {result.p50_ms:.1f} ms, "
          f"p99 {result.p99_ms:.1f} ms, errors {result.errors} {result.error_kinds or ''}", flush=True)
    return result


def guard_rounds(gateway: UvicornServer, gateway_url: str, gateway_body: bytes, targets: list[Target], rounds: int,
                 duration_s: float, generator: str, warm_up_s: float) -> list[GuardRound]:
    """`rounds` times at the headline concurrency: the gateway's run, directly followed by each target's (every
    server up, one loaded at a time), so that each ratio compares runs seconds apart on a machine whose free CPU
    drifts within minutes."""
    print(f"\n== guard rounds at c={HEADLINE_CONCURRENCY}: the gateway (?{SAME_WORK_QUERY}), then "
          + ", then ".join(target.label for target in targets))
    if warm_up_s > 0:
        for url, body, timeout_s in [(gateway_url, gateway_body, 10.0),
                                     *((target.url, target.body, target.timeout_s) for target in targets)]:
            run_load(url, body, concurrency=HEADLINE_CONCURRENCY, duration_s=warm_up_s, label="warm-up",
                     generator=generator, timeout_s=timeout_s)
    results = []
    with OtherProcessesCpu(interval_s=1.0) as others:
        for round_index in range(rounds):
            started = time.time()
            gateway_run, _, _ = measured_run(gateway, gateway_url, gateway_body, "gateway, same work", duration_s,
                                             generator)
            runs = {target.label: run_load(target.url, target.body, concurrency=HEADLINE_CONCURRENCY,
                                           duration_s=target.duration_s, label=target.label, generator=generator,
                                           timeout_s=target.timeout_s)
                    for target in targets}
            result = GuardRound(gateway_run, runs, others.cores_between(started, time.time()))
            results.append(result)
            print(f"  round {round_index + 1}: gateway {gateway_run.ok_rps:7.1f} ok/s (p99 {gateway_run.p99_ms:6.1f} "
                  f"ms, errors {gateway_run.errors});  "
                  + ";  ".join(f"{label} {run.ok_rps:7.1f} ok/s (p99 {run.p99_ms:6.1f} ms, errors {run.errors}): "
                               + (f"share {result.times(label):.0%}" if label == CEILING_LABEL
                                  else f"{result.times(label):.1f}x") for label, run in runs.items())
                  + f";  other processes {result.other_cores:.2f} cores", flush=True)
    return results


def report_guard(rounds: list[GuardRound], shedding: LoadResult | None, bentoml: Path | str) -> bool:
    """Print the guard of issue 13 (medians over the paired rounds); True when every judged check passed."""
    print(f"\nPERFORMANCE GUARD (issue 13): dense 28x28, c={HEADLINE_CONCURRENCY}, the same work on both sides "
          f"(gateway POST /reconstruct?{SAME_WORK_QUERY} with pixels; BentoML batchable /reconstruct, "
          f"max_batch_size={BENTOML_MAX_BATCH_SIZE}, max_latency_ms={BENTOML_QUEUEING_LATENCY_MS}); medians of "
          f"{len(rounds)} paired rounds; answers/s = successful (2xx) answers per second")
    checks: list[bool] = []
    gateway_ok_rps = statistics.median(result.gateway.ok_rps for result in rounds)
    gateway_p99 = statistics.median(result.gateway.p99_ms for result in rounds)
    gateway_p50 = statistics.median(result.gateway.p50_ms for result in rounds)

    def figures(label: str) -> tuple[float, list[float], float, float, int]:
        ratios = [result.times(label) for result in rounds]
        runs = [result.targets[label] for result in rounds]
        return (statistics.median(ratios), ratios, statistics.median(run.ok_rps for run in runs),
                statistics.median(run.p99_ms for run in runs), sum(run.errors for run in runs))

    if BENTOML_LABEL not in rounds[0].targets:
        print(f"  SKIP  BentoML peer not measured: {bentoml}")
    else:
        times, ratios, ok_rps, p99, errors = figures(BENTOML_LABEL)
        p50 = statistics.median(result.targets[BENTOML_LABEL].p50_ms for result in rounds)
        checks.append(times >= GUARD_TIMES_BENTOML and gateway_p99 < p99)
        print(f"  {verdict(checks[-1])}  {times:.1f}x BentoML's answers/s ({gateway_ok_rps:,.0f} vs {ok_rps:,.0f}; "
              "rounds: " + ", ".join(f"{ratio:.1f}x" for ratio in ratios) + f") with a lower p99 ({gateway_p99:.1f} "
              f"vs {p99:.1f} ms; p50 {gateway_p50:.1f} vs {p50:.1f} ms)  (target >= {GUARD_TIMES_BENTOML:g}x and a "
              "lower p99)")
        print(f"        errors over the rounds: gateway {sum(result.gateway.errors for result in rounds)}, BentoML "
              f"{errors}")
    times, ratios, ok_rps, p99, errors = figures(KERAS_LABEL)
    checks.append(times >= GUARD_TIMES_KERAS)
    print(f"  {verdict(checks[-1])}  {times:.0f}x the FastAPI + Keras model.predict baseline's answers/s "
          f"({gateway_ok_rps:,.0f} vs {ok_rps:,.1f}; rounds: " + ", ".join(f"{ratio:.0f}x" for ratio in ratios)
          + f"; its p99 {p99:,.0f} ms, {errors} errors)  (target >= {GUARD_TIMES_KERAS:g}x)")
    _, shares, ceiling_rps, _, _ = figures(CEILING_LABEL)
    print(f"  ceiling share (reported): {statistics.median(shares):.0%} of the constant-JSON app's req/s "
          f"({gateway_ok_rps:,.0f} vs {ceiling_rps:,.0f}; rounds: " + ", ".join(f"{share:.0%}" for share in shares)
          + ")")
    if shedding is not None:
        print(f"  BentoML with max_latency_ms={BENTOML_TARGET_LATENCY_MS} (reported): {shedding.rps:,.0f} answers/s of "
              f"which {shedding.ok_rps:,.0f}/s successful; {shedding.error_kinds.get('status', 0):,} of "
              f"{shedding.requests:,} answers non-2xx (503: shed); p99 {shedding.p99_ms:.1f} ms")
    cores = ", ".join(f"{result.other_cores:.2f}" for result in rounds)
    print(f"  other processes on the machine used {cores} cores during the rounds (of {os.cpu_count()})")
    return all(checks)

if __name__ == "__main__":
    sys.exit(main())
