"""Serving models: onnxruntime sessions (sessions), a payload-agnostic micro-batcher (batcher), the engine that
joins them for images (engine)."""

from service.inference.engine import Denoised, InferenceEngine
from service.inference.sessions import LoadedModel

__all__ = ["Denoised", "InferenceEngine", "LoadedModel"]
