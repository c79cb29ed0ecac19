"""Baseline (b), "the ceiling": the same FastAPI/uvicorn stack answering every POST with a constant JSON body.

    uvicorn bench.baselines.constant_app:app

It receives the very request the gateway gets (the body is read, not parsed) and returns a small constant JSON
document, so its requests/s is what one uvicorn process can do on this machine with no work at all: no
gateway can exceed it, and the gateway's share of it says how much of the time goes to actual work.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import Response

app = FastAPI(title="Constant baseline")

CONSTANT_BODY = b'{"model":{"id":"constant","name":"constant","version":1},"results":[],"mean_error":0.0}'


@app.post("/reconstruct")
async def reconstruct(request: Request) -> Response:
    """Read the body, answer a constant JSON document."""
    await request.body()
    return Response(CONSTANT_BODY, media_type="application/json")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness (the benchmark waits for it)."""
    return {"status": "ok"}
