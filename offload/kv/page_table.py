"""Page tables: where each page of a sequence lives, and the sequence's lengths per layer."""
from __future__ import annotations

import dataclasses
import enum
import heapq
from collections.abc import Iterator
from typing import TYPE_CHECKING

from storage import Tier

if TYPE_CHECKING:
    import torch

    from offload.kv.key_bounds import KeyBounds
    from offload.kv.lsh_index import LshIndex

__all__ = ["PageLocation", "PageTable", "KVSequence", "DiskSlots", "group_pages", "MIN_VIEW_PAGES", "LayerKind",
           "cdiv", "ring_pages"]


def cdiv(a: int, b: int) -> int:
    """Ceiling of a / b for b > 0 (pages of a token count, chunks of a page count)."""
    return -(-a // b)


class LayerKind(enum.Enum):
    """How a layer keeps its KV: GLOBAL layers keep every page, placed on the tiers; SLIDING
    layers (Gemma 3's local layers) keep a DEVICE ring of the pages their window still sees."""

    GLOBAL = "global"
    SLIDING = "sliding"

# Runs of at least this many consecutive slots are attended through views; shorter runs are
# gathered together (one copy) so a fragmented table does not become many tiny matmuls.
MIN_VIEW_PAGES = 4


@dataclasses.dataclass(frozen=True, slots=True)
class PageLocation:
    """Where a page lives: its tier and slot, and whether it is packed (a 4-bit page in a
    ``PackedArena`` slot or a packed DISK slot; ``offload.kv.quant_pages``) or exact."""

    tier: Tier
    slot: int
    packed: bool = False


class PageTable:
    """(layer, page_id) -> PageLocation for one sequence. page_ids of a layer are dense from 0.

    A sliding-window layer drops the pages no later query can see: its pages before
    ``first_live(layer)`` hold no slot any more (their entries are stale and never read).
    """

    def __init__(self, num_layers: int) -> None:
        # Parallel lists per layer (tier, slot and format of each page), so the hot path
        # reads a layer's slots without building objects.
        self._tiers: list[list[Tier]] = [[] for _ in range(num_layers)]
        self._slots: list[list[int]] = [[] for _ in range(num_layers)]
        self._packed: list[list[bool]] = [[] for _ in range(num_layers)]
        self._first = [0] * num_layers

    def first_live(self, layer: int) -> int:
        """The layer's first page that still holds a slot (0 unless pages were dropped)."""
        return self._first[layer]

    def drop_before(self, layer: int, page_id: int) -> None:
        """Mark the layer's pages before ``page_id`` as dropped (the caller frees their slots)."""
        self._first[layer] = max(self._first[layer], page_id)

    def clear(self, layer: int) -> None:
        """Forget the layer's pages (the caller freed their slots): it is empty again."""
        self._tiers[layer].clear()
        self._slots[layer].clear()
        self._packed[layer].clear()
        self._first[layer] = 0

    def lookup(self, layer: int, page_id: int) -> PageLocation:
        return PageLocation(self._tiers[layer][page_id], self._slots[layer][page_id], self._packed[layer][page_id])

    def num_pages(self, layer: int) -> int:
        return len(self._slots[layer])

    def append(self, layer: int, loc: PageLocation) -> None:
        self._tiers[layer].append(loc.tier)
        self._slots[layer].append(loc.slot)
        self._packed[layer].append(loc.packed)

    def replace(self, layer: int, page_id: int, loc: PageLocation) -> None:
        self._tiers[layer][page_id] = loc.tier
        self._slots[layer][page_id] = loc.slot
        self._packed[layer][page_id] = loc.packed

    def slots(self, layer: int) -> list[int]:
        """The layer's slots in page order (the table's own list: do not modify it)."""
        return self._slots[layer]

    def tiers(self, layer: int) -> list[Tier]:
        """The layer's tiers in page order (the table's own list: do not modify it)."""
        return self._tiers[layer]

    def packed(self, layer: int) -> list[bool]:
        """Per page of the layer, whether it is packed (the table's own list: do not modify it)."""
        return self._packed[layer]

    def copy(self) -> "PageTable":
        other = PageTable(len(self._slots))
        other._tiers = [list(layer) for layer in self._tiers]
        other._slots = [list(layer) for layer in self._slots]
        other._packed = [list(layer) for layer in self._packed]
        other._first = list(self._first)
        return other


@dataclasses.dataclass(slots=True)
class KVSequence:
    """A sequence's pages and how many tokens each layer holds.

    During layer-wise prefill the layers' lengths differ; between forward passes they are equal.
    """

    table: PageTable
    lengths: list[int]
    released: bool = False
    bounds: KeyBounds | None = None  # the global layers' key bounds (``offload.kv.key_bounds``)
    # Per global layer, the last prefill's prompt prior [pages] (``offload.attention.prompt_prior``),
    # kept only in a sparse mode.
    prior: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    lsh: LshIndex | None = None  # the global layers' SimHash tables (``offload.kv.lsh_index``), lsh mode only

    @property
    def num_tokens(self) -> int:
        return self.lengths[-1]

    def track_keys(self, layer: int, start: int, k: torch.Tensor) -> None:
        """Keys k [T, num_kv_heads, head_dim] appended to ``layer`` from token ``start``: the
        key bounds and the LSH tables (where kept) follow them."""
        if self.bounds is not None:
            self.bounds.update(layer, start, k)
        if self.lsh is not None:
            self.lsh.add(layer, start, k)


class DiskSlots:
    """Reference-counted page positions in one layer's file; new runs are contiguous."""

    def __init__(self) -> None:
        self.next = 0
        self.free: list[int] = []
        self.refs: dict[int, int] = {}

    def allocate(self, n: int) -> list[int]:
        if n == 1 and self.free:
            slots = [heapq.heappop(self.free)]
        else:  # a fresh contiguous run: one extent, one read
            slots = list(range(self.next, self.next + n))
            self.next += n
        for s in slots:
            self.refs[s] = 1
        return slots

    def incref(self, slots: list[int]) -> None:
        for s in slots:
            self.refs[s] += 1

    def free_slots(self, slots: list[int]) -> int:
        """Drop references; returns how many slots became free."""
        freed = 0
        for s in slots:
            self.refs[s] -= 1
            if self.refs[s] == 0:
                del self.refs[s]
                heapq.heappush(self.free, s)
                freed += 1
        return freed

    @property
    def num_used(self) -> int:
        return len(self.refs)


def group_pages(slots: list[int], max_pages: int) -> Iterator[tuple[int, list[int], bool]]:
    """Split a layer's slots into (first page_id, slots, contiguous) groups of <= max_pages
    pages; ``contiguous`` says the group's slots are consecutive ascending.

    Long runs of consecutive slots become their own groups (read as views); short runs are
    packed together (read by one gather).
    """
    pending: list[int] = []
    pending_first = 0
    i = 0
    n = len(slots)
    while i < n:
        j = i + 1
        while j < n and slots[j] == slots[j - 1] + 1:
            j += 1
        if j - i >= MIN_VIEW_PAGES:
            if pending:
                yield pending_first, pending, False
                pending = []
            for s in range(i, j, max_pages):
                yield s, slots[s : min(j, s + max_pages)], True
        else:
            for p in range(i, j):
                if not pending:
                    pending_first = p
                pending.append(slots[p])
                if len(pending) == max_pages:
                    yield pending_first, pending, False
                    pending = []
        i = j
    if pending:
        yield pending_first, pending, False


def ring_pages(window: int, page_size: int) -> int:
    """Most pages a sliding layer of ``window`` keys holds at once: the pages covering the
    ``window`` tokens before the newest one, plus the page the newest token starts."""
    return cdiv(window + page_size - 1, page_size)
