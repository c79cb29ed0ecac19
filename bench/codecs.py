"""PNG decode/encode speed of the maintained codecs against the gateway's former hand-written code (2026-12-02).

    .venv/bin/python -m bench.codecs [--repeat 2000]

Candidates (install them into the venv to measure; only the chosen one is pinned): Pillow's public API, pyspng
(decode only), imagecodecs (libpng and libspng), opencv-python-headless; simplejpeg for JPEG decode. "today" is
the code issue 13 removed (service/png_reader.py and the writer of service/images.py at commit c708489), read
from git so this script runs after it is gone. Each figure is the median of 7 runs of `--repeat` calls, in µs per
image, on 28x28 gray (the served digits) and 512x512 gray and RGB images of smooth noise.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
TODAY_COMMIT = "c708489"


def load_today() -> tuple[object, object] | None:
    """The former modules service/png_reader.py and service/images.py, imported from git under other names."""
    directory = Path(tempfile.mkdtemp(prefix="dae-codecs-"))
    modules = []
    for name in ("png_reader", "images"):
        try:
            source = subprocess.run(["git", "show", f"{TODAY_COMMIT}:service/{name}.py"], cwd=REPO_ROOT,
                                    capture_output=True, check=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None
        source = source.replace("from service.png_reader import", "from today_png_reader import")
        (directory / f"today_{name}.py").write_text(source)
    sys.path.insert(0, str(directory))
    for name in ("today_png_reader", "today_images"):
        spec = importlib.util.spec_from_file_location(name, directory / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return modules[0], modules[1]


def images() -> dict[str, np.ndarray]:
    """uint8 test images: smooth random fields, like denoised outputs (not white noise, which no codec shrinks)."""
    rng = np.random.default_rng(0)

    def smooth(height: int, width: int, channels: int) -> np.ndarray:
        coarse = rng.random((height // 4 + 1, width // 4 + 1, channels))
        field = np.repeat(np.repeat(coarse, 4, axis=0), 4, axis=1)[:height, :width]
        return np.rint(field * 255).astype(np.uint8)

    return {"28x28 gray": smooth(28, 28, 1), "512x512 gray": smooth(512, 512, 1), "512x512 RGB": smooth(512, 512, 3)}


def timed(function: Callable[[], object], repeat: int) -> float:
    """Median over 7 runs of the µs per call."""
    runs = []
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(repeat):
            function()
        runs.append((time.perf_counter() - started) / repeat * 1e6)
    return statistics.median(runs)


def pillow_png(array: np.ndarray, level: int = 1) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(buffer, "PNG", compress_level=level)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2000, help="calls per run for 28x28 (512x512: a twentieth)")
    arguments = parser.parse_args()
    today = load_today()
    decoders: dict[str, Callable[[bytes], np.ndarray]] = {
        "pillow Image.open+asarray": lambda data: np.asarray(Image.open(io.BytesIO(data))),
    }
    encoders: dict[str, Callable[[np.ndarray], bytes]] = {"pillow save(compress_level=1)": pillow_png}
    if today is not None:
        reader, writer = today
        decoders["today (png_reader, Pillow's C core)"] = lambda data: reader.read_simple_png(data, max_side=65535)
        encoders["today (hand-written writer)"] = lambda array: writer.encode_png(array.astype(np.float32) / 255)
    try:
        import pyspng

        decoders["pyspng.load"] = pyspng.load
    except ImportError:
        pass
    try:
        import imagecodecs

        decoders["imagecodecs.png_decode"] = imagecodecs.png_decode
        decoders["imagecodecs.spng_decode"] = imagecodecs.spng_decode
        encoders["imagecodecs.png_encode(level=1)"] = lambda array: imagecodecs.png_encode(array, level=1)
        encoders["imagecodecs.spng_encode(level=1)"] = lambda array: imagecodecs.spng_encode(array, level=1)
    except ImportError:
        pass
    try:
        import cv2

        decoders["cv2.imdecode"] = lambda data: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        encoders["cv2.imencode(level 1)"] = lambda array: cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1]
    except ImportError:
        pass
    print(f"bench/codecs.py, {time.strftime('%Y-%m-%d')}: µs per image (median of 7 runs), Pillow {Image.__version__}")
    for label, array in images().items():
        repeat = arguments.repeat if array.shape[0] < 100 else max(20, arguments.repeat // 20)
        data = pillow_png(array)
        print(f"\n{label}: decode (a Pillow level-1 PNG of {len(data)} bytes)")
        for name, decode in decoders.items():
            decoded = np.asarray(decode(data)).reshape(array.shape)
            if not np.array_equal(decoded, array):
                print(f"  {name:40s} wrong pixels, skipped")
                continue
            print(f"  {name:40s} {timed(lambda decode=decode, data=data: decode(data), repeat):9.1f}")
        print(f"{label}: encode")
        for name, encode in encoders.items():
            encoded = bytes(encode(array))
            size = len(encoded)
            roundtrip = np.asarray(Image.open(io.BytesIO(encoded))).reshape(array.shape)
            status = "" if np.array_equal(roundtrip, array) else "  (pixels differ)"
            print(f"  {name:40s} {timed(lambda encode=encode, array=array: encode(array), repeat):9.1f}  {size:8d} bytes{status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
