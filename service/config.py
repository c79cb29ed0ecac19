"""Settings of the gateway process, read from `DAE_*` environment variables.

One `Settings` object per process, reached through `get_settings()` (cached) or, inside requests, through
the `SettingsDep` dependency (the settings the app was created with). Tests pass `Settings(...)` explicitly.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from core.settings import SharedSettings
from dae.cost import DEFAULT_MAX_MODEL_PARAMS, DEFAULT_MAX_TRAINING_MEMORY_MIB
from service.auth import KeyRing


def _default_intra_op_threads() -> int:
    """Threads per onnxruntime run: half the cores (the event loop and HTTP parsing need the rest), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


class Settings(SharedSettings):
    """Everything the gateway can be configured with; each field maps to `DAE_<FIELD NAME>`."""

    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys as owner:role:secret (role infer, train or admin), comma-separated in the "
        "environment; a bare secret is the default owner's admin key. Empty (and no DAE_API_KEYS_FILE): auth is off.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of more keys, one owner:role:secret per line (# comments and blank lines skipped)."
    )
    metrics_require_key: bool = Field(
        False, description="Serve /metrics only to admin keys (default: open, as Prometheus usually scrapes it)."
    )
    opentelemetry: bool = Field(
        False, description="FastAPI's native OpenTelemetry (traces, metrics, logs through the global providers); off, "
        "requests skip its provider checks (~10 µs each, bench/README.md).",
    )
    docs_require_key: bool = Field(
        False, description="Serve /docs, /redoc and /openapi.json only with a valid key (default: open)."
    )

    # Request limits.
    max_upload_mb: float = Field(64.0, gt=0, le=4096, description="Largest request body (uploads included), MiB.")
    max_batch_images: int = Field(1024, ge=1, le=65536, description="Most images in one /reconstruct request.")
    max_image_side: int = Field(2048, ge=8, le=16384, description="Longest accepted image side, pixels.")
    # 64 M float32 values = 256 MiB of decoded input: a few full-size 2048² images or a batch of 1024 256² ones;
    # the body limit already lets ~48 M uint8 values in as a raw array, and PNGs compress far below that.
    max_request_pixels: int = Field(
        64 * 1024 * 1024, ge=1,
        description="Most pixel values (height × width × channels, alpha not counted, over all images and clean "
        "references) one /reconstruct request may decode; checked from the image headers before decoding (413).",
    )
    max_epochs: int = Field(200, ge=1, le=1000, description="Most epochs a submitted job may ask for.")
    max_dataset_images: int = Field(100_000, ge=1, description="Most images in an uploaded dataset.")
    max_model_params: int = Field(
        DEFAULT_MAX_MODEL_PARAMS, ge=1, description="Most parameters a submitted job's model may have (estimated exactly)."
    )
    max_training_memory_mib: float = Field(
        DEFAULT_MAX_TRAINING_MEMORY_MIB, gt=0,
        description="Most training memory a submitted job may need (weights, optimizer state, gradients, one batch's "
        "activations, training images; estimated), MiB.",
    )
    max_dataset_mb: float = Field(
        256.0, gt=0, description="Largest decoded upload (its images as float32, what training loads), MiB."
    )
    max_store_datasets_gb: float = Field(
        10.0, gt=0, description="Most disk all uploaded datasets may take together (compressed files), GiB."
    )

    # Inference (service/inference/).
    inference_cache_size: int = Field(16, ge=1, le=1024, description="Most onnxruntime sessions kept loaded.")
    inference_memory_budget_mib: float = Field(
        1024.0, gt=0, description="Estimated memory all loaded sessions may take; least recently used ones go first."
    )
    inference_batch_max_size: int = Field(
        64, ge=1, le=65536, description="A micro-batch closes when it holds this many images."
    )
    # One 512² gray image (334 of 28², so the image count decides for small ones): a run of the default conv DAE
    # peaks ~170 MiB at this size, ~360 MiB at 4x (bench/README.md, 2026-12-02).
    inference_batch_max_values: int = Field(
        256 * 1024, ge=1,
        description="A micro-batch also closes when it holds this many pixel values (H × W × channels, padded); a "
        "larger request runs in pieces of at most this size and DAE_INFERENCE_BATCH_MAX_SIZE images.",
    )
    inference_batch_timeout_ms: float = Field(
        1.0, ge=0, le=1000, description="A micro-batch closes this long after its first request arrived."
    )
    # Values, not images: 4096 images were 3 M values at 28² but 16 G at 2048². The default admits one request at
    # DAE_MAX_REQUEST_PIXELS (256 MiB of float32 waiting at most).
    inference_queue_max_values: int = Field(
        64 * 1024 * 1024, ge=1,
        description="Most pixel values (H × W × channels, padded) waiting or running per gateway process; above it "
        "/reconstruct answers 503 with Retry-After (413 for one request larger than this).",
    )
    inference_queue_bound: int | None = Field(
        None, description="Removed (it counted images): set DAE_INFERENCE_QUEUE_MAX_VALUES; set, the gateway refuses "
        "to start.",
    )
    inference_intra_op_threads: int = Field(
        default_factory=_default_intra_op_threads, ge=1, le=256, description="onnxruntime threads per run."
    )
    inference_workers: int = Field(
        1, ge=1, le=64, description="Micro-batches that may run at the same time (threads calling onnxruntime)."
    )
    retry_after_s: int = Field(
        1, ge=1, le=3600,
        description="Retry-After sent with every 503 (serving queue full, job store or broker unavailable).",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_api_keys(cls, value: Any) -> Any:
        """Accept "key1,key2" (the environment form) as well as a list."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("inference_queue_bound")
    @classmethod
    def _refuse_removed_queue_bound(cls, value: int | None) -> None:
        """An operator's old image-count bound must not be ignored silently: it would no longer bound anything."""
        if value is not None:
            raise ValueError(
                "DAE_INFERENCE_QUEUE_BOUND counted images and was removed. Expected DAE_INFERENCE_QUEUE_MAX_VALUES "
                f"(pixel values: images × H × W × channels). Received: DAE_INFERENCE_QUEUE_BOUND={value}"
            )
        return None

    @property
    def max_upload_bytes(self) -> int:
        """`max_upload_mb` in bytes."""
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def auth_enabled(self) -> bool:
        """True when at least one API key is configured."""
        return bool(self.api_keys) or (self.api_keys_file is not None and self.key_ring().enabled)

    def key_ring(self) -> KeyRing:
        """The configured keys (ValueError naming a bad entry by position, never its secret)."""
        return KeyRing.from_settings([key.get_secret_value() for key in self.api_keys], self.api_keys_file)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
