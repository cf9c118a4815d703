"""Errors raised by the storage tiers.

``storage`` never imports ``offload``, so its I/O error lives here; it subclasses ``OSError``
so that callers catching ``OSError`` see it too. An async failure is stored in its transfer
handle and raised from ``wait()``, never only logged (STYLE B10).
"""
from __future__ import annotations

__all__ = ["StorageIOError", "describe_pages"]


def describe_pages(pages: list[int]) -> str:
    """Page ids as compact text: ``page 7``, ``pages 12-19`` or ``pages 1-3, 7, 9-10``."""
    if not pages:
        return "no pages"
    ordered = sorted(set(pages))
    runs: list[str] = []
    start = 0
    for i, p in enumerate(ordered):
        if i + 1 == len(ordered) or ordered[i + 1] != p + 1:  # p ends a run
            runs.append(str(ordered[start]) if start == i else f"{ordered[start]}-{p}")
            start = i + 1
    noun = "page" if len(ordered) == 1 else "pages"
    return f"{noun} {', '.join(runs)}"


class StorageIOError(OSError):
    """A read or write of KV pages failed (an OSError from the OS, or a short transfer).

    Attributes:
        op: ``"read"`` or ``"write"``.
        path: the file the I/O went to.
        layer: the layer whose pages were moved.
        pages: page ids of the failing call (ascending).
        errno: the OS error number, or None for a short read/write (no OS error).
        strerror: the OS message, or a description such as
            ``short read (got 4096 of 393216 bytes)``.
    """

    def __init__(self, op: str, path: str, layer: int, pages: list[int],
                 errno: int | None = None, strerror: str = "") -> None:
        super().__init__(errno, strerror, path)
        self.op = op
        self.path = path
        self.layer = layer
        self.pages = list(pages)

    @classmethod
    def from_os_error(cls, err: OSError, *, op: str, path: str, layer: int,
                      pages: list[int]) -> StorageIOError:
        """Wraps ``err`` (keep it as ``__cause__`` with ``raise ... from err``)."""
        return cls(op, path, layer, pages, err.errno, err.strerror or str(err))

    def __str__(self) -> str:
        where = "from" if self.op == "read" else "to"
        reason = self.strerror if self.errno is None else f"[Errno {self.errno}] {self.strerror}"
        return (f"{self.op} of {describe_pages(self.pages)} of layer {self.layer} "
                f"{where} {self.path} failed: {reason}")

    def __reduce__(self):  # OSError's own reduce would call __init__ with OSError's args
        return (type(self), (self.op, self.path, self.layer, self.pages, self.errno, self.strerror))
