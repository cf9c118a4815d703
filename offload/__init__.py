"""Tiered KV-cache offloading runtime for long-context LLMs.

Public API: ``LongDocQA`` (ingest a document once, ask many questions), ``Engine`` (paged
prefill/decode), ``RuntimeConfig``, ``SamplingConfig`` and the errors in ``offload.errors``.

The names load on first use (PEP 562), so that commands which need no torch (``offload bench
--render``) start without importing it.
"""
from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "offload.api": ("Answer", "AnswerStream", "Doc", "LongDocQA"),
    "offload.config": ("RuntimeConfig",),
    "offload.engine": ("Engine",),
    "offload.errors": ("CacheDirError", "CapacityError", "ClosedError", "ContextTooLongError", "InputError",
                       "ModelNotFoundError", "OffloadError", "UnsupportedModelError"),
    "offload.sampling": ("SamplingConfig",),
    "offload.stats": ("RunStats",),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "Answer", "AnswerStream", "Doc", "LongDocQA", "RuntimeConfig", "Engine", "SamplingConfig",
    "RunStats", "OffloadError", "InputError", "ModelNotFoundError", "UnsupportedModelError",
    "ContextTooLongError", "CacheDirError", "CapacityError", "ClosedError",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'offload' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
