"""Paged KV cache: page tables per sequence over the tier pools.

A page is ``page_size`` consecutive tokens of one layer's K and V for all KV heads. Each
sequence has a ``PageTable`` mapping (layer, page_id) -> (tier, slot). In this version every
page lives on the DEVICE tier (the arena); HOST and DISK arrive with the Tiers issue.

Sharing: ``fork`` gives a new sequence that shares the parent's full pages (reference
counted) and owns a copy of the parent's partly filled last page (copy-on-write), so tokens
appended to the fork never touch the parent's pages. This is how a question's KV is scratch.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import torch

from offload.errors import CapacityError
from storage import DeviceArena, Tier

__all__ = ["PageLocation", "PageTable", "KVSequence", "PagedKV", "PageGroup"]

logger = logging.getLogger(__name__)

# Runs of at least this many consecutive slots are attended through views; shorter runs are
# gathered together (one copy) so a fragmented table does not become many tiny matmuls.
MIN_VIEW_PAGES = 4


@dataclasses.dataclass(frozen=True, slots=True)
class PageLocation:
    tier: Tier
    slot: int


class PageTable:
    """(layer, page_id) -> PageLocation for one sequence. page_ids of a layer are dense from 0."""

    def __init__(self, num_layers: int) -> None:
        # Parallel lists per layer (tier and slot of each page), so the hot path reads a
        # layer's slots without building objects.
        self._tiers: list[list[Tier]] = [[] for _ in range(num_layers)]
        self._slots: list[list[int]] = [[] for _ in range(num_layers)]

    def lookup(self, layer: int, page_id: int) -> PageLocation:
        return PageLocation(self._tiers[layer][page_id], self._slots[layer][page_id])

    def num_pages(self, layer: int) -> int:
        return len(self._slots[layer])

    def append(self, layer: int, loc: PageLocation) -> None:
        self._tiers[layer].append(loc.tier)
        self._slots[layer].append(loc.slot)

    def replace(self, layer: int, page_id: int, loc: PageLocation) -> None:
        self._tiers[layer][page_id] = loc.tier
        self._slots[layer][page_id] = loc.slot

    def slots(self, layer: int) -> list[int]:
        """The layer's slots in page order (the table's own list: do not modify it)."""
        return self._slots[layer]

    def copy(self) -> "PageTable":
        other = PageTable(len(self._slots))
        other._tiers = [list(layer) for layer in self._tiers]
        other._slots = [list(layer) for layer in self._slots]
        return other


@dataclasses.dataclass(slots=True)
class KVSequence:
    """A sequence's pages and how many tokens each layer holds.

    During layer-wise prefill the layers' lengths differ; between forward passes they are equal.
    """

    table: PageTable
    lengths: list[int]
    released: bool = False

    @property
    def num_tokens(self) -> int:
        return self.lengths[-1]


@dataclasses.dataclass(frozen=True, slots=True)
class PageGroup:
    """K/V of consecutive pages of one layer, for one attention partial.

    k, v: [num_kv_heads, num_tokens, head_dim] (a view of the arena or a gathered copy).
    start_pos: position of the first token.
    """

    k: torch.Tensor
    v: torch.Tensor
    start_pos: int


class PagedKV:
    """Owns the DEVICE arena and the pages of every live sequence.

    Args:
        arena: the slot pool.
        num_layers: layers per sequence.
        shuffle_seed: if set, pages take random free slots (tests of real paging).
    """

    def __init__(self, arena: DeviceArena, num_layers: int, *, shuffle_seed: int | None = None) -> None:
        self.arena = arena
        self.num_layers = num_layers
        self.page_size = arena.page_size
        self._shuffle = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)

    def new_sequence(self) -> KVSequence:
        return KVSequence(PageTable(self.num_layers), [0] * self.num_layers)

    def _allocate(self, n: int, needed_tokens: int) -> list[int]:
        slots = (self.arena.allocate(n) if self._shuffle is None
                 else self.arena.allocate_shuffled(n, self._shuffle))
        if slots is None:
            capacity = self.arena.num_slots * self.page_size // self.num_layers
            raise CapacityError(
                f"the DEVICE KV arena is full: it holds {self.arena.num_slots} pages "
                f"({capacity} tokens of all {self.num_layers} layers) and {self.arena.num_used} are in use; "
                f"this step needs {n} more for {needed_tokens} tokens; raise --device-memory "
                f"(a page is {self.arena.slot_bytes} bytes)"
            )
        return slots

    def append(self, seq: KVSequence, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write K/V of the next tokens of ``layer`` into its pages, adding pages as needed.

        Args:
            k, v: [T, num_kv_heads, head_dim].
        """
        assert not seq.released
        t = k.shape[0]
        start = seq.lengths[layer]
        end = start + t
        have = seq.table.num_pages(layer)
        need = -(-end // self.page_size)
        if need > have:
            for slot in self._allocate(need - have, t):
                seq.table.append(layer, PageLocation(Tier.DEVICE, slot))
        ps = self.page_size
        table_slots = seq.table.slots(layer)
        if t == 1:  # decode: one token, no index tensors
            self.arena.write_token(table_slots[start // ps], start % ps, k[0], v[0])
        else:
            first = start // ps
            pos = torch.arange(start, end)
            page_slots = torch.tensor(table_slots[first : -(-end // ps)], dtype=torch.int64)
            slots = page_slots[pos // ps - first].to(self.arena.device)
            offsets = (pos % ps).to(self.arena.device)
            self.arena.write(slots, offsets, k, v)
        seq.lengths[layer] = end

    def groups(self, seq: KVSequence, layer: int, max_tokens: int) -> Iterator[PageGroup]:
        """The layer's written tokens as consecutive page groups of at most ``max_tokens``
        tokens (at least one page each)."""
        length = seq.lengths[layer]
        ps = self.page_size
        slots = seq.table.slots(layer)[: -(-length // ps)]
        max_pages = max(1, max_tokens // ps)
        for first, group, contiguous in _group_pages(slots, max_pages):
            n_tokens = min(len(group) * ps, length - first * ps)
            k, v = self.arena.read(group, n_tokens, contiguous=contiguous)
            yield PageGroup(k, v, first * ps)

    def fork(self, seq: KVSequence) -> KVSequence:
        """A sequence sharing ``seq``'s pages; its appends never modify ``seq``'s pages."""
        partial = sum(1 for n in seq.lengths if n % self.page_size)
        free = self.arena.num_slots - self.arena.num_used
        if partial > free:
            # Checked before any reference is taken, so a refused fork changes nothing.
            raise CapacityError(
                f"the DEVICE KV arena is full: forking this sequence copies {partial} partly filled "
                f"pages and {free} slots are free; raise --device-memory (a page is {self.arena.slot_bytes} bytes)"
            )
        table = seq.table.copy()
        for layer in range(self.num_layers):
            self.arena.incref(table.slots(layer))
            length = seq.lengths[layer]
            if length % self.page_size:
                last = length // self.page_size
                old = table.lookup(layer, last).slot
                (new,) = self._allocate(1, length % self.page_size)
                self.arena.copy_slot(old, new)
                self.arena.free([old])
                table.replace(layer, last, PageLocation(Tier.DEVICE, new))
        return KVSequence(table, list(seq.lengths))

    def release(self, seq: KVSequence) -> None:
        """Drop the sequence's references to its pages (idempotent)."""
        if seq.released:
            return
        for layer in range(self.num_layers):
            self.arena.free(seq.table.slots(layer))
        seq.released = True


def _group_pages(slots: list[int], max_pages: int) -> Iterator[tuple[int, list[int], bool]]:
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
