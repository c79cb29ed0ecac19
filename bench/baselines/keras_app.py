"""Baseline (a), "the usual way": a minimal FastAPI app that denoises with Keras `model.predict` per request.

    BENCH_KERAS_MODEL=/path/model.keras uvicorn bench.baselines.keras_app:app

What a first version of a model server typically looks like: the `.keras` file loaded once at start-up, a
pydantic body of nested lists (`{"pixels": [[...], ...]}`, H×W in [0, 1]), a synchronous route (FastAPI runs it
in its thread pool) that calls `model.predict` on a batch of one, and the output returned as nested lists.
No batching across requests, no ONNX, stock JSON. It is deliberately not tuned: it is the reference the gateway's
speed-up is measured against.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import keras
import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel

import dae.losses  # noqa: F401 - registers the custom Keras objects a DAE model file refers to
import dae.models  # noqa: F401
import dae.training  # noqa: F401 - registers DenoisingAutoencoder, the class of a trained model's file

_state: dict[str, Any] = {}


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    """Load the model named by BENCH_KERAS_MODEL once (safe_mode stays on)."""
    _state["model"] = keras.saving.load_model(os.environ["BENCH_KERAS_MODEL"], compile=False, safe_mode=True)
    yield
    _state.clear()


app = FastAPI(title="Keras baseline", lifespan=lifespan)


class PixelsIn(BaseModel):
    """One gray image as nested lists."""

    pixels: list[list[float]]


class PixelsOut(BaseModel):
    """The denoised image as nested lists."""

    denoised: list[list[float]]


@app.post("/reconstruct")
def reconstruct(body: PixelsIn) -> PixelsOut:
    """Denoise one image with model.predict."""
    image = np.asarray(body.pixels, dtype=np.float32)[np.newaxis, :, :, np.newaxis]
    output = _state["model"].predict(image, verbose=0)
    return PixelsOut(denoised=np.clip(output[0, :, :, 0], 0.0, 1.0).tolist())


@app.get("/healthz")
def healthz() -> dict[str, str]:
    """Liveness (the benchmark waits for it)."""
    return {"status": "ok"}
