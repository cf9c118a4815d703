"""Tiered KV-cache offloading runtime for long-context LLMs.

Public API: ``LongDocQA`` (ingest a document once, ask many questions), ``Engine`` (paged
prefill/decode), ``RuntimeConfig``, ``SamplingConfig`` and the errors in ``offload.errors``.
"""
from offload.api import Answer, AnswerStream, Doc, LongDocQA
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.errors import (
    CacheDirError,
    CapacityError,
    ClosedError,
    ContextTooLongError,
    InputError,
    ModelNotFoundError,
    OffloadError,
    UnsupportedModelError,
)
from offload.sampling import SamplingConfig
from offload.stats import RunStats

__all__ = [
    "Answer", "AnswerStream", "Doc", "LongDocQA", "RuntimeConfig", "Engine", "SamplingConfig",
    "RunStats", "OffloadError", "InputError", "ModelNotFoundError", "UnsupportedModelError",
    "ContextTooLongError", "CacheDirError", "CapacityError", "ClosedError",
]
