"""Handles on the processes of one end-to-end test module (started by the `stack` fixture)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from testing.gateway import GatewayProcess
from testing.processes import CeleryWorker


@dataclass
class Stack:
    """Handles on the running processes."""

    gateway: GatewayProcess
    worker: CeleryWorker
    store_dir: Path
    client: httpx.Client
