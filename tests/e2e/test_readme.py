"""The README cannot rot: start the service the way it says (scripts/run-local, behind `make run`) and run
its curl walkthrough verbatim (only the port is changed when 8000 is taken)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import httpx
import pytest
from PIL import Image

from testing.processes import REPO_ROOT, wait_until
from testing.redis_server import free_port

pytestmark = pytest.mark.e2e

README = REPO_ROOT / "README.md"


def walkthrough_blocks() -> list[str]:
    """The ```bash blocks of the README's walkthrough section, in order."""
    text = README.read_text()
    section = re.search(r"^## Walkthrough.*?$(.*?)^## ", text, re.M | re.S)
    assert section, "README.md has no '## Walkthrough' section"
    blocks = re.findall(r"^```bash\n(.*?)^```", section.group(1), re.M | re.S)
    assert len(blocks) >= 4, blocks
    return blocks


def port_8000_is_free() -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 8000))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def running_service(tmp_path_factory: pytest.TempPathFactory):
    """scripts/run-local with its own redis-server (DAE_REDIS_URL unset), as a newcomer would run it."""
    root = tmp_path_factory.mktemp("readme")
    port = 8000 if port_8000_is_free() else free_port()
    env = {key: value for key, value in os.environ.items() if key != "DAE_REDIS_URL"}
    env.update(PORT=str(port), DAE_STORE_DIR=str(root / "store"), DAE_VAR_DIR=str(root / "var"))
    log = open(root / "run-local.log", "wb")
    started = time.monotonic()
    process = subprocess.Popen([str(REPO_ROOT / "scripts" / "run-local")], cwd=REPO_ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)

    def ready() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"run-local exited:\n{(root / 'run-local.log').read_text()[-3000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 60, "run-local's gateway to answer /readyz")
        ready_after_s = time.monotonic() - started
        yield port, root, ready_after_s
    finally:
        # Ctrl-C, as the README says: the script stops everything it started.
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def test_make_run_is_ready_quickly_and_the_walkthrough_works(running_service) -> None:
    port, root, ready_after_s = running_service
    assert ready_after_s < 60, f"/readyz answered only after {ready_after_s:.1f} s"
    workdir = root / "walkthrough"
    workdir.mkdir()
    script = "\n".join(walkthrough_blocks()).replace("localhost:8000", f"localhost:{port}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=workdir, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    output = result.stdout
    assert "event: epoch" in output and '"state": "succeeded"' in output.replace('"state":"succeeded"', '"state": "succeeded"')
    assert re.search(r"PSNR vs clean: input [\d.]+ dB -> denoised [\d.]+ dB", output), output
    assert re.search(r"(?i)x-mean-l1-error: [\d.]+", output), output
    for name in ("history.png", "samples.png", "denoised.png", "noisy.png", "error_heatmap.png", "denoised-upload.png"):
        with Image.open(workdir / name) as image:
            assert image.format == "PNG", name
