"""Read-ahead of DISK pages into a fixed staging area, overlapping reads with compute."""
from __future__ import annotations

import collections
import dataclasses
import time

from storage.aligned import AlignedBuffer
from storage.disk_store import DiskExtentStore, TransferHandle

__all__ = ["Chunk", "ReadAhead"]


@dataclasses.dataclass(frozen=True, slots=True)
class Chunk:
    """A run of DISK pages of one layer read as one unit into one staging buffer."""

    layer: int
    first_page: int
    disk_slot: int
    num_pages: int


class ReadAhead:
    """Reads planned DISK chunks into a fixed set of staging buffers, ahead of their use.

    The consumer takes chunks in the planned order; each ``give_back`` of a buffer starts the
    next planned read, so reads of later chunks (and later layers) overlap the compute on
    earlier ones. A chunk asked for out of plan drops the plan and is read synchronously.
    Owned by the engine's thread; the store's threads only fill the buffers.
    """

    def __init__(self, store: DiskExtentStore, *, num_buffers: int, chunk_pages: int) -> None:
        self.store = store
        self.chunk_pages = chunk_pages
        self.buffers = [AlignedBuffer(chunk_pages * store.disk_page_bytes) for _ in range(num_buffers)]
        self._free = list(self.buffers)
        self._planned: collections.deque[Chunk] = collections.deque()
        self._inflight: collections.deque[tuple[Chunk, AlignedBuffer, TransferHandle]] = collections.deque()

    @property
    def staging_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def plan(self, chunks: list[Chunk]) -> None:
        self.reset()
        self._planned.extend(chunks)
        self._pump()

    def _read(self, c: Chunk, buf: AlignedBuffer) -> TransferHandle:
        view = buf.memoryview()[: c.num_pages * self.store.disk_page_bytes]
        return self.store.submit_read(c.layer, c.disk_slot, c.num_pages, view)

    def _pump(self) -> None:
        while self._free and self._planned:
            c = self._planned.popleft()
            buf = self._free.pop()
            self._inflight.append((c, buf, self._read(c, buf)))

    def take(self, c: Chunk) -> tuple[AlignedBuffer, float]:
        """The staging buffer holding chunk ``c`` and the seconds spent waiting for it."""
        if not (self._inflight and self._inflight[0][0] == c):
            self.reset()
            buf = self._free.pop()
            self._inflight.append((c, buf, self._read(c, buf)))
        _, buf, handle = self._inflight.popleft()
        t0 = time.perf_counter()
        try:
            handle.wait()
        except BaseException:
            self._free.append(buf)
            self.reset()
            raise
        return buf, time.perf_counter() - t0

    def give_back(self, buf: AlignedBuffer) -> None:
        self._free.append(buf)
        self._pump()

    def reset(self) -> None:
        """Drop the plan; wait for reads in flight (their errors no longer matter)."""
        self._planned.clear()
        while self._inflight:
            _, buf, handle = self._inflight.popleft()
            try:
                handle.wait()
            except OSError:
                pass
            self._free.append(buf)
