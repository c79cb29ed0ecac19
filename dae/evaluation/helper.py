"""The model-independent rows of the evaluation table (report.reference_rows), computed in a helper process.

Publishing a model is mostly single-threaded Python (the ONNX conversion), while the `noisy` rows and the classical
baselines (TV, NL-means) are ~1-1.5 s of CPU that do not need the model. A worker therefore keeps one helper
process (start_helper, once per process, e.g. when a Celery pool child preloads) and hands it those rows at the
start of publishing; the second core computes them while the first exports.

- The helper is `python -m dae.evaluation.helper`, a fresh interpreter (never a fork: TensorFlow's threads do not survive
  one; and multiprocessing refuses to start children from Celery's daemonic pool children). It reads requests on
  stdin and writes replies on its original stdout (its fd 1 goes to stderr, so a library that prints cannot
  corrupt a reply); it exits when stdin closes, i.e. when its parent is gone.
- Messages are length-prefixed frames: a JSON header, then for the images one `.npy` frame written and read with
  allow_pickle=False (no pickle anywhere: the project's rule, even on a private pipe).
- It computes exactly dae.evaluation.report.reference_rows, so the table is the same as when computed inline (tested: JSON
  round-trips Python floats exactly).
- Without a started helper (the CLI, tests, a helper that died) the rows are computed inline, when asked for.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from dae.evaluation.report import reference_rows, select_test_images
from dae.spec import NoiseSpec, QualityRow

logger = logging.getLogger(__name__)

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


class _Helper:
    """One helper process and its pipes; one request in flight at a time."""

    def __init__(self) -> None:
        environment = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
        }
        self.owner = os.getpid()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dae.evaluation.helper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=environment,
        )
        if self.process.stdin is None or self.process.stdout is None:  # Popen types its pipes as optional
            raise RuntimeError("the evaluation helper started without its pipes")
        self.requests: IO[bytes] = self.process.stdin
        self.replies: IO[bytes] = self.process.stdout
        self.lock = threading.Lock()
        self.pending = False

    def send(self, name: str, header: dict[str, Any] | None = None, images: np.ndarray | None = None) -> None:
        with self.lock:
            if self.pending:  # an earlier reply nobody read (its publish failed): drop it
                self._receive()
            write_message(self.requests, {"name": name, **(header or {})}, images)
            self.pending = True

    def receive(self) -> Any:
        with self.lock:
            return self._receive()

    def _receive(self) -> Any:
        self.pending = False
        reply, _ = read_message(self.replies)
        if reply.get("status") != "ok":
            raise RuntimeError(f"the evaluation helper failed: {reply.get('error')}")
        return reply.get("value")

    def stop(self) -> None:
        for pipe in (self.requests, self.replies):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


_helper: _Helper | None = None


def _current_helper() -> _Helper | None:
    # A helper inherited through a fork belongs to the parent: never talk to it from here.
    return _helper if _helper is not None and _helper.owner == os.getpid() else None


def start_helper(*, wait: bool = False) -> None:
    """Start this process's helper (a no-op when it has one); it warms up (imports, first calls) on its own.
    `wait`: block until that warm-up is done (raises RuntimeError/EOFError when the helper cannot start)."""
    global _helper
    if _current_helper() is None:
        _helper = _Helper()
        _helper.send("warm_up")
    helper = _current_helper()
    if wait and helper is not None:
        if helper.pending:
            helper.receive()
        logger.info("evaluation helper process %d is ready", helper.process.pid)


def stop_helper() -> None:
    """Stop this process's helper, if it has one."""
    global _helper
    helper, _helper = _current_helper(), None
    if helper is not None:
        helper.stop()


def helper_running() -> bool:
    """Whether this process has a live helper."""
    helper = _current_helper()
    return helper is not None and helper.process.poll() is None


def helper_process() -> subprocess.Popen[bytes] | None:
    """This process's helper process (its pid, its exit status), if it started one."""
    helper = _current_helper()
    return helper.process if helper is not None else None


def reference_rows_later(
    test_images: np.ndarray, training_noise: NoiseSpec, *, seed: int = 0
) -> Callable[[], list[QualityRow]]:
    """Start reference_rows(test_images, training_noise, seed=seed) in the helper, if there is one; returns a
    function that gives the rows (waiting for the helper, or computing them inline)."""
    # Only the evaluation subset travels (1.6 MB for Fashion-MNIST, not the 31 MB test split); reference_rows
    # selects the same subset again, which returns it unchanged.
    subset = np.ascontiguousarray(select_test_images(np.asarray(test_images, dtype=np.float32), seed))

    def inline() -> list[QualityRow]:
        return reference_rows(subset, training_noise, seed=seed)

    helper = _current_helper()
    if helper is None or helper.process.poll() is not None:
        return inline
    header = {"training_noise": training_noise.model_dump(mode="json"), "seed": seed}
    try:
        helper.send("reference_rows", header, subset)
    except (OSError, EOFError, ValueError, RuntimeError):
        logger.warning("the evaluation helper is gone; computing the reference rows inline", exc_info=True)
        stop_helper()
        return inline

    answer: list[list[QualityRow]] = []  # the rows, once received: result() may be called again

    def result() -> list[QualityRow]:
        if not answer:
            try:
                answer.append([QualityRow.model_validate(row) for row in helper.receive()])
            except (OSError, EOFError, ValueError, RuntimeError, TypeError):
                logger.warning("the evaluation helper failed; computing the reference rows inline", exc_info=True)
                stop_helper()
                answer.append(inline())
        return answer[0]

    return result


# ---------------------------------------------------------------------------------------------
# The helper process
# ---------------------------------------------------------------------------------------------


def _warm_up() -> None:
    """Import the baselines and run them once on a tiny batch (skimage's lazy imports, first calls)."""
    images = np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32)
    reference_rows(images, NoiseSpec(type="gaussian", level=0.2), seed=0)


def _warm_up_reply(header: dict[str, Any], images: np.ndarray | None) -> None:
    del header, images  # a warm-up request carries nothing
    _warm_up()


_LENGTH = struct.Struct(">Q")


def write_message(stream: IO[bytes], header: dict[str, Any], images: np.ndarray | None = None) -> None:
    """One message: a length-prefixed JSON header and, if given, a length-prefixed .npy frame of `images`."""
    frames = [json.dumps({**header, "images": images is not None}).encode()]
    if images is not None:
        buffer = io.BytesIO()
        np.save(buffer, images, allow_pickle=False)
        frames.append(buffer.getvalue())
    for frame in frames:
        stream.write(_LENGTH.pack(len(frame)))
        stream.write(frame)
    stream.flush()


def _read_frame(stream: IO[bytes]) -> bytes:
    prefix = stream.read(_LENGTH.size)
    if len(prefix) < _LENGTH.size:
        raise EOFError("the pipe closed")
    (length,) = _LENGTH.unpack(prefix)
    frame = stream.read(length)
    if len(frame) < length:
        raise EOFError("the pipe closed inside a message")
    return frame


def read_message(stream: IO[bytes]) -> tuple[dict[str, Any], np.ndarray | None]:
    """The header and images of one message written by write_message; EOFError when the pipe is closed."""
    header = json.loads(_read_frame(stream))
    images = np.load(io.BytesIO(_read_frame(stream)), allow_pickle=False) if header.pop("images") else None
    return header, images


def _reference_rows_reply(header: dict[str, Any], images: np.ndarray | None) -> list[dict[str, Any]]:
    if images is None:
        raise ValueError("Expected the test images with a reference_rows request. Received: no images")
    noise = NoiseSpec.model_validate(header["training_noise"])
    rows = reference_rows(images, noise, seed=int(header["seed"]))
    return [row.model_dump(mode="json") for row in rows]


def serve(requests: IO[bytes], replies: IO[bytes]) -> None:
    """The helper's loop: answer each request with {"status": "ok", "value": ...} or an error until `requests` closes."""
    handlers: dict[str, Callable[[dict[str, Any], np.ndarray | None], Any]] = {
        "warm_up": _warm_up_reply,
        "reference_rows": _reference_rows_reply,
    }
    while True:
        try:
            header, images = read_message(requests)
        except EOFError:
            return
        try:
            reply = {"status": "ok", "value": handlers[header["name"]](header, images)}
        except Exception as error:  # reported to the parent, which computes inline instead
            reply = {"status": "error", "error": f"{type(error).__name__}: {error}"}
        write_message(replies, reply)


def main() -> None:
    """Entry point of `python -m dae.evaluation.helper`: the replies get a private copy of stdout, fd 1 becomes stderr."""
    with os.fdopen(os.dup(1), "wb") as replies:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        serve(sys.stdin.buffer, replies)


if __name__ == "__main__":
    main()
