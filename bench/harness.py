"""What the benchmarks share: uvicorn server processes, the HTTP load generator, process memory, tables.

Load generator: `wrk` (a C client; it steals much less CPU from the server than a Python client would, which
matters on a 2-core machine) with a Lua script that POSTs a fixed body and reports wrk's own latency percentiles;
when `wrk` is not installed, a Python asyncio client with raw HTTP/1.1 keep-alive connections. The same generator
drives the gateway and the baselines in one run, so their ratios compare like with like. Each connection sends
its next request as soon as the previous answer arrived (closed loop): `concurrency` = connections in flight.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx
import numpy as np

from testing.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent

#: wrk's Lua script: POST the body file named by BENCH_BODY_FILE; print one JSON line with wrk's summary.
WRK_SCRIPT = r"""
local body_file = assert(io.open(os.getenv("BENCH_BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"

done = function(summary, latency, requests)
  local errors = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, "write": %d, ' ..
    '"status": %d, "timeout": %d, "p50_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, errors.connect, errors.read, errors.write,
    errors.status, errors.timeout, latency:percentile(50), latency:percentile(95), latency:percentile(99),
    latency.max))
end
"""


@dataclass
class LoadResult:
    """One closed-loop load run at a fixed concurrency."""

    label: str
    concurrency: int
    seconds: float
    requests: int
    errors: int
    successes: int  # 2xx/3xx answers
    p50_ms: float
    p95_ms: float
    p99_ms: float
    generator: str
    error_kinds: dict[str, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        """Completed requests per second (errors included, as wrk counts them)."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def ok_rps(self) -> float:
        """Successful answers per second (what a server that sheds load with 503s cannot inflate)."""
        return self.successes / self.seconds if self.seconds > 0 else 0.0


def load_generator_name(prefer: str = "auto") -> str:
    """`wrk` when requested or available (auto), else `python`."""
    if prefer == "python":
        return "python"
    if shutil.which("wrk"):
        return "wrk"
    if prefer == "wrk":
        raise RuntimeError("wrk is not installed: `apt-get install -y wrk`, or run with --generator python")
    return "python"


def run_load(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration_s: float,
    label: str,
    generator: str,
    content_type: str = "application/json",
    timeout_s: float = 10.0,
) -> LoadResult:
    """POST `body` to `url` from `concurrency` keep-alive connections for `duration_s` seconds."""
    if generator == "wrk":
        return _run_wrk(url, body, concurrency=concurrency, duration_s=duration_s, label=label,
                        content_type=content_type, timeout_s=timeout_s)
    return asyncio.run(_run_python(url, body, concurrency=concurrency, duration_s=duration_s, label=label,
                                   content_type=content_type, timeout_s=timeout_s))


def _run_wrk(url: str, body: bytes, *, concurrency: int, duration_s: float, label: str, content_type: str,
             timeout_s: float) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as directory:
        script = Path(directory) / "post.lua"
        script.write_text(WRK_SCRIPT)
        body_file = Path(directory) / "body"
        body_file.write_bytes(body)
        # One wrk thread: it drives thousands of requests/s alone and leaves the second core to the server.
        command = ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(duration_s))}s", f"--timeout={timeout_s:g}s",
                   "-s", str(script), url]
        environment = {**os.environ, "BENCH_BODY_FILE": str(body_file), "BENCH_CONTENT_TYPE": content_type}
        completed = subprocess.run(command, capture_output=True, text=True, env=environment,
                                   timeout=duration_s + timeout_s + 30)
    line = next((row for row in completed.stdout.splitlines() if row.startswith("BENCH_JSON ")), None)
    if completed.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (exit {completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    summary = json.loads(line.removeprefix("BENCH_JSON "))
    kinds = {kind: int(summary[kind]) for kind in ("connect", "read", "write", "status", "timeout") if summary[kind]}
    return LoadResult(
        label=label,
        concurrency=concurrency,
        seconds=summary["duration_us"] / 1e6,
        requests=int(summary["requests"]),
        errors=sum(kinds.values()),
        # wrk counts a non-2xx/3xx answer in `requests` and in `status`; a timed-out request may complete later.
        successes=max(0, int(summary["requests"]) - kinds.get("status", 0) - kinds.get("timeout", 0)),
        p50_ms=summary["p50_us"] / 1000,
        p95_ms=summary["p95_us"] / 1000,
        p99_ms=summary["p99_us"] / 1000,
        generator="wrk",
        error_kinds=kinds,
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; returns (status, connection stays open)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status, headers.get("connection", "").lower() != "close"


async def _run_python(url: str, body: bytes, *, concurrency: int, duration_s: float, label: str, content_type: str,
                      timeout_s: float) -> LoadResult:
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port or 80
    target = parsed.raw_path.decode()
    request = (
        f"POST {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    latencies: list[float] = []
    kinds = {"connect": 0, "read": 0, "status": 0, "timeout": 0}
    started = time.perf_counter()
    deadline = started + duration_s

    async def connection() -> None:
        reader = writer = None
        while time.perf_counter() < deadline:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(host, port)
                except OSError:
                    kinds["connect"] += 1
                    await asyncio.sleep(0.01)
                    continue
            sent = time.perf_counter()
            try:
                writer.write(request)
                status, keep_alive = await asyncio.wait_for(_read_response(reader), timeout_s)
            except TimeoutError:
                kinds["timeout"] += 1
                writer.close()
                writer = None
                continue
            except (OSError, asyncio.IncompleteReadError, ValueError):
                kinds["read"] += 1
                writer.close()
                writer = None
                continue
            latencies.append(time.perf_counter() - sent)
            if not 200 <= status < 400:
                kinds["status"] += 1
            if not keep_alive:
                writer.close()
                writer = None
        if writer is not None:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    values = np.asarray(latencies) * 1000 if latencies else np.zeros(1)
    p50, p95, p99 = (float(value) for value in np.percentile(values, [50, 95, 99]))
    errors = {kind: count for kind, count in kinds.items() if count}
    return LoadResult(label=label, concurrency=concurrency, seconds=elapsed,
                      requests=len(latencies) + kinds["timeout"] + kinds["read"], errors=sum(errors.values()),
                      successes=len(latencies) - kinds["status"], p50_ms=p50, p95_ms=p95, p99_ms=p99,
                      generator="python", error_kinds=errors)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_cpu_seconds(path: str) -> float:
    """utime + stime of a /proc/.../stat file, seconds."""
    with open(path) as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


class UvicornServer:
    """`python -m uvicorn <app>` on a free port, one process, no access log (the same flags for every app)."""

    def __init__(self, app: str, *, env: dict[str, str] | None = None, log_path: Path, health_path: str = "/healthz"):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.health_path = health_path
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        """The uvicorn command line."""
        return [sys.executable, "-m", "uvicorn", self.app, "--host", "127.0.0.1", "--port", str(self.port),
                "--no-access-log", "--log-level", "warning"]

    def start(self, ready_timeout_s: float = 120.0) -> Self:
        """Start and wait until the health path answers 200."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, cwd=REPO_ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.app} exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + self.health_path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.app} was not ready after {ready_timeout_s:.0f} s (log: {self.log_path})")
            time.sleep(0.1)

    def memory_mib(self) -> tuple[float, float]:
        """(resident set size now, peak resident set size) of the server process, MiB."""
        if self.process is None:
            raise RuntimeError("the server was not started")
        return process_memory_mib(self.process.pid)

    def cpu_seconds(self) -> tuple[float, float]:
        """(CPU seconds of the main thread, which runs the event loop; of the whole process), user + system."""
        if self.process is None:
            raise RuntimeError("the server was not started")
        pid = self.process.pid
        return _stat_cpu_seconds(f"/proc/{pid}/task/{pid}/stat"), _stat_cpu_seconds(f"/proc/{pid}/stat")

    def stop(self) -> None:
        """SIGTERM the process group (graceful), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def __enter__(self) -> Self:
        return self.start() if self.process is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def process_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process from /proc, MiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024  # kB
    return values["VmRSS"], values["VmHWM"]


def load_average() -> str:
    """The 1/5/15-minute load averages, for the record (other work on the machine skews every figure)."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain text table with right-aligned columns (the first left-aligned)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for index, row in enumerate([headers, *rows]):
        cells = [str(cell).ljust(width) if column == 0 else str(cell).rjust(width)
                 for column, (cell, width) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells))
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def verdict(passed: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if passed else "FAIL"
