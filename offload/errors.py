"""Errors raised by the runtime.

Every user-facing error names what was wrong and how to fix it; the CLI prints its message
on one line and exits non-zero without a traceback.
"""
from __future__ import annotations

from storage.errors import StorageIOError

__all__ = [
    "StorageIOError",
    "OffloadError",
    "InputError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "ContextTooLongError",
    "CacheDirError",
    "CapacityError",
    "ClosedError",
]


class OffloadError(Exception):
    """Base class of every error this runtime raises on purpose."""


class InputError(OffloadError, ValueError):
    """A document, prompt or option that cannot be used as given."""


class ModelNotFoundError(OffloadError):
    """A model name or path that resolves to nothing usable."""


class UnsupportedModelError(OffloadError):
    """A model config that asks for a feature the runner does not implement."""


class ContextTooLongError(InputError):
    """A prompt (plus the tokens to generate) longer than the model's context window."""


class CacheDirError(OffloadError):
    """The cache directory cannot be created or written."""


class CapacityError(OffloadError):
    """A memory budget too small for the pages that must be held."""


class ClosedError(OffloadError):
    """An object used after its ``close()``."""
