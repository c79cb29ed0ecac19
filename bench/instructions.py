"""The ceiling share of POST /reconstruct in CPU instructions: a figure the machine's noise does not move.

    .venv/bin/python -m bench.instructions [--requests 600] [--train-images 1000] [--keep DIR]

bench/serve.py's ratio of requests/s swings by ±10 points between consecutive rounds on a shared 2-core virtual
machine. This script runs the same comparison under valgrind's callgrind, which counts executed instructions
instead of seconds: the gateway (`uvicorn service.main:app`, dense 28x28 model as in bench/serve.py) and the
ceiling (bench/baselines/constant_app.py) each start with instrumentation off, get a warm-up, then exactly
`--requests` requests at concurrency 32 with instrumentation on (callgrind_control), and the instructions of each
server process per answered request are compared: ceiling / gateway is the share of the ceiling that a CPU-bound
gateway reaches with the same instruction throughput. All threads of the gateway count (its onnxruntime thread
too); the event-loop thread's share is printed beside it. The kernel's work (sockets) is not counted, for either.
Under valgrind a server runs ~50x slower: this takes a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import httpx

from bench.harness import UvicornServer, _read_response
from bench.serve import COMPACT_QUERY, HEADLINE_CONCURRENCY, LEAN_QUERY, make_bodies, train_models
from core.store import ModelStore
from testing.redis_server import RedisServer

TARGET_SHARE_OF_CEILING = 0.40


class CallgrindServer(UvicornServer):
    """A uvicorn server under `valgrind --tool=callgrind`, instrumentation off until `counting()`."""

    def __init__(self, *args, out_dir: Path, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.out_dir = out_dir

    @property
    def command(self) -> list[str]:
        return ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                f"--callgrind-out-file={self.out_dir}/callgrind.%p", *super().command]

    def start(self, ready_timeout_s: float = 600.0) -> CallgrindServer:
        super().start(ready_timeout_s)
        return self

    def control(self, *options: str) -> None:
        subprocess.run(["callgrind_control", *options, str(self.process.pid)], check=True, capture_output=True,
                       timeout=120)

    def instructions(self) -> tuple[int, int]:
        """(all threads, main thread) instructions in the dumps written so far."""
        total = main = 0
        for dump in self.out_dir.glob(f"callgrind.{self.process.pid}*"):
            match = re.search(r"^summary:\s+(\d+)", dump.read_text(errors="replace"), re.MULTILINE)
            count = int(match.group(1)) if match else 0
            total += count
            if dump.name.endswith("-01") or re.search(r"-01$", dump.name):
                main += count
        return total, main


async def fixed_requests(url: str, body: bytes, count: int, concurrency: int) -> int:
    """Send exactly `count` POSTs over `concurrency` keep-alive connections; returns the number answered 200."""
    parsed = httpx.URL(url)
    host, port, target = parsed.host, parsed.port, parsed.raw_path.decode()
    request = (f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    remaining = count
    answered = 0

    async def connection() -> None:
        nonlocal remaining, answered
        reader, writer = await asyncio.open_connection(host, port)
        while remaining > 0:
            remaining -= 1
            writer.write(request)
            status, _ = await asyncio.wait_for(_read_response(reader), 600)
            answered += status == 200
        writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return answered


def measure(server: CallgrindServer, url: str, body: bytes, requests: int) -> tuple[float, float]:
    """Instructions per answered request (all threads, main thread) over exactly `requests` requests."""
    asyncio.run(fixed_requests(url, body, HEADLINE_CONCURRENCY * 2, HEADLINE_CONCURRENCY))  # warm-up, not counted
    server.control("--instr=on")
    server.control("--zero")
    answered = asyncio.run(fixed_requests(url, body, requests, HEADLINE_CONCURRENCY))
    server.control("--dump")
    server.control("--instr=off")
    if answered != requests:
        raise RuntimeError(f"{url}: {answered} of {requests} requests answered 200")
    total, main = server.instructions()
    return total / requests, main / requests


def keep(dumps: Path, destination: Path | None, label: str) -> None:
    """Copy one variant's callgrind dumps to destination/label (kept after the run; see `--keep`)."""
    if destination is None:
        return
    target = destination / label.replace("+", "-")
    target.mkdir(parents=True, exist_ok=True)
    for dump in dumps.glob("callgrind.*"):
        shutil.copy2(dump, target / dump.name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=600, help="counted requests per variant (default 600)")
    parser.add_argument("--train-images", type=int, default=1000, help="training images of the model (default 1000)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the callgrind dumps here (one folder per variant), for callgrind_annotate")
    arguments = parser.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        print("valgrind is not installed: apt-get install -y valgrind")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="dae-bench-instructions-"))
    redis_server = RedisServer(workdir / "redis")
    try:
        store = ModelStore(workdir / "store")
        dense, conv, test_images = train_models(store, arguments.train_images)
        bodies = make_bodies(test_images, dense, conv)
        results: dict[str, tuple[float, float]] = {}
        gateway_env = {"DAE_REDIS_URL": redis_server.url, "DAE_STORE_DIR": str(store.root)}
        (workdir / "gateway").mkdir()
        with CallgrindServer("service.main:app", env=gateway_env, log_path=workdir / "gateway.log",
                             out_dir=workdir / "gateway") as gateway:
            endpoint = gateway.url + "/reconstruct"
            for label, url in (("default", endpoint), ("compact", f"{endpoint}?{COMPACT_QUERY}"),
                               ("image+stats", f"{endpoint}?{LEAN_QUERY}")):
                started = time.perf_counter()
                for old in (workdir / "gateway").glob("callgrind.*"):
                    old.unlink()
                results[label] = measure(gateway, url, bodies.dense_png, arguments.requests)
                keep(workdir / "gateway", arguments.keep, label)
                print(f"  gateway {label:<12} {results[label][0]:>12,.0f} instructions/request "
                      f"(event loop {results[label][1]:,.0f}) [{time.perf_counter() - started:.0f} s]", flush=True)
        (workdir / "constant").mkdir()
        with CallgrindServer("bench.baselines.constant_app:app", log_path=workdir / "constant.log",
                             out_dir=workdir / "constant") as constant:
            ceiling = measure(constant, constant.url + "/reconstruct", bodies.dense_png, arguments.requests)
            keep(workdir / "constant", arguments.keep, "ceiling")
            print(f"  ceiling (constant JSON) {ceiling[0]:>12,.0f} instructions/request", flush=True)
        print("\nSHARE OF THE CEILING BY INSTRUCTIONS (ceiling / gateway, per request)")
        for label, (total, loop) in results.items():
            share = ceiling[0] / total
            verdict = "PASS" if share >= TARGET_SHARE_OF_CEILING else "FAIL"
            print(f"  {verdict}  {label:<12} {share:.0%} (event-loop thread only: {ceiling[1] / loop:.0%})  "
                  f"(target >= {TARGET_SHARE_OF_CEILING:.0%})")
        return 0
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
