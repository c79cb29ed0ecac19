"""A real redis-server for tests: started on a free port with its data in a temp dir."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A redis-server child process; `url` points at it, `stop()` ends it.

    `appendonly=True` runs it as production does (AOF, fsync every second), so `kill()` + `start()` on the same
    port and data directory is a real crash and restart from the AOF.
    """

    def __init__(self, data_dir: Path, *, appendonly: bool = False, extra_args: tuple[str, ...] = ()) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/ensure-system-packages or set DAE_REDIS_URL")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.command = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "yes" if appendonly else "no", "--appendfsync", "everysec",
                        "--dir", str(data_dir), "--maxmemory-policy", "noeviction", *extra_args]
        self.start()

    def start(self) -> RedisServer:
        """Start redis-server (again, on the same port and data directory) and wait until it answers PING."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        """SIGKILL redis-server (a crash: whatever the AOF had not written is lost)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)

    def client(self) -> redis.Redis:
        """A new client of this server that fails fast while it is down."""
        return redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
