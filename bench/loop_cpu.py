"""Event-loop CPU per POST /reconstruct, in-process: the real app (create_app, its middleware list and lifespan)
called as an ASGI app by `--concurrency` tasks in a closed loop (32, as the guard; 1: sequential requests), and
`time.thread_time` of the event loop's thread per answered request (the onnxruntime runs are in a worker thread
and not counted; no HTTP parsing or sockets, so the figures are the gateway's own work).

    .venv/bin/python -m bench.loop_cpu [--requests 2000] [--concurrency 32] [--profile same-work] [--store DIR]

The loop is asyncio's default one (uvicorn serves with uvloop), so compare trees with this script, not its
figures with a server's. Sequential requests pay a whole micro-batch each (its 1 ms timer and the hand-off to the worker thread cost
~100 µs of loop CPU apiece on a 2-core virtual machine, in the kernel): at concurrency 32 those are shared.

Trains `bench-dense` (the default dense architecture, 28x28x1, 1 epoch on 500 Fashion-MNIST images) into
`--store` the first time (default: a directory under the system's temp directory, reused by later runs).
Prints µs of loop CPU per request (median of 5 blocks) for each body/query variant; `--profile NAME` also prints
cProfile's top functions of that variant.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench.harness import load_average
from core.store import ModelStore

VARIANTS = {
    # name: (body form, query)
    "same-work": ("pixels", "format=array&error_format=json&heatmap=false"),
    "default-png": ("png", ""),
    "default-pixels": ("pixels", ""),
    "lean-png": ("png", "error_format=none&heatmap=false"),
}


def bench_store(directory: Path) -> tuple[ModelStore, Any]:
    """The store with bench-dense (trained on first use) and a noisy test image."""
    from bench.serve import NOISE, train_models  # noqa: PLC0415
    from dae.data import load_dataset  # noqa: PLC0415

    store = ModelStore(directory)
    if not store.list_models("bench-dense")[0]:
        train_models(store, 500, with_conv=False)
    from dae.noise import add_noise  # noqa: PLC0415

    test = load_dataset("fashion_mnist", seed=0, max_train_images=500).test[:1]
    noisy = add_noise(test, NOISE, seed=[0, 1])
    return store, (noisy * 255).round() / 255


def bodies(image: Any) -> dict[str, bytes]:
    from bench.serve import png_base64  # noqa: PLC0415

    pixels = [[float(value) for value in row] for row in image[0, ..., 0].astype("float64")]
    return {
        "pixels": json.dumps({"model": "bench-dense", "pixels": pixels}).encode(),
        "png": json.dumps({"model": "bench-dense", "image": png_base64(image[0])}).encode(),
    }


async def call(app: Any, body: bytes, query: str) -> int:
    """One request through the ASGI app; returns the status."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/reconstruct", "raw_path": b"/reconstruct", "root_path": "", "query_string": query.encode(),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("bench", 80),
    }
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def closed_loop(app: Any, body: bytes, query: str, requests: int, concurrency: int) -> None:
    """`requests` calls by `concurrency` tasks, each sending its next request when its answer is in."""
    remaining = requests

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            if await call(app, body, query) != 200:
                raise RuntimeError(f"/reconstruct?{query} did not answer 200")

    await asyncio.gather(*(client() for _ in range(min(concurrency, requests))))


@dataclass
class Block:
    """One block of requests: the loop thread's CPU (user, system) and voluntary context switches per request."""

    user_us: float
    system_us: float
    switches: float

    @property
    def cpu_us(self) -> float:
        return self.user_us + self.system_us


async def measure(app: Any, body: bytes, query: str, requests: int, concurrency: int, profile: bool) -> list[Block]:
    """The loop thread's use per request, per block of requests // 5 (getrusage of this thread)."""
    await closed_loop(app, body, query, 100, concurrency)
    profiler = cProfile.Profile() if profile else None
    blocks = []
    per_block = max(1, requests // 5)
    for _ in range(5):
        if profiler is not None:
            profiler.enable()
        before = resource.getrusage(resource.RUSAGE_THREAD)
        await closed_loop(app, body, query, per_block, concurrency)
        after = resource.getrusage(resource.RUSAGE_THREAD)
        blocks.append(Block((after.ru_utime - before.ru_utime) / per_block * 1e6,
                            (after.ru_stime - before.ru_stime) / per_block * 1e6,
                            (after.ru_nvcsw - before.ru_nvcsw) / per_block))
        if profiler is not None:
            profiler.disable()
    if profiler is not None:
        pstats.Stats(profiler).sort_stats(os.environ.get("BENCH_SORT", "tottime")).print_stats(int(os.environ.get("BENCH_TOP", "35")))
        if os.environ.get("BENCH_DUMP"):
            profiler.dump_stats(os.environ["BENCH_DUMP"])
    return blocks


async def main_async(arguments: argparse.Namespace, store: ModelStore, image: Any) -> None:
    from service.config import Settings  # noqa: PLC0415
    from service.main import create_app  # noqa: PLC0415

    settings = Settings(store_dir=store.root, redis_url="redis://127.0.0.1:1/0", inference_intra_op_threads=1)
    app = create_app(settings)
    forms = bodies(image)
    async with app.router.lifespan_context(app):
        for name, (form, query) in VARIANTS.items():
            if arguments.only and name not in arguments.only.split(","):
                continue
            blocks = await measure(app, forms[form], query, arguments.requests, arguments.concurrency,
                                   arguments.profile == name)
            middle = sorted(blocks, key=lambda block: block.cpu_us)[len(blocks) // 2]
            print(f"{name:15s} {middle.cpu_us:7.1f} µs/request loop CPU ({middle.system_us:.0f} in the kernel, "
                  f"{middle.switches:.2f} voluntary context switches; blocks "
                  f"{', '.join(f'{block.cpu_us:.0f}' for block in blocks)})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--profile", choices=sorted(VARIANTS), default=None)
    parser.add_argument("--only", default="", help="comma-separated variants (default: all)")
    parser.add_argument("--store", type=Path, default=Path(tempfile.gettempdir()) / "dae-bench-loop-cpu-store")
    arguments = parser.parse_args()
    store, image = bench_store(arguments.store)
    print(f"load average {load_average()}; concurrency {arguments.concurrency}", flush=True)
    asyncio.run(main_async(arguments, store, image))
    print(f"load average {load_average()}", flush=True)


if __name__ == "__main__":
    main()
