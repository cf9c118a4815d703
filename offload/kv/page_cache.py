"""DISK pages a sparse decode step attended, kept in memory for the next steps.

A sparse step reads few pages, and mostly the same ones step after step: the prompt prior's
pages and the live pool are fixed for a question (``offload.attention.quest``), and the live
query's choice moves slowly. Reading them from DISK again every step costs the disk time and,
on a CPU machine, the cores the readers take from compute. The cache keeps the pages a step
read from DISK in an arena on the compute device (RAM on a CPU-only machine), keyed by
(layer, DISK slot), and a later step's read set attends them there (``PieceKind.CACHED``).

Rules:
- A DISK slot's bytes never change while it is allocated (a page is written once, whole), so
  an entry is valid until its slot is allocated again: ``PagedKV`` forgets the slots it hands
  out. Sequences sharing a document's pages (forks) share its entries.
- Entries a step has named are kept through that step (``begin_step``); when the arena is
  full, a fill replaces the entries used longest ago, never one named this step (it is
  skipped instead).
- Exact pages only (4-bit and sampled pieces are not cached), filled where a DISK chunk is
  attended in its staging buffer (the CPU route; CUDA's unpacked groups do not fill it yet).
- Off unless ``RuntimeConfig.sparse_cache_bytes`` gives it room (its bytes are reported in the
  stats' peak DEVICE bytes, beside the arena's).
"""
from __future__ import annotations

import collections

import torch

from offload.config import Sparse
from storage import PageArena

__all__ = ["DiskPageCache", "page_cache_for"]


class DiskPageCache:
    """An arena of ``arena.num_slots`` pages holding DISK pages read by sparse steps."""

    def __init__(self, arena: PageArena) -> None:
        self.arena = arena
        self._where: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()  # LRU first
        self._named: dict[tuple[int, int], int] = {}  # key -> the step that last named it
        self._step = 0
        self.hits = 0  # pages served from the cache
        self.fills = 0  # pages copied in

    def begin_step(self) -> None:
        """A new decode step: entries named from now on are kept through it."""
        self._step += 1

    def lookup(self, layer: int, disk_slots: list[int]) -> list[int | None]:
        """The cache slot of each DISK slot of ``layer`` (None: not cached); those found are
        kept through this step."""
        out: list[int | None] = []
        for s in disk_slots:
            key = (layer, s)
            slot = self._where.get(key)
            if slot is not None:
                self._where.move_to_end(key)
                self._named[key] = self._step
                self.hits += 1
            out.append(slot)
        return out

    def fill(self, layer: int, disk_slots: list[int], k: torch.Tensor, v: torch.Tensor, positions: list[int]) -> None:
        """Copy pages of ``layer`` (DISK slots ``disk_slots``) from a staging buffer's views k,
        v [num_kv_heads, n, page_size, head_dim] at ``positions`` into the cache, as room allows."""
        want = [(s, p) for s, p in zip(disk_slots, positions) if (layer, s) not in self._where]
        slots: list[int] = []
        for _ in want:
            slot = self._free_slot()
            if slot is None:
                break
            slots.append(slot)
        if not slots:
            return
        want = want[:len(slots)]
        index = torch.tensor([p for _, p in want], dtype=torch.int64)
        self.arena.write_pages(slots, k.index_select(1, index), v.index_select(1, index))
        for (s, _), slot in zip(want, slots):
            self._where[(layer, s)] = slot
            self._named[(layer, s)] = self._step
        self.fills += len(slots)

    def forget(self, layer: int, disk_slots: list[int]) -> None:
        """DISK slots about to hold other pages: their entries go."""
        for s in disk_slots:
            slot = self._where.pop((layer, s), None)
            if slot is not None:
                self._named.pop((layer, s), None)
                self.arena.free([slot])

    def _free_slot(self) -> int | None:
        got = self.arena.allocate(1)
        if got:
            return got[0]
        for key in self._where:  # oldest first: the first one this step has not named
            if self._named.get(key) != self._step:
                slot = self._where.pop(key)
                self._named.pop(key, None)
                return slot
        return None

    @property
    def pages(self) -> int:
        return len(self._where)


def page_cache_for(engine) -> DiskPageCache | None:
    """The engine's page cache: ``RuntimeConfig.sparse_cache_bytes`` of pages on the compute
    device, for a sparse mode whose DISK pages are attended in their staging buffer (CPU
    only for now); None otherwise."""
    c, kv = engine.config, engine.kv
    if (not c.sparse_cache_bytes or c.sparse == Sparse.EXACT or kv.disk is None or kv.packed is not None
            or engine.device.type != "cpu"):
        return None
    a = kv.arena
    slots = c.sparse_cache_bytes // a.slot_bytes
    if slots < 1:
        return None
    return DiskPageCache(PageArena(num_slots=int(slots), num_kv_heads=a.num_kv_heads, page_size=a.page_size,
                                   head_dim=a.head_dim, dtype=a.dtype, device=engine.device))
