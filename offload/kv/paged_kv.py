"""The KV manager: page pools, page tables per sequence, allocation, eviction, sharing.

A page is ``page_size`` consecutive tokens of one layer's K and V for all KV heads. Each sequence has a
``PageTable`` mapping (layer, page_id) -> (tier, slot): a slot of the DEVICE or HOST ``PageArena``, or for DISK
a page position in that layer's file of the ``DiskExtentStore``. Where a new page goes is decided by the
caller's ``Placement``; a sequence's last, partly filled page is always on DEVICE (new tokens are appended
there).

This module decides which pages exist and where; two helpers it owns move the bytes: ``writes`` (``KVWriter``:
tokens into pages, DocCache restores, the DISK write queue) and ``reader`` (``KVReader``: read sets, the DISK
read-ahead, staged chunks, token groups, CUDA fetch-ahead).

Sharing: ``fork`` shares all of a sequence's pages (reference counted; DISK slots too) and copies its partly
filled tail pages (copy-on-write), so a question's KV is scratch.

Sliding-window layers (Gemma 3's local layers, ``windows``) keep only the pages a later query can see: a bounded
ring of DEVICE pages (``ring_pages``), never placed on HOST or DISK. Pages out of the window are dropped (their
references released); tokens that would land only in dropped pages are never written. A fork shares the ring
like any pages, so a question that slides the window releases only its own references (copy-on-write).
"""
from __future__ import annotations

import collections
from collections.abc import Sequence

import torch

from offload.errors import CapacityError
from offload.kv.counters import IOCounters, per_tier
from offload.kv.cuda_fetch import CudaFetchAhead
from offload.kv.key_bounds import KeyBounds
from offload.kv.kvpr import ActivationPages
from offload.kv.page_cache import DiskPageCache
from offload.kv.page_table import DiskSlots, KVSequence, LayerKind, PageLocation, PageTable, cdiv, ring_pages
from offload.kv.placement import Placement
from offload.kv.quant_pages import PackedPools
from offload.kv.readahead import PageLayout, ReadAhead
from offload.kv.reads import KVReader, PageGroup
from offload.kv.writes import KVWriter
from storage import PageArena, Tier
from storage.disk_store import DiskExtentStore
from storage.page_arena import SlotPool

__all__ = ["PageLocation", "PageTable", "KVSequence", "PagedKV", "PageGroup", "IOCounters", "ring_pages"]


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
                 max_write_bytes: int = 32 * 2**20, windows: Sequence[int | None] | None = None,
                 packed: PackedPools | None = None) -> None:
        self.arena = arena
        self.host_arena = host_arena
        self.packed = packed
        self.disk = disk
        self.num_layers, self.page_size = num_layers, arena.page_size
        self.windows: tuple[int | None, ...] = tuple(windows) if windows is not None else (None,) * num_layers
        if len(self.windows) != num_layers or any(w is not None and w < 1 for w in self.windows):
            raise ValueError(f"windows must hold num_layers ({num_layers}) entries, each None or >= 1; "
                             f"got {self.windows!r}")
        self.kinds = tuple(LayerKind.GLOBAL if w is None else LayerKind.SLIDING for w in self.windows)
        self.global_layers = tuple(i for i, k in enumerate(self.kinds) if k == LayerKind.GLOBAL)
        self.compute_device = compute_device or arena.device
        self._shuffle = None if shuffle_seed is None else torch.Generator().manual_seed(shuffle_seed)
        self._disk_slots = [DiskSlots() for _ in range(num_layers)]
        self.disk_slots_limit, self._disk_peak = disk_slots_limit, 0
        self.readahead = (ReadAhead(disk, num_buffers=staging_buffers, chunk_pages=staging_chunk_pages)
                          if disk is not None else None)
        self.page_bytes = arena.slot_bytes  # K and V of one page, as a DEVICE or HOST slot holds it
        # How a DISK page lies in the staging and write buffers (with 4-bit pages, DISK holds
        # packed pages only: ``packed.layout``).
        self.layout = (PageLayout(self.page_bytes, disk.disk_page_bytes, arena.dtype, arena.num_kv_heads,
                                  self.page_size, arena.head_dim) if disk is not None and packed is None else None)
        self.acts: ActivationPages | None = None  # KVPR's HOST pages (``offload.kv.kvpr``), set by the engine
        self.page_cache: DiskPageCache | None = None  # sparse steps' DISK pages in memory, set by the engine
        self.io = IOCounters()
        self.writes = KVWriter(self, max_write_bytes=max_write_bytes)
        self.reader = KVReader(self, readahead=self.readahead, layout=self.layout, counters=self.io)
        # CUDA only: the next layer's HOST/DISK pages copied on a side stream (``KVReader.fetch_ahead``).
        self.fetcher: CudaFetchAhead | None = None

    def enable_fetch_ahead(self, max_pages: int) -> None:
        """On CUDA, let ``KVReader.fetch_ahead`` copy up to ``max_pages`` pages of the next layer to the
        device on a side stream (``offload.kv.cuda_fetch``); no-op on other devices."""
        if self.compute_device.type == "cuda":
            self.fetcher = CudaFetchAhead(self.compute_device, max_pages=max_pages)

    # ----- sizes --------------------------------------------------------------------------
    def pool_of(self, tier: Tier) -> PageArena:
        """The page arena of DEVICE or HOST (CapacityError if that tier is not configured)."""
        pool = self.arena if tier == Tier.DEVICE else self.host_arena
        if pool is None:
            raise CapacityError(f"no {tier.value} tier is configured; give it a budget (--{tier.value}-memory)")
        return pool

    def pool_for(self, tier: Tier, packed: bool) -> SlotPool:
        """The arena that holds pages of this tier and format (DEVICE or HOST)."""
        if not packed:
            return self.pool_of(tier)
        pool = self.packed.arenas.get(tier) if self.packed is not None else None
        if pool is None:
            raise CapacityError(f"no {tier.value} room for 4-bit pages is configured; give it a budget "
                                f"(--{tier.value}-memory)")
        return pool

    def free_slots(self, tier: Tier, packed: bool = False) -> int:
        """Free slots of a tier for pages of one format (DISK: its pages' format is the engine's)."""
        if tier == Tier.DISK:
            if self.disk is None:
                return 0
            used = sum(d.num_used for d in self._disk_slots)
            return (self.disk_slots_limit - used) if self.disk_slots_limit is not None else 1 << 40
        if packed:
            pool = self.packed.arenas.get(tier) if self.packed is not None else None
        else:
            pool = self.arena if tier == Tier.DEVICE else self.host_arena
        return 0 if pool is None else pool.num_slots - pool.num_used

    def stored_page_bytes(self, tier: Tier, packed: bool) -> int:
        """Bytes one page counts for: an exact page's K and V; a 4-bit page as stored (its
        blob, or on DISK its 4 KiB-aligned slot)."""
        if not packed or self.packed is None:
            return self.page_bytes
        return self.disk.disk_page_bytes if tier == Tier.DISK and self.disk is not None else self.packed.layout.page_bytes

    def packed_below(self, layer: int, length: int) -> int:
        """With 4-bit pages, a global layer of ``length`` tokens keeps pages 1 .. n - 1 packed,
        n returned: the sink page 0, the last ``window_pages`` full pages and the partly
        filled tail stay exact. 0 (nothing packed) in exact mode and for sliding layers."""
        if self.packed is None or self.windows[layer] is not None:
            return 0
        return max(1, length // self.page_size - self.packed.window_pages)

    def peak_bytes(self) -> dict[str, int]:
        """High-water mark of KV bytes held per tier (HOST includes the DISK staging area)."""
        host = self.host_arena.peak_used_bytes if self.host_arena is not None else 0
        staging = self.readahead.staging_bytes if self.readahead is not None else 0
        disk_page = self.disk.disk_page_bytes if self.disk is not None else 0
        device = self.arena.peak_used_bytes + (self.page_cache.arena.peak_used_bytes if self.page_cache else 0)
        if self.packed is not None:
            arenas = self.packed.arenas
            device += arenas[Tier.DEVICE].peak_used_bytes if Tier.DEVICE in arenas else 0
            host += arenas[Tier.HOST].peak_used_bytes if Tier.HOST in arenas else 0
        return {Tier.DEVICE.value: device, Tier.HOST.value: host + staging,
                Tier.DISK.value: self._disk_peak * disk_page}

    def held_bytes(self, seq: KVSequence) -> dict[LayerKind, dict[Tier, int]]:
        """Bytes of the sequence's live pages per layer kind and tier (a page shared with
        another sequence counts for each)."""
        out = {kind: per_tier() for kind in LayerKind}
        if seq.released:
            return out
        for layer in range(self.num_layers):
            first, n = seq.table.first_live(layer), seq.table.num_pages(layer)
            where = zip(seq.table.tiers(layer)[first:n], seq.table.packed(layer)[first:n])
            for (tier, packed), count in collections.Counter(where).items():
                out[self.kinds[layer]][tier] += count * self.stored_page_bytes(tier, packed)
        return out

    # ----- sequences ----------------------------------------------------------------------
    def new_sequence(self) -> KVSequence:
        a = self.arena
        bounds = KeyBounds(self.global_layers, num_layers=self.num_layers, num_kv_heads=a.num_kv_heads,
                           head_dim=a.head_dim, page_size=self.page_size, dtype=a.dtype, device=self.compute_device)
        return KVSequence(PageTable(self.num_layers), [0] * self.num_layers, bounds=bounds)

    def _allocate(self, tier: Tier, layer: int, n: int, needed_tokens: int, packed: bool = False) -> list[int]:
        if tier == Tier.DISK:
            if self.disk is None:
                raise CapacityError("pages were placed on DISK but no disk tier is configured; give --disk-space")
            if self.free_slots(Tier.DISK) < n:
                raise CapacityError(f"the DISK tier is full ({self.disk_slots_limit} pages); raise --disk-space")
            slots = self._disk_slots[layer].allocate(n)
            self._disk_peak = max(self._disk_peak, sum(d.num_used for d in self._disk_slots))
            if self.page_cache is not None:
                self.page_cache.forget(layer, slots)  # these slots will hold other pages
            return slots
        pool = self.pool_for(tier, packed)
        slots = (pool.allocate_shuffled(n, self._shuffle) if self._shuffle is not None and tier == Tier.DEVICE
                 else pool.allocate(n))
        if tier == Tier.HOST and self.acts is not None and slots is not None:
            self.acts.forget(slots)  # a K/V page now
        if slots is None:
            capacity = pool.num_slots * self.page_size // self.num_layers
            raise CapacityError(
                f"the {tier.value.upper()} {'4-bit ' if packed else ''}KV arena is full: it holds {pool.num_slots} pages "
                f"({capacity} tokens of all {self.num_layers} layers) and {pool.num_used} are in use; "
                f"this step needs {n} more for {needed_tokens} tokens; raise --{tier.value}-memory "
                f"(a page is {pool.slot_bytes} bytes)"
            )
        return slots

    def _free(self, tier: Tier, layer: int, slots: list[int], packed: bool = False) -> None:
        if not slots:
            return
        if tier == Tier.DISK:
            self._disk_slots[layer].free_slots(slots)
        else:
            self.pool_for(tier, packed).free(slots)

    # ----- writes -------------------------------------------------------------------------
    def append(self, seq: KVSequence, layer: int, k: torch.Tensor, v: torch.Tensor,
               placement: Placement | None = None, *, prepared: bool = False) -> None:
        """Write K/V of the next tokens of ``layer`` into its pages, adding pages as needed.

        New full pages go where ``placement`` says (default: DEVICE); the last, partly filled
        page always goes to DEVICE. DISK pages are written asynchronously (``KVWriter.flush``).
        A decode step's pages already exist (``prepare_decode``): only the token is written.

        Args:
            k, v: [T, num_kv_heads, head_dim].
            prepared: a decode step's token whose page moves ``prepare_decode`` made: the page
                table is taken as it stands.
        """
        assert not seq.released
        start = seq.lengths[layer]
        end = start + k.shape[0]
        if prepared:
            assert end == start + 1 and seq.table.num_pages(layer) * self.page_size >= end
            seq.track_keys(layer, start, k)
            self.writes.write_tokens(seq, layer, start, end, k, v)
            seq.lengths[layer] = end
            return
        first = self._make_pages(seq, layer, start, end, placement or Placement())
        seq.track_keys(layer, start, k)  # after the pages exist: a refused append changes nothing
        if first > start:  # tokens that land only in pages out of a sliding window are not written
            k, v = k[first - start:], v[first - start:]
        if end > first:
            self.writes.write_tokens(seq, layer, first, end, k, v)
        seq.lengths[layer] = end
        self.pack_window(seq, layer, end, placement or Placement())

    def pack_window(self, seq: KVSequence, layer: int, length: int, placement: Placement) -> None:
        """With 4-bit pages: pack the layer's exact pages that a length of ``length`` tokens
        puts out of the exact window (``packed_below``), each onto the tier ``placement``
        gives it (a decode step's default: DEVICE, making room there as ``add_pages`` does).
        Their key bounds become the packed keys' (as a DocCache restore derives them)."""
        below = self.packed_below(layer, length)
        packed = seq.table.packed(layer)
        pids = [p for p in range(max(1, seq.table.first_live(layer)), min(below, len(packed))) if not packed[p]]
        if not pids:
            return
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        assert all(tiers[p] == Tier.DEVICE for p in pids), "exact pages live on DEVICE with 4-bit pages"
        old = [slots[p] for p in pids]
        index = torch.tensor(old, dtype=torch.int64, device=self.arena.device)
        k, v = self.arena.k.index_select(1, index), self.arena.v.index_select(1, index)
        targets = self._packed_targets(seq, layer, [placement.tier_of(p, layer) for p in pids])
        for tier in dict.fromkeys(targets):
            at = [i for i, t in enumerate(targets) if t == tier]
            new = self._allocate(tier, layer, len(at), len(at) * self.page_size, packed=True)
            self.writes.write_packed(seq, layer, tier, new, [pids[i] for i in at], k[:, at], v[:, at])
            for i, slot in zip(at, new):
                seq.table.replace(layer, pids[i], PageLocation(tier, slot, True))
        self.arena.free(old)

    def _make_pages(self, seq: KVSequence, layer: int, start: int, end: int, placement: Placement) -> int:
        """Give ``layer`` the pages tokens [start, end) land in (a sliding layer first drops the
        pages out of its window) and return the first token that lands in a live page."""
        ps = self.page_size
        have, need = seq.table.num_pages(layer), cdiv(end, ps)
        window = self.windows[layer]
        if window is not None:
            # A sliding layer: the next query (at position end - 1 in decode, where the token
            # is appended before attending) sees keys from end - window on.
            keep = max(0, end - window) // ps
            self._drop_pages(seq, layer, min(keep, have))
            for _ in range(have, min(keep, need)):  # pages out of the window before they exist
                seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
            seq.table.drop_before(layer, keep)
            start = max(start, keep * ps)
            have = seq.table.num_pages(layer)
        self.add_pages(seq, layer, have, need, end, end - start, placement)
        return start

    def prepare_decode(self, seq: KVSequence) -> None:
        """Before a decode step: give every layer the page its token lands in, making now the
        moves its appends would make (a new DEVICE tail page; when DEVICE has no free slot,
        an older page evicted to HOST or DISK; a sliding layer's page out of the window
        dropped), so that the step's read sets are built, and its DISK reads planned, over
        the page tables attention will see."""
        if self.page_cache is not None:
            self.page_cache.begin_step()
        for layer in range(self.num_layers):
            length = seq.lengths[layer]
            self._make_pages(seq, layer, length, length + 1, Placement())
            self.pack_window(seq, layer, length + 1, Placement())

    def add_pages(self, seq: KVSequence, layer: int, have: int, need: int, end: int, t: int,
                  placement: Placement, packed_below: int | None = None) -> None:
        """Append pages ``have .. need - 1`` of ``layer`` to the table, each on its tier (a
        sliding layer's and the partly filled last page on DEVICE, the others where
        ``placement`` says). When DEVICE is short, the sequence's older full pages of global
        layers move to HOST or DISK first: this layer's own, then the other global layers'
        (a sliding layer's ring cannot move, so its room comes from them). A refused
        allocation takes nothing. With 4-bit pages, new pages 1 .. ``packed_below`` - 1
        (default: out of the exact window at ``end`` tokens) are packed, placed as the
        placement says; the exact ones (sink, window, tail) live on DEVICE."""
        window = self.windows[layer]
        new_ids = list(range(have, need))
        if packed_below is None:
            packed_below = self.packed_below(layer, end)
        kinds = [(Tier.DEVICE, False) if (window is not None or (pid == need - 1 and end % self.page_size))
                 else (placement.tier_of(pid, layer), True) if 1 <= pid < packed_below
                 else (Tier.DEVICE if self.packed is not None else placement.tier_of(pid, layer), False)
                 for pid in new_ids]
        if self.packed is not None:
            at = [i for i, (_, packed) in enumerate(kinds) if packed]
            for i, tier in zip(at, self._packed_targets(seq, layer, [kinds[i][0] for i in at])):
                kinds[i] = (tier, True)
        else:
            self._room_on_device(seq, layer, kinds.count((Tier.DEVICE, False)))
        taken: dict[tuple[Tier, bool], collections.deque[int]] = {}
        try:
            for tier, packed in dict.fromkeys(kinds):
                n = kinds.count((tier, packed))
                taken[(tier, packed)] = collections.deque(self._allocate(tier, layer, n, t, packed))
        except CapacityError:
            for (tier, packed), slots in taken.items():  # a refused step takes nothing
                self._free(tier, layer, list(slots), packed)
            raise
        for tier, packed in kinds:
            seq.table.append(layer, PageLocation(tier, taken[(tier, packed)].popleft(), packed))

    def _packed_targets(self, seq: KVSequence, layer: int, targets: list[Tier]) -> list[Tier]:
        """Where 4-bit pages placed on ``targets`` go: DEVICE as far as its packed arena holds
        them once older packed pages moved off (``_room_on_device``), the rest (the first ones)
        to HOST while it has room, then DISK."""
        want = targets.count(Tier.DEVICE)
        if not want:
            return targets
        if Tier.DEVICE in self.packed.arenas:
            self._room_on_device(seq, layer, want)
        spill = max(0, want - self.free_slots(Tier.DEVICE, True))
        host = self.free_slots(Tier.HOST, True)
        out = []
        for tier in targets:
            if tier == Tier.DEVICE and spill:
                spill -= 1
                tier = Tier.HOST if host > 0 else Tier.DISK
                host -= tier == Tier.HOST
            out.append(tier)
        return out

    def _room_on_device(self, seq: KVSequence, layer: int, pages: int) -> None:
        """Make DEVICE room for ``pages`` more pages of the kind that can move (exact mode:
        exact pages; 4-bit mode: packed ones) by moving the sequence's older full pages of
        global layers off DEVICE: this layer's own first, then the other global layers'."""
        short = pages - self.free_slots(Tier.DEVICE, self.packed is not None)
        if short > 0:
            own = self.move_off_device(seq, short, [layer]) if self.windows[layer] is None else 0
            if own < short:
                self.move_off_device(seq, short - own, [g for g in self.global_layers if g != layer])

    def _drop_pages(self, seq: KVSequence, layer: int, keep: int) -> None:
        """Release the layer's live pages before page ``keep`` (out of its sliding window)."""
        first = seq.table.first_live(layer)
        if keep <= first:
            return
        tiers, slots = seq.table.tiers(layer)[first:keep], seq.table.slots(layer)[first:keep]
        for tier in dict.fromkeys(tiers):  # a sliding layer's pages: exact
            self._free(tier, layer, [s for tr, s in zip(tiers, slots) if tr == tier])
        seq.table.drop_before(layer, keep)

    def move_off_device(self, seq: KVSequence, count: int, layers: Sequence[int]) -> int:
        """Make DEVICE room: move up to ``count`` of ``seq``'s full DEVICE pages of ``layers``
        (global layers) to HOST if it has room, else DISK, spread evenly over the layers, each
        layer's oldest first (``_evict``: never page 0, never a page another sequence shares).
        The pages' contents are unchanged; only where they live. Returns how many moved."""
        moved, active = 0, list(layers)
        while moved < count and active:
            share = cdiv(count - moved, len(active))
            still = []
            for layer in active:
                n = self._evict(seq, layer, min(share, count - moved))
                moved += n
                if n == share:  # it may hold more
                    still.append(layer)
                if moved == count:
                    break
            active = still
        return moved

    def _evict(self, seq: KVSequence, layer: int, count: int) -> int:
        """Move up to ``count`` of this layer's oldest full DEVICE pages (never page 0, the
        attention sink; never a page another sequence shares) to HOST if it has room, else
        DISK. Moves nothing it cannot place; returns how many moved."""
        ps, packed = self.page_size, self.packed is not None
        if packed and Tier.DEVICE not in self.packed.arenas:
            return 0  # no 4-bit page lives on DEVICE
        full = seq.lengths[layer] // ps
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        formats = seq.table.packed(layer)
        pool = self.pool_for(Tier.DEVICE, packed)
        moved = 0
        for pid in range(1, full):
            if moved == count:
                break
            if tiers[pid] != Tier.DEVICE or formats[pid] != packed or pool.refcount(slots[pid]) != 1:
                continue
            target = Tier.HOST if self.free_slots(Tier.HOST, packed) > 0 else Tier.DISK
            if target == Tier.DISK and self.free_slots(Tier.DISK) <= 0:
                break
            old = slots[pid]
            (new,) = self._allocate(target, layer, 1, ps, packed)
            self.writes.copy_off_device(layer, old, target, new, packed)
            pool.free([old])
            seq.table.replace(layer, pid, PageLocation(target, new, packed))
            self.io.evicted_pages += 1
            moved += 1
        return moved

    def movable_device_pages(self, seq: KVSequence, layers: Sequence[int]) -> int:
        """How many of ``seq``'s DEVICE pages of ``layers`` ``move_off_device`` could move
        (full, not page 0, not shared), were HOST and DISK roomy enough."""
        ps, count, packed = self.page_size, 0, self.packed is not None
        if packed and Tier.DEVICE not in self.packed.arenas:
            return 0
        pool = self.pool_for(Tier.DEVICE, packed)
        for layer in layers:
            tiers, slots, formats = seq.table.tiers(layer), seq.table.slots(layer), seq.table.packed(layer)
            count += sum(1 for pid in range(max(1, seq.table.first_live(layer)), seq.lengths[layer] // ps)
                         if tiers[pid] == Tier.DEVICE and formats[pid] == packed and pool.refcount(slots[pid]) == 1)
        return count

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
        return KVSequence(table, list(seq.lengths), bounds=seq.bounds.copy() if seq.bounds is not None else None,
                          prior=dict(seq.prior), lsh=seq.lsh.fork() if seq.lsh is not None else None)

    def _for_each_tier(self, table: PageTable, layer: int, *, incref: bool) -> None:
        by_pool: dict[tuple[Tier, bool], list[int]] = collections.defaultdict(list)
        first = table.first_live(layer)
        for tier, slot, packed in zip(table.tiers(layer)[first:], table.slots(layer)[first:],
                                      table.packed(layer)[first:]):
            by_pool[(tier, packed)].append(slot)
        for (tier, packed), slots in by_pool.items():
            if not incref:
                self._free(tier, layer, slots, packed)
            elif tier == Tier.DISK:
                self._disk_slots[layer].incref(slots)
            else:
                self.pool_for(tier, packed).incref(slots)

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
        self.writes.flush()
