"""Page-aligned host buffers for O_DIRECT I/O.

O_DIRECT needs the buffer address, the file offset and the length to be multiples of the
logical block size (4 KiB is safe everywhere); misaligned buffers fail with EINVAL. Memory
from an anonymous ``mmap`` starts on a page boundary, so it qualifies without copying.
"""
from __future__ import annotations

import logging
import mmap

import numpy as np
import torch

__all__ = ["AlignedBuffer", "round_up", "DISK_ALIGNMENT"]

logger = logging.getLogger(__name__)

DISK_ALIGNMENT = 4096
"""Alignment (bytes) of O_DIRECT buffers, file offsets and lengths."""


def round_up(n: int, a: int) -> int:
    """The smallest multiple of ``a`` that is >= ``n`` (``n >= 0``, ``a >= 1``)."""
    if a < 1:
        raise ValueError(f"alignment must be >= 1, got {a}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return -(-n // a) * a


class AlignedBuffer:
    """A zero-filled host buffer whose address and size are multiples of ``alignment``.

    The memory is an anonymous ``mmap`` (page-aligned); for an alignment above the OS page
    size the map is over-allocated and the view starts at the first aligned address.

    Views (``memoryview()``, ``numpy()``, ``torch()``) share the memory without copying.
    While any view is alive, ``close()`` raises ``BufferError`` (mmap refuses to unmap
    exported memory), so a view can never dangle.

    Args:
        nbytes: requested size (>= 1); rounded up to ``alignment``.
        alignment: a power of two (default 4096).
    """

    def __init__(self, nbytes: int, alignment: int = DISK_ALIGNMENT) -> None:
        if nbytes < 1:
            raise ValueError(f"nbytes must be >= 1, got {nbytes}")
        if alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.alignment = alignment
        self.nbytes = round_up(nbytes, alignment)
        slack = 0 if alignment <= mmap.PAGESIZE else alignment
        self._map: mmap.mmap | None = mmap.mmap(-1, self.nbytes + slack)
        self._offset = 0
        if slack:
            base = np.frombuffer(self._map, dtype=np.uint8, count=1).ctypes.data
            self._offset = round_up(base, alignment) - base
        assert self.address % alignment == 0

    @property
    def closed(self) -> bool:
        return self._map is None

    def _mmap(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("AlignedBuffer is closed")
        return self._map

    @property
    def address(self) -> int:
        """Virtual address of the first byte."""
        return int(self.numpy().ctypes.data)

    def memoryview(self) -> memoryview:
        """Writable byte view (format ``B``) of all ``nbytes`` bytes."""
        return memoryview(self._mmap())[self._offset:self._offset + self.nbytes]

    def numpy(self) -> np.ndarray:
        """Writable ``np.uint8`` array ``[nbytes]`` on the same memory (no copy)."""
        return np.frombuffer(self._mmap(), dtype=np.uint8, count=self.nbytes, offset=self._offset)

    def torch(self) -> torch.Tensor:
        """``torch.uint8`` CPU tensor ``[nbytes]`` on the same memory (no copy)."""
        # Through a memoryview: torch.frombuffer on the mmap itself does not hold a buffer
        # export, so mmap.close() would succeed and leave the tensor dangling.
        return torch.frombuffer(self.memoryview(), dtype=torch.uint8)

    def close(self) -> None:
        """Unmaps the memory (idempotent). Raises BufferError while a view is alive."""
        if self._map is not None:
            self._map.close()
            self._map = None

    def __enter__(self) -> AlignedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"at 0x{self.address:x}"
        return f"AlignedBuffer(nbytes={self.nbytes}, alignment={self.alignment}, {state})"
