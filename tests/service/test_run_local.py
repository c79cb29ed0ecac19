"""`make run` (scripts/run-local) for real: a killed worker is started again, Ctrl-C stops every process it started.

The script starts its own redis-server (DAE_REDIS_URL unset) and keeps its logs, pid file and data under a
temporary DAE_VAR_DIR, so a developer's ./var is never touched.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from testing.redis_server import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Celery's line once a worker consumes ("worker-123.1@host ready."), one per start.
WORKER_READY = re.compile(r"@\S+ ready\.")


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> None:
    """Poll `predicate` until it is truthy; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s:.0f} s waiting for {what}"
        time.sleep(0.1)


def live_processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that is neither a zombie nor dead, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        state, ppid, pgid = stat[stat.rindex(")") + 2:].split()[:3]
        if state not in "ZX":
            table[int(entry.name)] = (int(ppid), int(pgid))
    return table


def started_by(root: int) -> set[int]:
    """`root` and every live process below it, plus the members of their process groups (the worker's own)."""
    table = live_processes()
    tree, grew = {root}, True
    while grew:
        below = {pid for pid, (ppid, _) in table.items() if ppid in tree} - tree
        tree |= below
        grew = bool(below)
    groups = {table[pid][1] for pid in tree if pid in table}
    return tree | {pid for pid, (_, pgid) in table.items() if pgid in groups}


def readyz(port: int) -> int:
    """The /readyz status of the gateway on `port`, 0 while it does not answer."""
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
    except httpx.HTTPError:
        return 0


@pytest.mark.slow
def test_run_local_restarts_a_killed_worker_and_ctrl_c_stops_everything(tmp_path: Path):
    var_dir = tmp_path / "var"
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "DAE_REDIS_URL"}
    env.update(PORT=str(port), DAE_VAR_DIR=str(var_dir), DAE_STORE_DIR=str(tmp_path / "store"))
    worker_log = var_dir / "log" / "worker.log"
    pid_file = var_dir / "worker.pid"
    with open(tmp_path / "run-local.out", "wb") as out:
        script = subprocess.Popen([str(REPO_ROOT / "scripts" / "run-local")], cwd=REPO_ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def workers_ready() -> int:
        return len(WORKER_READY.findall(worker_log.read_text())) if worker_log.exists() else 0

    everything: set[int] = set()
    try:
        wait_for(lambda: readyz(port) == 200, 90, "the gateway of run-local to be ready")
        wait_for(workers_ready, 90, "the first Celery worker to be ready")
        first = int(pid_file.read_text())
        first_group = started_by(first)
        assert len(first_group) >= 2  # the worker and its pool child

        os.kill(first, signal.SIGKILL)
        wait_for(lambda: pid_file.exists() and int(pid_file.read_text()) != first, 30, "a new worker")
        assert readyz(port) == 200  # the gateway and Redis kept running
        wait_for(lambda: workers_ready() >= 2, 90, "the restarted worker to be ready")
        assert not first_group & set(live_processes())  # the killed worker's pool child went with it
        assert readyz(port) == 200
        assert "restarting it in 1 s" in (tmp_path / "run-local.out").read_text()
        everything = started_by(script.pid)
    finally:
        os.killpg(script.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the foreground process group
        try:
            script.wait(timeout=90)
        except subprocess.TimeoutExpired:
            for pid in started_by(script.pid):
                os.kill(pid, signal.SIGKILL)
            raise
    assert script.returncode == 130, (tmp_path / "run-local.out").read_text()[-3000:]
    assert len(everything) >= 5  # the script, Redis, the gateway, the supervisor, the worker and its child
    wait_for(lambda: not everything & set(live_processes()), 10, "every process run-local started to end")
    assert not pid_file.exists()
