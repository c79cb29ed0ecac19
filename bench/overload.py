"""Overload: far more concurrent /reconstruct calls than a small serving queue holds (issue 12, acceptance 2).

    .venv/bin/python -m bench.overload                 # wrk -c 256 -d 30s, queue bound 64 images of 28x28
    .venv/bin/python -m bench.overload --duration 10   # quicker

Starts a redis-server and the real gateway (`uvicorn service.main:app`, configured by DAE_* variables only) with a
small `DAE_INFERENCE_QUEUE_MAX_VALUES`, publishes a small dense DAE (trained for one epoch, as a job would), then
drives POST /reconstruct with wrk (Debian package `wrk`). PASS when every answer is a 200 or a 503 carrying
Retry-After, wrk saw no socket errors, and the gateway's RSS stayed flat after the first seconds (the last third's
peak within 10% of the first third's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.harness import UvicornServer, load_average, process_memory_mib, verdict
from bench.serve import make_bodies, train_models
from core.store import ModelStore
from testing.redis_server import RedisServer

#: Counts every status and whether each 503 said when to retry; prints one JSON line at the end.
WRK_SCRIPT = r"""
local body_file = io.open(os.getenv("BENCH_BODY_FILE"), "rb")
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers["Content-Type"] = "application/json"
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {}; missing_retry_after = 0 end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 503 and headers["Retry-After"] == nil and headers["retry-after"] == nil then
    missing_retry_after = missing_retry_after + 1
  end
end
function done(summary, latency, requests)
  local counts, missing = {}, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses")) do counts[status] = (counts[status] or 0) + count end
    missing = missing + thread:get("missing_retry_after")
  end
  local parts = {}
  for status, count in pairs(counts) do table.insert(parts, string.format('"%d": %d', status, count)) end
  local errors = summary.errors
  io.write(string.format(
    'OVERLOAD_JSON {"statuses": {%s}, "missing_retry_after": %d, "requests": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "timeout": %d, "p99_us": %d}\n', table.concat(parts, ", "), missing, summary.requests,
    errors.connect, errors.read, errors.write, errors.timeout, latency:percentile(99)))
end
"""


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, float]]) -> None:
    """RSS of `pid` (MiB) every 0.5 s until `stop`."""
    started = time.monotonic()
    while not stop.wait(0.5):
        samples.append((time.monotonic() - started, process_memory_mib(pid)[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--queue-images", type=int, default=64, help="queue bound, in 28x28 images")
    parser.add_argument("--keep", type=Path, help="keep the work directory (logs) here")
    arguments = parser.parse_args()
    if shutil.which("wrk") is None:
        print("wrk is not installed: apt-get install -y wrk", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-overload-"))
    print(f"load average at start: {load_average()}")
    redis_server = RedisServer(workdir / "redis")
    gateway = None
    try:
        store = ModelStore(workdir / "store")
        dense, conv, test_images = train_models(store, train_images=500)
        body = make_bodies(test_images, dense, conv).dense_png
        queue_values = arguments.queue_images * 28 * 28
        env = {"DAE_REDIS_URL": redis_server.url, "DAE_STORE_DIR": str(store.root),
               "DAE_INFERENCE_QUEUE_MAX_VALUES": str(queue_values)}
        gateway = UvicornServer("service.main:app", env=env, log_path=workdir / "gateway.log").start()
        url = f"{gateway.url}/reconstruct"
        subprocess.run(["wrk", "-t1", "-c8", "-d2s", "-s", str(write_script(workdir)), url], check=True,
                       capture_output=True, env={**os.environ, "BENCH_BODY_FILE": str(write_body(workdir, body))})
        samples: list[tuple[float, float]] = []
        stop = threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(gateway.process.pid, stop, samples), daemon=True)
        sampler.start()
        completed = subprocess.run(
            ["wrk", "-t1", f"-c{arguments.concurrency}", f"-d{round(arguments.duration)}s", "--timeout=10s",
             "-s", str(write_script(workdir)), url],
            capture_output=True, text=True, env={**os.environ, "BENCH_BODY_FILE": str(write_body(workdir, body))},
            timeout=arguments.duration + 60,
        )
        stop.set()
        sampler.join()
        line = next(row for row in completed.stdout.splitlines() if row.startswith("OVERLOAD_JSON "))
        result = json.loads(line.removeprefix("OVERLOAD_JSON "))
        return report(result, samples, arguments, queue_values)
    finally:
        if gateway is not None:
            gateway.stop()
        redis_server.stop()
        if arguments.keep is not None:
            shutil.copytree(workdir, arguments.keep, dirs_exist_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"load average at end: {load_average()}")


def write_script(workdir: Path) -> Path:
    path = workdir / "overload.lua"
    path.write_text(WRK_SCRIPT)
    return path


def write_body(workdir: Path, body: bytes) -> Path:
    path = workdir / "body.json"
    path.write_bytes(body)
    return path


def report(result: dict, samples: list[tuple[float, float]], arguments: argparse.Namespace, queue_values: int) -> int:
    statuses = {int(status): count for status, count in result["statuses"].items()}
    socket_errors = result["connect"] + result["read"] + result["write"] + result["timeout"]
    others = {status: count for status, count in statuses.items() if status not in (200, 503)}
    third = max(1, len(samples) // 3)
    early = max(rss for _t, rss in samples[:third])
    late = max(rss for _t, rss in samples[-third:])
    print(f"wrk -c {arguments.concurrency} -d {arguments.duration:.0f}s, queue bound {queue_values:,} values "
          f"({arguments.queue_images} images of 28x28)")
    print(f"  answers: {result['requests']:,} ({result['requests'] / arguments.duration:,.0f}/s); "
          f"200: {statuses.get(200, 0):,}, 503: {statuses.get(503, 0):,}, other: {others or 'none'}; "
          f"503 without Retry-After: {result['missing_retry_after']}; socket errors: {socket_errors}; "
          f"p99 {result['p99_us'] / 1000:.1f} ms")
    print(f"  gateway RSS: first third peak {early:.0f} MiB, last third peak {late:.0f} MiB "
          f"(min {min(rss for _t, rss in samples):.0f}, max {max(rss for _t, rss in samples):.0f})")
    checks = [
        ("only 200 and 503", not others),
        ("every 503 has Retry-After", result["missing_retry_after"] == 0),
        ("no socket errors", socket_errors == 0),
        ("RSS flat after the first seconds (last third within 10% of the first)", late <= early * 1.10),
        ("some requests were shed (the queue bound was reached)", statuses.get(503, 0) > 0),
    ]
    for label, passed in checks:
        print(f"  {verdict(passed)}  {label}")
    return 0 if all(passed for _label, passed in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
