"""The BentoML peer's own virtual environment and server process (bench/serve.py's peer (c)).

BentoML brings its own web stack and pins, so it is installed apart from the project: a virtual environment under
`var/bench/bentoml-<hash of bentoml-requirements.txt>/`, created once with pip from the pinned requirements and
reused while the file is unchanged (a marker file written after a successful install and import; a lock file
serializes concurrent runs; environments of earlier versions of the file are removed). When it cannot be
installed (no registry, no pip), `BentoMLUnavailable` says why and the benchmark skips the peer.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from bench.harness import REPO_ROOT, UvicornServer

REQUIREMENTS = Path(__file__).with_name("bentoml-requirements.txt")
PROJECT_REQUIREMENTS = REPO_ROOT / "requirements.txt"
CACHE_DIR = REPO_ROOT / "var" / "bench"
SERVICE = "bench.baselines.bentoml_service:Denoiser"
INSTALL_TIMEOUT_S = 900
_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)")


class BentoMLUnavailable(RuntimeError):
    """The BentoML environment could not be installed (the message says why)."""


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file, names lower-cased."""
    found = {}
    for line in path.read_text().splitlines():
        match = _PIN.match(line)
        if match:
            found[match.group(1).lower()] = match.group(2)
    return found


def check_shared_pins() -> dict[str, str]:
    """The peer's pins; raises ValueError when a package both install is pinned differently (not the same work)."""
    ours, peer = pins(PROJECT_REQUIREMENTS), pins(REQUIREMENTS)
    drift = {name: (peer[name], ours[name]) for name in peer.keys() & ours.keys() if peer[name] != ours[name]}
    if drift:
        expected = ", ".join(f"{name}=={ours_}" for name, (_, ours_) in sorted(drift.items()))
        received = ", ".join(f"{name}=={theirs}" for name, (theirs, _) in sorted(drift.items()))
        raise ValueError(f"{REQUIREMENTS.name} must pin what requirements.txt pins. Expected: {expected}. "
                         f"Received: {received}")
    return peer


def environment_dir() -> Path:
    """Where the environment of the current requirements lives (a new one when the file changes)."""
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]
    return CACHE_DIR / f"bentoml-{digest}"


def ensure_environment(log_path: Path) -> Path:
    """The environment's directory, installing it first if needed (pip's output goes to `log_path`)."""
    check_shared_pins()
    venv = environment_dir()
    marker = venv / ".installed"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / "bentoml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second benchmark waits for the first one's install
        if marker.exists():
            return venv
        shutil.rmtree(venv, ignore_errors=True)  # a half-made environment of an interrupted install
        python = venv / "bin" / "python"
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(REQUIREMENTS)],
            [str(python), "-c", "import bentoml, numpy, onnxruntime"],
        ]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            for step in steps:
                try:
                    completed = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT_S,
                                               check=False)
                except (OSError, subprocess.TimeoutExpired) as error:
                    shutil.rmtree(venv, ignore_errors=True)
                    raise BentoMLUnavailable(f"`{' '.join(step[:4])} ...` failed: {error}") from error
                if completed.returncode != 0:
                    shutil.rmtree(venv, ignore_errors=True)
                    tail = log_path.read_text(errors="replace")[-1500:]
                    raise BentoMLUnavailable(f"`{' '.join(step[:4])} ...` exited {completed.returncode}:\n{tail}")
        marker.write_text("\n".join(f"{name}=={version}" for name, version in sorted(pins(REQUIREMENTS).items())))
        for stale in CACHE_DIR.glob("bentoml-*"):  # environments of earlier requirements
            if stale != venv and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return venv


class BentoMLServer(UvicornServer):
    """`bentoml serve` of bench/baselines/bentoml_service.py from the peer's environment, on a free port.

    BentoML starts its own processes (an arbiter and one worker); the whole process group is stopped at the end.
    """

    def __init__(self, venv: Path, *, onnx_path: Path, threads: int, max_batch_size: int, max_latency_ms: int,
                 log_path: Path, home: Path) -> None:
        super().__init__(SERVICE, log_path=log_path, health_path="/readyz", env={
            "BENCH_ONNX_MODEL": str(onnx_path),
            "BENCH_ONNX_THREADS": str(threads),
            "BENCH_BENTOML_MAX_BATCH_SIZE": str(max_batch_size),
            "BENCH_BENTOML_MAX_LATENCY_MS": str(max_latency_ms),
            "BENTOML_HOME": str(home),
            "BENTOML_DO_NOT_TRACK": "True",  # no usage report (and no network call) from a benchmark
        })
        self.env.pop("VIRTUAL_ENV", None)  # the project's; BentoML's interpreter is named explicitly
        self.venv = venv

    @property
    def command(self) -> list[str]:
        """The bentoml serve command line."""
        return [str(self.venv / "bin" / "bentoml"), "serve", self.app, "--host", "127.0.0.1", "--port",
                str(self.port)]


def onnx_threads() -> int:
    """The gateway's default intra-op threads (service/config.py): half the cores, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)
