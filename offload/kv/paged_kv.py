"""Paged KV cache over the tiers: page tables per sequence, writes, reads, sharing.

A page is ``page_size`` consecutive tokens of one layer's K and V for all KV heads. Each
sequence has a ``PageTable`` mapping (layer, page_id) -> (tier, slot): a slot of the DEVICE or
HOST ``PageArena``, or for DISK a page position in that layer's file of the
``DiskExtentStore``. Where a new page goes is decided by the caller's ``Placement``; a
sequence's last, partly filled page is always on DEVICE (new tokens are appended there).

Reads (``groups``) return the stored tokens of a layer as groups of consecutive pages:
- DEVICE pages: views of the arena (runs of consecutive slots) or one gather;
- HOST pages: the same on a CPU-only machine, where HOST and DEVICE are the same RAM and pages
  are attended in place; copied to the compute device with CUDA;
- DISK pages: read by the store's threads into a fixed set of staging buffers, in chunks of at
  most ``staging_chunk_pages`` pages, so a device budget smaller than a layer still works;
  ``ReadAhead`` keeps the reads of the next chunks (and the next layers) in flight while
  earlier ones are computed on.

Sharing: ``fork`` shares all of a sequence's pages (reference counted; DISK slots too) and
copies its partly filled tail pages (copy-on-write), so a question's KV is scratch.

Sliding-window layers (Gemma 3's local layers, ``windows``) keep only the pages a later query
can see: a bounded ring of DEVICE pages (``ring_pages``), never placed on HOST or DISK. Pages
that fall out of the window are dropped (their references released), and tokens that would
land only in already-dropped pages are never written. A fork shares the ring like any pages,
so a question that slides the window releases only its own references: the document's ring
is unchanged (copy-on-write).
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator, Sequence

import torch

from offload.errors import CapacityError
from offload.kv.cuda_fetch import CudaFetchAhead
from offload.kv.page_table import DiskSlots, KVSequence, PageLocation, PageTable, group_pages
from offload.kv.placement import Placement
from offload.kv.readahead import Chunk, ReadAhead
from storage import PageArena, Tier
from storage.aligned import DISK_ALIGNMENT, AlignedBuffer
from storage.disk_store import DiskExtentStore, TransferHandle

__all__ = ["PageLocation", "PageTable", "KVSequence", "PagedKV", "PageGroup", "IOCounters", "ring_pages",
           "GLOBAL", "SLIDING"]

# Layer kinds as the stats name them.
GLOBAL, SLIDING = "global", "sliding"


def ring_pages(window: int, page_size: int) -> int:
    """Most pages a sliding layer of ``window`` keys holds at once: the pages covering the
    ``window`` tokens before the newest one, plus the page the newest token starts."""
    return -(-(window + page_size - 1) // page_size)


def _per_tier() -> dict[str, int]:
    return {t.value: 0 for t in Tier}

logger = logging.getLogger(__name__)



@dataclasses.dataclass(frozen=True, slots=True)
class PageGroup:
    """K/V of consecutive pages of one layer, for one attention partial.

    k, v: [num_kv_heads, num_tokens, head_dim] on the compute device.
    start_pos: position of the first token. tier: where the pages live.
    """

    k: torch.Tensor
    v: torch.Tensor
    start_pos: int
    tier: Tier


@dataclasses.dataclass(slots=True)
class IOCounters:
    """Bytes of KV pages read per tier for attention, of those attended in place by the CPU
    kernel (HOST delegation), copied to the compute device, and time spent waiting for DISK."""

    bytes_read: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    cpu_attended_bytes: dict[str, int] = dataclasses.field(default_factory=_per_tier)
    # Per layer kind (GLOBAL, SLIDING): bytes of pages read per tier, and bytes of K/V
    # written per tier (the tokens' own bytes, padding excluded).
    read_by_kind: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {GLOBAL: _per_tier(), SLIDING: _per_tier()})
    written_by_kind: dict[str, dict[str, int]] = dataclasses.field(
        default_factory=lambda: {GLOBAL: _per_tier(), SLIDING: _per_tier()})
    copied_to_device_bytes: int = 0
    fetch_wait_s: float = 0.0
    disk_bytes_written: int = 0
    evicted_pages: int = 0


class PagedKV:
    """Owns the page pools and the pages of every live sequence.

    Args:
        arena: the DEVICE page arena.
        num_layers: layers per sequence.
        host_arena: the HOST page arena, if any.
        disk: the DISK extent store, if any (``disk_slots_limit`` pages at most over all layers).
        staging_chunk_pages / staging_buffers: the DISK read staging area.
        compute_device: where attention runs (DISK and CUDA-HOST pages are brought there).
        shuffle_seed: if set, DEVICE pages take random free slots (tests of real paging).
        windows: per layer, None (global attention: every page kept, placed by the caller)
            or the sliding window in keys (a DEVICE ring of the pages still visible).
    """

    def __init__(self, arena: PageArena, num_layers: int, *, host_arena: PageArena | None = None,
                 disk: DiskExtentStore | None = None, disk_slots_limit: int | None = None,
                 staging_chunk_pages: int = 64, staging_buffers: int = 4,
                 compute_device: torch.device | None = None, shuffle_seed: int | None = None,
                 max_write_bytes: int = 32 * 2**20, windows: Sequence[int | None] | None = None) -> None:
        self.arena = arena
        self.host_arena = host_arena
        self.disk = disk
        self.num_layers = num_layers
        self.page_size = arena.page_size
        self.windows: tuple[int | None, ...] = tuple(windows) if windows is not None else (None,) * num_layers
        if len(self.windows) != num_layers or any(w is not None and w < 1 for w in self.windows):
            raise ValueError(f"windows must hold num_layers ({num_layers}) entries, each None or >= 1; "
                             f"got {self.windows!r}")
        self.kinds = tuple(GLOBAL if w is None else SLIDING for w in self.windows)
        self.compute_device = compute_device or arena.device
        self._shuffle = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        self._disk_slots = [DiskSlots() for _ in range(num_layers)]
        self.disk_slots_limit = disk_slots_limit
        self._disk_peak = 0
        self.readahead = (ReadAhead(disk, num_buffers=staging_buffers, chunk_pages=staging_chunk_pages)
                          if disk is not None else None)
        # DISK writes in flight: the handle, what holds the source bytes alive, their size.
        self._writes: collections.deque[tuple[TransferHandle, object, int]] = collections.deque()
        self._write_bytes = 0
        self.max_write_bytes = max_write_bytes
        self.io = IOCounters()
        self._unpack: tuple[torch.Tensor, torch.Tensor] | None = None
        self.page_bytes = arena.slot_bytes  # K and V of one page, as a DEVICE or HOST slot holds it
        # CUDA only: the next layer's HOST/DISK pages copied on a side stream (``fetch_ahead``).
        self.fetcher: CudaFetchAhead | None = None

    def enable_fetch_ahead(self, max_pages: int) -> None:
        """On CUDA, let ``fetch_ahead`` copy up to ``max_pages`` pages of the next layer to the
        device on a side stream (``offload.kv.cuda_fetch``); no-op on other devices."""
        if self.compute_device.type == "cuda":
            self.fetcher = CudaFetchAhead(self.compute_device, max_pages=max_pages)

    # ----- sizes --------------------------------------------------------------------------
    def pool(self, tier: Tier) -> PageArena:
        """The page arena of DEVICE or HOST (CapacityError if that tier is not configured)."""
        return self._pool(tier)

    def _pool(self, tier: Tier) -> PageArena:
        pool = self.arena if tier == Tier.DEVICE else self.host_arena
        if pool is None:
            raise CapacityError(f"no {tier.value} tier is configured; give it a budget (--{tier.value}-memory)")
        return pool

    def free_slots(self, tier: Tier) -> int:
        if tier == Tier.DISK:
            if self.disk is None:
                return 0
            used = sum(d.num_used for d in self._disk_slots)
            return (self.disk_slots_limit - used) if self.disk_slots_limit is not None else 1 << 40
        pool = self.arena if tier == Tier.DEVICE else self.host_arena
        return 0 if pool is None else pool.num_slots - pool.num_used

    def peak_bytes(self) -> dict[str, int]:
        """High-water mark of KV bytes held per tier (HOST includes the DISK staging area)."""
        host = self.host_arena.peak_used_bytes if self.host_arena is not None else 0
        staging = self.readahead.staging_bytes if self.readahead is not None else 0
        disk_page = self.disk.disk_page_bytes if self.disk is not None else 0
        return {Tier.DEVICE.value: self.arena.peak_used_bytes, Tier.HOST.value: host + staging,
                Tier.DISK.value: self._disk_peak * disk_page}

    def held_bytes(self, seq: KVSequence) -> dict[str, dict[str, int]]:
        """Bytes of the sequence's live pages per layer kind (GLOBAL, SLIDING) and tier (a
        page shared with another sequence counts for each)."""
        out = {GLOBAL: _per_tier(), SLIDING: _per_tier()}
        if seq.released:
            return out
        for layer in range(self.num_layers):
            first, n = seq.table.first_live(layer), seq.table.num_pages(layer)
            for tier, count in collections.Counter(seq.table.tiers(layer)[first:n]).items():
                out[self.kinds[layer]][tier.value] += count * self.page_bytes
        return out

    # ----- sequences ----------------------------------------------------------------------
    def new_sequence(self) -> KVSequence:
        return KVSequence(PageTable(self.num_layers), [0] * self.num_layers)

    def _allocate(self, tier: Tier, layer: int, n: int, needed_tokens: int) -> list[int]:
        if tier == Tier.DISK:
            if self.disk is None:
                raise CapacityError("pages were placed on DISK but no disk tier is configured; give --disk-space")
            if self.free_slots(Tier.DISK) < n:
                raise CapacityError(f"the DISK tier is full ({self.disk_slots_limit} pages); raise --disk-space")
            slots = self._disk_slots[layer].allocate(n)
            self._disk_peak = max(self._disk_peak, sum(d.num_used for d in self._disk_slots))
            return slots
        pool = self._pool(tier)
        slots = (pool.allocate_shuffled(n, self._shuffle) if self._shuffle is not None and tier == Tier.DEVICE
                 else pool.allocate(n))
        if slots is None:
            capacity = pool.num_slots * self.page_size // self.num_layers
            raise CapacityError(
                f"the {tier.value.upper()} KV arena is full: it holds {pool.num_slots} pages "
                f"({capacity} tokens of all {self.num_layers} layers) and {pool.num_used} are in use; "
                f"this step needs {n} more for {needed_tokens} tokens; raise --{tier.value}-memory "
                f"(a page is {pool.slot_bytes} bytes)"
            )
        return slots

    def _free(self, tier: Tier, layer: int, slots: list[int]) -> None:
        if not slots:
            return
        if tier == Tier.DISK:
            self._disk_slots[layer].free_slots(slots)
        else:
            self._pool(tier).free(slots)

    # ----- writes -------------------------------------------------------------------------
    def append(self, seq: KVSequence, layer: int, k: torch.Tensor, v: torch.Tensor,
               placement: Placement | None = None) -> None:
        """Write K/V of the next tokens of ``layer`` into its pages, adding pages as needed.

        New full pages go where ``placement`` says (default: DEVICE); the last, partly filled
        page always goes to DEVICE. DISK pages are written asynchronously (``flush_writes``).

        Args:
            k, v: [T, num_kv_heads, head_dim].
        """
        assert not seq.released
        t = k.shape[0]
        ps = self.page_size
        start = seq.lengths[layer]
        end = start + t
        have = seq.table.num_pages(layer)
        need = -(-end // ps)
        placement = placement or Placement()
        window = self.windows[layer]
        if window is not None:
            # A sliding layer: the next query (at position end - 1 in decode, where the token
            # is appended before attending) sees keys from end - window on.
            keep = max(0, end - window) // ps
            self._drop_pages(seq, layer, min(keep, have))
            for _ in range(have, min(keep, need)):  # pages out of the window before they exist
                seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
            seq.table.drop_before(layer, keep)
            if keep * ps > start:  # tokens that land only in dropped pages are not written
                k, v, start = k[keep * ps - start :], v[keep * ps - start :], keep * ps
                t = end - start
            have = seq.table.num_pages(layer)
        self._add_pages(seq, layer, have, need, end, t, placement)
        table_slots, table_tiers = seq.table.slots(layer), seq.table.tiers(layer)
        if t == 1:  # decode: one token into the DEVICE tail page, no index tensors
            self.arena.write_token(table_slots[start // ps], start % ps, k[0], v[0])
        elif t:
            self._write_tokens(layer, table_tiers, table_slots, start, end, k, v)
        self._count_written(layer, table_tiers, start, end)
        seq.lengths[layer] = end

    def _add_pages(self, seq: KVSequence, layer: int, have: int, need: int, end: int, t: int,
                   placement: Placement) -> None:
        """Append pages ``have .. need - 1`` of ``layer`` to the table, each on its tier (a
        sliding layer's and the partly filled last page on DEVICE, the others where
        ``placement`` says), evicting older DEVICE pages when DEVICE is short. A refused
        allocation takes nothing."""
        window = self.windows[layer]
        new_ids = list(range(have, need))
        tiers = [Tier.DEVICE if (window is not None or (pid == need - 1 and end % self.page_size))
                 else placement.tier_of(pid, layer) for pid in new_ids]
        short = tiers.count(Tier.DEVICE) - self.free_slots(Tier.DEVICE)
        if short > 0 and window is None:
            self._evict(seq, layer, short)
        taken: dict[Tier, collections.deque[int]] = {}
        try:
            for tier in dict.fromkeys(tiers):
                taken[tier] = collections.deque(self._allocate(tier, layer, tiers.count(tier), t))
        except CapacityError:
            for tier, slots in taken.items():  # a refused step takes nothing
                self._free(tier, layer, list(slots))
            raise
        for tier in tiers:
            seq.table.append(layer, PageLocation(tier, taken[tier].popleft()))

    def restore_pages(self, seq: KVSequence, layer: int, start: int, pages: torch.Tensor, tokens: int,
                      placement: Placement | None = None) -> None:
        """``restore`` from whole pages as DISK stores them (a DocCache's bytes): ``pages``
        [n, 2, num_kv_heads, page_size, head_dim] on the CPU hold tokens [start, start +
        tokens) (the last page's tail is padding). Pages placed on DISK are written as they
        are, memory pages copied into their slots: no round trip through token order.

        A global layer may be restored in pieces: a later call continues at the page-aligned
        end of the previous one (``start`` = the layer's length)."""
        ps = self.page_size
        n = pages.shape[0]
        if n != -(-tokens // ps) or tuple(pages.shape[1:]) != (2, self.arena.num_kv_heads, ps, self.arena.head_dim):
            raise ValueError(f"restore_pages got pages of shape {tuple(pages.shape)} for {tokens} tokens")
        have = seq.table.num_pages(layer)
        continuing = (self.windows[layer] is None and have and seq.lengths[layer] == start
                      and not start % ps and have == start // ps)
        if not continuing and (seq.lengths[layer] or have or start % ps):
            raise ValueError(f"restore needs an empty layer (or, for a global layer, the page-aligned end of "
                             f"its restored pages) and a page-aligned start, got start {start}")
        if self.windows[layer] is not None:  # a ring: through the token path, which drops what it must
            tok = pages.permute(1, 0, 3, 2, 4).reshape(2, n * ps, self.arena.num_kv_heads, self.arena.head_dim)
            self.restore(seq, layer, start, tok[0, :tokens], tok[1, :tokens], placement)
            return
        if not continuing:
            for _ in range(start // ps):
                seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
            seq.table.drop_before(layer, start // ps)
        end = start + tokens
        first = start // ps
        self._add_pages(seq, layer, first, first + n, end, tokens, placement or Placement())
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        mem: dict[Tier, tuple[list[int], list[int]]] = {}  # tier -> page index into `pages`, slot
        disk_runs: list[tuple[int, int, int]] = []  # (page index, first disk slot, pages)
        for i in range(n):
            tier, slot = tiers[first + i], slots[first + i]
            if tier == Tier.DISK:
                last = disk_runs[-1] if disk_runs else None
                if last and last[0] + last[2] == i and last[1] + last[2] == slot:
                    disk_runs[-1] = (last[0], last[1], last[2] + 1)
                else:
                    disk_runs.append((i, slot, 1))
            else:
                idx, sl = mem.setdefault(tier, ([], []))
                idx.append(i)
                sl.append(slot)
        for tier, (idx, sl) in mem.items():
            sel = pages[idx[0]: idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else pages[idx]
            self._pool(tier).write_pages(sl, sel[:, 0].transpose(0, 1), sel[:, 1].transpose(0, 1))
        for i, slot0, m in disk_runs:
            self._submit_disk_pages(layer, slot0, pages[i: i + m])
        self._count_written(layer, tiers, start, end)
        seq.lengths[layer] = end

    def restore(self, seq: KVSequence, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                placement: Placement | None = None) -> None:
        """Load stored tokens [start, start + T) of an empty layer of ``seq`` (a DocCache):
        ``start`` (a page boundary) is the first live page's first token (0, or where a
        sliding layer's ring began); the pages before it count as dropped."""
        ps = self.page_size
        if seq.lengths[layer] or seq.table.num_pages(layer) or start % ps:
            raise ValueError(f"restore needs an empty layer and a page-aligned start, got start {start}")
        for _ in range(start // ps):
            seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
        seq.table.drop_before(layer, start // ps)
        seq.lengths[layer] = start
        self.append(seq, layer, k, v, placement)

    def _drop_pages(self, seq: KVSequence, layer: int, keep: int) -> None:
        """Release the layer's live pages before page ``keep`` (out of its sliding window)."""
        first = seq.table.first_live(layer)
        if keep <= first:
            return
        tiers, slots = seq.table.tiers(layer)[first:keep], seq.table.slots(layer)[first:keep]
        for tier in dict.fromkeys(tiers):
            self._free(tier, layer, [s for tr, s in zip(tiers, slots) if tr == tier])
        seq.table.drop_before(layer, keep)

    def _count_written(self, layer: int, tiers: list[Tier], start: int, end: int) -> None:
        """Count the K/V bytes of tokens [start, end) of ``layer`` written, per tier."""
        ps = self.page_size
        token_bytes = self.page_bytes // ps
        written = self.io.written_by_kind[self.kinds[layer]]
        if start // ps == (end - 1) // ps:  # one page (every decode step)
            if end > start:
                written[tiers[start // ps].value] += (end - start) * token_bytes
            return
        for pid in range(start // ps, -(-end // ps)):
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
            written[tiers[pid].value] += (hi - lo) * token_bytes

    def count_read(self, layer: int, tier: Tier, nbytes: int) -> None:
        """Count ``nbytes`` of the layer's pages read on ``tier`` for attention."""
        self.io.bytes_read[tier.value] += nbytes
        self.io.read_by_kind[self.kinds[layer]][tier.value] += nbytes

    def make_tail_room(self, seq: KVSequence) -> None:
        """Before a decode step: move now the pages its appends would move (when a global
        layer's token starts a new DEVICE tail page and DEVICE has no free slot), so that
        the step's DISK reads are planned, and its CUDA pieces fetched, over the page tables
        attention will see. Sliding layers are left out: a ring drops a page as it adds one.
        Counting wrong moves a page early or leaves the move to ``append``; never a wrong
        result."""
        free = self.free_slots(Tier.DEVICE)
        for layer in range(self.num_layers):
            if self.windows[layer] is not None or seq.lengths[layer] % self.page_size:
                continue
            if free > 0:
                free -= 1  # this layer's append takes a free slot
            else:
                self._evict(seq, layer, 1)  # the slot it frees is this layer's tail page

    def _evict(self, seq: KVSequence, layer: int, count: int) -> None:
        """Make room on DEVICE for new tail pages: move up to ``count`` of this layer's oldest
        full DEVICE pages (never page 0, the attention sink; never a page another sequence
        shares) to HOST if it has room, else DISK. Moves nothing it cannot place."""
        ps = self.page_size
        full = seq.lengths[layer] // ps
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        for pid in range(1, full):
            if count == 0:
                return
            if tiers[pid] != Tier.DEVICE or self.arena.refcount(slots[pid]) != 1:
                continue
            target = Tier.HOST if self.free_slots(Tier.HOST) > 0 else Tier.DISK
            if target == Tier.DISK and self.free_slots(Tier.DISK) <= 0:
                return
            old = slots[pid]
            (new,) = self._allocate(target, layer, 1, ps)
            if target == Tier.HOST:
                assert self.host_arena is not None
                self.host_arena.k[:, new].copy_(self.arena.k[:, old])
                self.host_arena.v[:, new].copy_(self.arena.v[:, old])
            else:
                k = self.arena.k[:, old].transpose(0, 1).cpu()  # [page_size, nkv, hd]
                v = self.arena.v[:, old].transpose(0, 1).cpu()
                self._submit_disk_write(layer, new, k, v, 1)
            self.arena.free([old])
            seq.table.replace(layer, pid, PageLocation(target, new))
            self.io.evicted_pages += 1
            count -= 1

    def _write_tokens(self, layer: int, tiers: list[Tier], slots: list[int], start: int, end: int,
                      k: torch.Tensor, v: torch.Tensor) -> None:
        ps = self.page_size
        mem: dict[Tier, tuple[list[int], list[int], list[int]]] = {}  # tier -> token idx, slot, offset
        disk_runs: list[tuple[int, int, int]] = []  # (first page, first disk slot, pages)
        for pid in range(start // ps, -(-end // ps)):
            tier, slot = tiers[pid], slots[pid]
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
            if tier == Tier.DISK:
                assert lo == pid * ps and hi == (pid + 1) * ps, "DISK pages are written whole"
                last = disk_runs[-1] if disk_runs else None
                if last and last[0] + last[2] == pid and last[1] + last[2] == slot:
                    disk_runs[-1] = (last[0], last[1], last[2] + 1)
                else:
                    disk_runs.append((pid, slot, 1))
                continue
            idx, sl, off = mem.setdefault(tier, ([], [], []))
            idx.extend(range(lo - start, hi - start))
            sl.extend([slot] * (hi - lo))
            off.extend(range(lo - pid * ps, hi - pid * ps))
        for tier, (idx, sl, off) in mem.items():
            pool = self._pool(tier)
            index = torch.tensor(idx, dtype=torch.int64, device=k.device)
            pool.write(torch.tensor(sl, dtype=torch.int64, device=pool.device),
                       torch.tensor(off, dtype=torch.int64, device=pool.device),
                       k.index_select(0, index).to(pool.device), v.index_select(0, index).to(pool.device))
        for first, slot0, n in disk_runs:
            a = first * ps - start
            self._submit_disk_write(layer, slot0, k[a : a + n * ps], v[a : a + n * ps], n)

    def _page_view(self, buf: AlignedBuffer, n: int) -> torch.Tensor:
        """A staging buffer as pages [n, 2, num_kv_heads, page_size, head_dim] (no copy)."""
        assert self.disk is not None
        a = self.arena
        raw = buf.torch()[: n * self.disk.disk_page_bytes].view(n, self.disk.disk_page_bytes)
        return raw[:, : self.page_bytes].view(a.dtype).view(n, 2, a.num_kv_heads, self.page_size, a.head_dim)

    def _submit_disk_write(self, layer: int, slot0: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        assert self.disk is not None
        buf = AlignedBuffer(n * self.disk.disk_page_bytes)
        pages = self._page_view(buf, n)
        shape = (n, self.page_size, self.arena.num_kv_heads, self.arena.head_dim)
        pages[:, 0].copy_(k.reshape(shape).transpose(1, 2))
        pages[:, 1].copy_(v.reshape(shape).transpose(1, 2))
        del pages
        self._submit_buffer(layer, slot0, buf, n)

    def _submit_disk_pages(self, layer: int, slot0: int, src: torch.Tensor) -> None:
        """Write whole pages [n, 2, num_kv_heads, page_size, head_dim] (DISK's layout) to
        DISK slots ``slot0 ..``."""
        assert self.disk is not None
        n = src.shape[0]
        if (self.disk.disk_page_bytes == self.page_bytes and src.is_contiguous() and src.device.type == "cpu"
                and src.data_ptr() % DISK_ALIGNMENT == 0):
            # Already laid out as the slots are and aligned for O_DIRECT: written from where it is.
            raw = src.view(torch.uint8).reshape(-1)
            self._submit_view(layer, slot0, memoryview(raw.numpy()), raw, n)
            return
        buf = AlignedBuffer(n * self.disk.disk_page_bytes)
        pages = self._page_view(buf, n)
        pages.copy_(src)
        del pages
        self._submit_buffer(layer, slot0, buf, n)

    def _submit_buffer(self, layer: int, slot0: int, buf: AlignedBuffer, n: int) -> None:
        assert self.disk is not None
        self._submit_view(layer, slot0, buf.memoryview()[: n * self.disk.disk_page_bytes], buf, n)

    def _submit_view(self, layer: int, slot0: int, view: memoryview, keep: object, n: int) -> None:
        """Write ``n`` slots from ``view`` (aligned, ``n`` DISK slots long); ``keep`` holds its
        memory until the write is done."""
        assert self.disk is not None
        handle = self.disk.submit_write(layer, slot0, view, n)
        self._writes.append((handle, keep, view.nbytes))
        self._write_bytes += view.nbytes
        self.io.disk_bytes_written += n * self.disk.disk_page_bytes
        while self._write_bytes > self.max_write_bytes:  # bound the write staging
            self._finish_oldest_write()

    def _finish_oldest_write(self) -> None:
        handle, _, nbytes = self._writes.popleft()
        self._write_bytes -= nbytes
        handle.wait()

    def flush_writes(self) -> None:
        """Wait for every DISK write in flight (errors surface here)."""
        while self._writes:
            self._finish_oldest_write()

    # ----- reads --------------------------------------------------------------------------
    def _tier_segments(self, seq: KVSequence, layer: int) -> Iterator[tuple[int, int, list[int]]]:
        """(segment start page, end page, slots) of the layer's stored pages, split by tier."""
        length = seq.lengths[layer]
        n = -(-length // self.page_size)
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        i = seq.table.first_live(layer)
        for _, run in itertools.groupby(tiers[i:n]):  # C-speed scan of the tiers
            j = i + len(list(run))
            yield i, j, slots[i:j]
            i = j

    def _chunks_of(self, layer: int, first: int, slots: list[int]) -> list[Chunk]:
        assert self.readahead is not None
        out: list[Chunk] = []
        limit = self.readahead.chunk_pages
        start, n = 0, 0
        for p, s in enumerate(slots):
            if n and (n == limit or slots[start] + n != s):
                out.append(Chunk(layer, first + start, slots[start], n))
                start, n = p, 0
            n += 1
        if n:
            out.append(Chunk(layer, first + start, slots[start], n))
        return out

    def plan_reads(self, seq: KVSequence) -> None:
        """Start reading the sequence's DISK pages, all layers in order, into the staging area
        (read-ahead for the next forward pass)."""
        if self.readahead is None:
            return
        self.flush_writes()
        chunks: list[Chunk] = []
        for layer in range(self.num_layers):
            for i, _, slots in self._tier_segments(seq, layer):
                if seq.table.tiers(layer)[i] == Tier.DISK:
                    chunks += self._chunks_of(layer, i, slots)
        self.readahead.plan(chunks)

    def time_disk_reads(self, seq: KVSequence) -> tuple[int, float]:
        """Read every DISK page of the sequence once, as a decode step does (same chunks, same
        staging depth, same threads), without compute: (bytes, seconds)."""
        if self.readahead is None:
            return 0, 0.0
        self.flush_writes()
        chunks = [c for layer in range(self.num_layers) for i, _, slots in self._tier_segments(seq, layer)
                  if seq.table.tiers(layer)[i] == Tier.DISK for c in self._chunks_of(layer, i, slots)]
        t0 = time.perf_counter()
        self.readahead.plan(chunks)
        for c in chunks:
            buf, _ = self.readahead.take(c)
            self.readahead.give_back(buf)
        return sum(c.num_pages for c in chunks) * self.disk.disk_page_bytes, time.perf_counter() - t0

    def fetch_ahead(self, seq: KVSequence, layer: int, *, delegated_pages: int, max_tokens: int) -> None:
        """Start copying ``layer``'s HOST pages (past the first ``delegated_pages``, which the
        CPU attends in place) and DISK chunks to the CUDA device on the side stream, in the
        pieces ``page_groups`` will ask for (``max_tokens`` as there), until the fetcher's
        allowance is full. Waits for the chunks' disk reads (the GPU still runs the queued
        layer meanwhile). No-op without a fetcher."""
        f = self.fetcher
        if f is None:
            return
        f.begin_layer()
        if self._writes:
            self.flush_writes()
        max_pages = max(1, max_tokens // self.page_size)
        for tier, first, slots in self.segments(seq, layer):
            if tier == Tier.HOST:
                skip = min(delegated_pages, len(slots))
                delegated_pages -= skip
                first, slots = first + skip, slots[skip:]
                if not slots:
                    continue
                pool = self._pool(tier)
                for start, group, contiguous in group_pages(slots, max_pages):
                    if not f.room(len(group)):
                        return
                    if contiguous:
                        k_src, v_src = pool.k[:, group[0]:group[0] + len(group)], pool.v[:, group[0]:group[0] + len(group)]
                    else:
                        idx = torch.tensor(group, dtype=torch.int64)
                        shape = (pool.num_kv_heads, len(group), self.page_size, pool.head_dim)
                        k_src = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
                        v_src = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
                        torch.index_select(pool.k, 1, idx, out=k_src)
                        torch.index_select(pool.v, 1, idx, out=v_src)
                    f.put_run((Tier.HOST, layer, tuple(group)), k_src, v_src, len(group) * self.page_size)
            elif tier == Tier.DISK:
                length = seq.lengths[layer]
                for c in self._chunks_of(layer, first, slots):
                    if not f.room(c.num_pages):
                        return
                    buf = self._take_chunk(c)
                    try:
                        f.put_pages((Tier.DISK, c), self._page_view(buf, c.num_pages),
                                    min(c.num_pages * self.page_size, length - c.first_page * self.page_size))
                    finally:
                        self.readahead.give_back(buf)

    def segments(self, seq: KVSequence, layer: int) -> Iterator[tuple[Tier, int, list[int]]]:
        """(tier, first page id, slots) of each run of the layer's stored pages on one tier."""
        tiers = seq.table.tiers(layer)
        for i, _, slots in self._tier_segments(seq, layer):
            yield tiers[i], i, slots

    def groups(self, seq: KVSequence, layer: int, max_tokens: int) -> Iterator[PageGroup]:
        """The layer's stored tokens as groups of consecutive pages of at most ``max_tokens``
        tokens (at least one page each), on the compute device."""
        for tier, first, slots in self.segments(seq, layer):
            yield from self.page_groups(seq, layer, tier, first, slots, max_tokens)

    def page_groups(self, seq: KVSequence, layer: int, tier: Tier, first: int, slots: list[int],
                    max_tokens: int) -> Iterator[PageGroup]:
        """Groups of one segment (from ``segments``) on the compute device: views or gathers
        of an arena (copied to the device for CUDA HOST pages), or staged DISK chunks."""
        length = seq.lengths[layer]
        ps = self.page_size
        max_pages = max(1, max_tokens // ps)
        if tier == Tier.DISK:
            yield from self._disk_groups(layer, first, slots, length, max_pages)
            return
        pool = self._pool(tier)
        for start, group, contiguous in group_pages(slots, max_pages):
            start += first
            n_tokens = min(len(group) * ps, length - start * ps)
            fetched = self.fetcher.take((tier, layer, tuple(group))) if self.fetcher is not None else None
            if fetched is not None:  # copied ahead on the side stream
                self.count_read(layer, tier, len(group) * self.page_bytes)
                self.io.copied_to_device_bytes += len(group) * self.page_bytes
                yield PageGroup(fetched[0][:, :n_tokens], fetched[1][:, :n_tokens], start * ps, tier)
                continue
            k, v = pool.read(group, n_tokens, contiguous=contiguous)
            self.count_read(layer, tier, len(group) * self.page_bytes)
            if k.device != self.compute_device:
                k = k.to(self.compute_device, non_blocking=True)
                v = v.to(self.compute_device, non_blocking=True)
                self.io.copied_to_device_bytes += len(group) * self.page_bytes
            yield PageGroup(k, v, start * ps, tier)

    def _unpack_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, chunk tokens, head_dim] that DISK chunks are unpacked into.

        A group yielded from them is valid until the next group is asked for (the engine
        computes each partial before asking for the next).
        """
        if self._unpack is None:
            assert self.readahead is not None
            a = self.arena
            shape = (a.num_kv_heads, self.readahead.chunk_pages * self.page_size, a.head_dim)
            self._unpack = (torch.empty(shape, dtype=a.dtype), torch.empty(shape, dtype=a.dtype))
        return self._unpack

    def _take_chunk(self, c: Chunk) -> AlignedBuffer:
        """The staging buffer holding chunk ``c`` (read ahead), counted as read and waited for;
        the caller gives it back."""
        assert self.readahead is not None
        buf, waited = self.readahead.take(c)
        self.io.fetch_wait_s += waited
        self.count_read(c.layer, Tier.DISK, c.num_pages * self.page_bytes)
        return buf

    def staged_pages(self, seq: KVSequence, layer: int, first: int,
                     slots: list[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """The DISK pages of one segment (from ``segments``) where the read-ahead staged them,
        without unpacking: per chunk ``(k, v, tokens)`` with k and v strided views
        [num_kv_heads, n, page_size, head_dim] into the staging buffer (a page arena of n
        slots for an in-place CPU kernel). A view is valid until the next item is asked for."""
        assert self.readahead is not None and self.disk is not None
        if self._writes:
            self.flush_writes()
        length, ps = seq.lengths[layer], self.page_size
        for c in self._chunks_of(layer, first, slots):
            buf = self._take_chunk(c)
            try:
                pages = self._page_view(buf, c.num_pages)
                yield (pages[:, 0].transpose(0, 1), pages[:, 1].transpose(0, 1),
                       min(c.num_pages * ps, length - c.first_page * ps))
                del pages
            finally:
                self.readahead.give_back(buf)

    def _disk_groups(self, layer: int, first: int, slots: list[int], length: int,
                     max_pages: int) -> Iterator[PageGroup]:
        assert self.readahead is not None and self.disk is not None
        if self._writes:
            self.flush_writes()
        ps, a = self.page_size, self.arena
        for c in self._chunks_of(layer, first, slots):
            fetched = self.fetcher.take((Tier.DISK, c)) if self.fetcher is not None else None
            if fetched is not None:  # read, then copied ahead on the side stream (counted as read then)
                self.io.copied_to_device_bytes += c.num_pages * self.page_bytes
                k, v = fetched
                for s in range(0, k.shape[1], max_pages * ps):
                    e = min(k.shape[1], s + max_pages * ps)
                    yield PageGroup(k[:, s:e], v[:, s:e], c.first_page * ps + s, Tier.DISK)
                continue
            buf = self._take_chunk(c)
            try:
                pages = self._page_view(buf, c.num_pages)
                n = c.num_pages
                # Pages are page-major on disk; attention wants head-major runs of tokens. The
                # copy goes into one persistent buffer (fresh memory each chunk would cost
                # page faults on every byte).
                k_all, v_all = self._unpack_buffers()
                k = k_all[:, : n * ps]
                v = v_all[:, : n * ps]
                k.view(a.num_kv_heads, n, ps, a.head_dim).copy_(pages[:, 0].transpose(0, 1))
                v.view(a.num_kv_heads, n, ps, a.head_dim).copy_(pages[:, 1].transpose(0, 1))
                del pages
            finally:
                self.readahead.give_back(buf)
            n_tokens = min(n * ps, length - c.first_page * ps)
            k, v = k[:, :n_tokens], v[:, :n_tokens]
            if k.device != self.compute_device:
                k, v = k.to(self.compute_device), v.to(self.compute_device)
                self.io.copied_to_device_bytes += n * self.page_bytes
            for s in range(0, n_tokens, max_pages * ps):
                e = min(n_tokens, s + max_pages * ps)
                yield PageGroup(k[:, s:e], v[:, s:e], c.first_page * ps + s, Tier.DISK)

    # ----- sharing ------------------------------------------------------------------------
    def fork(self, seq: KVSequence) -> KVSequence:
        """A sequence sharing ``seq``'s pages; its appends never modify ``seq``'s pages."""
        partial = sum(1 for n in seq.lengths if n % self.page_size)
        free = self.free_slots(Tier.DEVICE)
        if partial > free:
            # Checked before any reference is taken, so a refused fork changes nothing.
            raise CapacityError(
                f"the DEVICE KV arena is full: forking this sequence copies {partial} partly filled "
                f"pages and {free} slots are free; raise --device-memory (a page is {self.arena.slot_bytes} bytes)"
            )
        table = seq.table.copy()
        for layer in range(self.num_layers):
            self._for_each_tier(table, layer, incref=True)
            length = seq.lengths[layer]
            if length % self.page_size:
                last = length // self.page_size
                old = table.lookup(layer, last)
                assert old.tier == Tier.DEVICE, "a partly filled page lives on DEVICE"
                (new,) = self._allocate(Tier.DEVICE, layer, 1, length % self.page_size)
                self.arena.copy_slot(old.slot, new)
                self.arena.free([old.slot])
                table.replace(layer, last, PageLocation(Tier.DEVICE, new))
        return KVSequence(table, list(seq.lengths))

    def _for_each_tier(self, table: PageTable, layer: int, *, incref: bool) -> None:
        by_tier: dict[Tier, list[int]] = collections.defaultdict(list)
        first = table.first_live(layer)
        for tier, slot in zip(table.tiers(layer)[first:], table.slots(layer)[first:]):
            by_tier[tier].append(slot)
        for tier, slots in by_tier.items():
            if not incref:
                self._free(tier, layer, slots)
            elif tier == Tier.DISK:
                self._disk_slots[layer].incref(slots)
            else:
                self._pool(tier).incref(slots)

    def release(self, seq: KVSequence) -> None:
        """Drop the sequence's references to its pages (idempotent)."""
        if seq.released:
            return
        if self.readahead is not None:
            self.readahead.reset()
        for layer in range(self.num_layers):
            self._for_each_tier(seq.table, layer, incref=False)
        seq.released = True

    def close(self) -> None:
        """Finish DISK writes and stop the read-ahead (the store is closed by its owner)."""
        if self.readahead is not None:
            self.readahead.reset()
        self.flush_writes()
