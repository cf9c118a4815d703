"""Writes of the paged KV: tokens into their pages on every tier, DocCache restores, and the
queue of DISK writes in flight.

DISK pages are written whole and asynchronously by the store's threads: the source bytes are
laid out as the slots are (``PageLayout``) in an aligned buffer held until the write is done;
at most ``max_write_bytes`` are in flight (the oldest write is waited for past that). Reads
of DISK pages flush the queue first (``flush``), so a page is never read before it is written.
Owned by the engine's thread.
"""
from __future__ import annotations

import collections
import weakref
from typing import TYPE_CHECKING

import torch

from offload.kv.page_table import KVSequence, PageLocation, cdiv
from offload.kv.placement import Placement
from storage import Tier
from storage.aligned import DISK_ALIGNMENT, AlignedBuffer
from storage.disk_store import TransferHandle

if TYPE_CHECKING:
    from offload.kv.paged_kv import PagedKV

__all__ = ["KVWriter"]


class KVWriter:
    """Writes tokens and whole pages into the slots ``kv``'s tables name.

    Args:
        kv: the paged KV (pools, tables, counters).
        max_write_bytes: bound on the bytes of DISK writes in flight.
    """

    def __init__(self, kv: "PagedKV", *, max_write_bytes: int) -> None:
        # A weak proxy: ``kv`` owns this writer, and a strong reference back made a cycle that
        # kept a closed engine's KV memory until the cycle collector ran (``KVReader`` alike).
        self.kv: PagedKV = weakref.proxy(kv)  # type: ignore[assignment]
        self.max_write_bytes = max_write_bytes
        # DISK writes in flight: the handle, what holds the source bytes alive, their size.
        self._writes: collections.deque[tuple[TransferHandle, object, int]] = collections.deque()
        self._write_bytes = 0

    @property
    def pending(self) -> bool:
        """Whether DISK writes are in flight."""
        return bool(self._writes)

    # ----- tokens -------------------------------------------------------------------------
    def write_tokens(self, seq: KVSequence, layer: int, start: int, end: int, k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """Tokens [start, end) of ``layer`` (k, v [end - start, num_kv_heads, head_dim]) into
        the pages the table holds for them; DISK pages must be covered whole."""
        kv, ps = self.kv, self.kv.page_size
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        if end - start == 1:  # decode: one token into the DEVICE tail page, no index tensors
            kv.arena.write_token(slots[start // ps], start % ps, k[0], v[0])
            kv.io.written_by_kind[kv.kinds[layer]][tiers[start // ps]] += kv.page_bytes // ps
            return
        mem: dict[Tier, tuple[list[int], list[int], list[int]]] = {}  # tier -> token idx, slot, offset
        disk_runs: list[tuple[int, int, int]] = []  # (first page, first disk slot, pages)
        packed: dict[Tier, list[int]] = {}  # tier -> packed page ids (whole pages)
        formats = seq.table.packed(layer)
        for pid in range(start // ps, cdiv(end, ps)):
            tier, slot = tiers[pid], slots[pid]
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
            if formats[pid]:
                assert lo == pid * ps and hi == (pid + 1) * ps, "4-bit pages are written whole"
                packed.setdefault(tier, []).append(pid)
                continue
            if tier == Tier.DISK:
                assert lo == pid * ps and hi == (pid + 1) * ps, "DISK pages are written whole"
                _extend_run(disk_runs, pid, slot)
                continue
            idx, sl, off = mem.setdefault(tier, ([], [], []))
            idx.extend(range(lo - start, hi - start))
            sl.extend([slot] * (hi - lo))
            off.extend(range(lo - pid * ps, hi - pid * ps))
        for tier, (idx, sl, off) in mem.items():
            pool = kv.pool_of(tier)
            index = torch.tensor(idx, dtype=torch.int64, device=k.device)
            pool.write(torch.tensor(sl, dtype=torch.int64, device=pool.device),
                       torch.tensor(off, dtype=torch.int64, device=pool.device),
                       k.index_select(0, index).to(pool.device), v.index_select(0, index).to(pool.device))
        for first, slot0, n in disk_runs:
            a = first * ps - start
            self.submit_tokens(layer, slot0, k[a: a + n * ps], v[a: a + n * ps], n)
        for tier, pids in packed.items():
            index = torch.tensor([i for p in pids for i in range(p * ps - start, (p + 1) * ps - start)],
                                 dtype=torch.int64, device=k.device)
            shape = (len(pids), ps, kv.arena.num_kv_heads, kv.arena.head_dim)
            kp = k.index_select(0, index).reshape(shape).permute(2, 0, 1, 3)  # [nkv, n, ps, hd]
            vp = v.index_select(0, index).reshape(shape).permute(2, 0, 1, 3)
            self.write_packed(seq, layer, tier, [slots[p] for p in pids], pids, kp, vp)
        self.count_written(layer, seq, start, end)

    def write_packed(self, seq: KVSequence, layer: int, tier: Tier, slots: list[int], pids: list[int],
                     k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole pages k, v [num_kv_heads, n, page_size, head_dim] into the 4-bit
        ``slots`` of ``tier`` (pages ``pids`` of ``layer``); their key bounds become the
        packed keys' (a DocCache restore derives them from the same bytes)."""
        kv = self.kv
        assert kv.packed is not None
        layout, n = kv.packed.layout, len(slots)
        if tier == Tier.DISK:
            assert kv.disk is not None
            buf = AlignedBuffer(n * kv.disk.disk_page_bytes)
            raw = buf.torch()[: n * kv.disk.disk_page_bytes].view(n, kv.disk.disk_page_bytes)
            layout.quantize_into(raw, k, v)
            for i, slot0, m in _runs(slots):
                self.submit_blobs(layer, slot0, raw[i:i + m])
        else:
            pool = kv.pool_for(tier, True)
            raw = torch.empty((n, layout.page_bytes), dtype=torch.uint8, device=pool.device)
            layout.quantize_into(raw, k, v)
            pool.write_rows(slots, raw)
        if seq.bounds is not None:
            seq.bounds.replace_pages(layer, pids, layout.dequantize(raw)[0])

    def count_written(self, layer: int, seq: KVSequence, start: int, end: int) -> None:
        """Count the K/V bytes of tokens [start, end) of ``layer`` written, per tier (a page
        as it is stored: a 4-bit page's share of its packed bytes)."""
        kv, ps = self.kv, self.kv.page_size
        tiers, formats = seq.table.tiers(layer), seq.table.packed(layer)
        written = kv.io.written_by_kind[kv.kinds[layer]]
        for pid in range(start // ps, cdiv(end, ps)):
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
            written[tiers[pid]] += (kv.stored_page_bytes(tiers[pid], True) if formats[pid]
                                    else (hi - lo) * (kv.page_bytes // ps))

    # ----- restores (DocCache) ------------------------------------------------------------
    def restore_pages(self, seq: KVSequence, layer: int, start: int, pages: torch.Tensor, tokens: int,
                      placement: Placement | None = None, *, length: int | None = None) -> None:
        """Load a layer from whole pages as DISK stores them (a DocCache's bytes): ``pages``
        [n, 2, num_kv_heads, page_size, head_dim] on the CPU hold tokens [start, start +
        tokens) (the last page's tail is padding). Pages placed on DISK are written as they
        are, memory pages copied into their slots: no round trip through token order.

        A global layer may be restored in pieces: a later call continues at the page-aligned
        end of the previous one (``start`` = the layer's length). With 4-bit pages, the pages
        the whole document (``length`` tokens; default: up to this piece) keeps packed hold
        their packed blob at the start of the page's bytes (``packed_record``)."""
        kv, ps = self.kv, self.kv.page_size
        a = kv.arena
        n = pages.shape[0]
        if n != cdiv(tokens, ps) or tuple(pages.shape[1:]) != (2, a.num_kv_heads, ps, a.head_dim):
            raise ValueError(f"restore_pages got pages of shape {tuple(pages.shape)} for {tokens} tokens")
        have = seq.table.num_pages(layer)
        continuing = (kv.windows[layer] is None and have and seq.lengths[layer] == start
                      and not start % ps and have == start // ps)
        if not continuing and (seq.lengths[layer] or have or start % ps):
            raise ValueError(f"restore needs an empty layer (or, for a global layer, the page-aligned end of "
                             f"its restored pages) and a page-aligned start, got start {start}")
        if kv.windows[layer] is not None:  # a ring: through the token path, which drops what it must
            tok = pages.permute(1, 0, 3, 2, 4).reshape(2, n * ps, a.num_kv_heads, a.head_dim)
            self.restore(seq, layer, start, tok[0, :tokens], tok[1, :tokens], placement)
            return
        if not continuing:
            _mark_dropped(seq, layer, start // ps)
        end = start + tokens
        first = start // ps
        kv.add_pages(seq, layer, first, first + n, end, tokens, placement or Placement(),
                     packed_below=kv.packed_below(layer, length if length is not None else end))
        tiers, slots, formats = seq.table.tiers(layer), seq.table.slots(layer), seq.table.packed(layer)
        keys = self._restore_packed(layer, pages, [i for i in range(n) if formats[first + i]],
                                    [tiers[first + i] for i in range(n)], [slots[first + i] for i in range(n)])
        mem: dict[Tier, tuple[list[int], list[int]]] = {}  # tier -> page index into `pages`, slot
        disk_runs: list[tuple[int, int, int]] = []  # (page index, first disk slot, pages)
        for i in range(n):
            tier, slot = tiers[first + i], slots[first + i]
            if formats[first + i]:
                continue
            if tier == Tier.DISK:
                _extend_run(disk_runs, i, slot)
            else:
                idx, sl = mem.setdefault(tier, ([], []))
                idx.append(i)
                sl.append(slot)
        for tier, (idx, sl) in mem.items():
            sel = pages[idx[0]: idx[-1] + 1] if idx == list(range(idx[0], idx[-1] + 1)) else pages[idx]
            kv.pool_of(tier).write_pages(sl, sel[:, 0].transpose(0, 1), sel[:, 1].transpose(0, 1))
        for i, slot0, m in disk_runs:
            self.submit_pages(layer, slot0, pages[i: i + m])
        self.count_written(layer, seq, start, end)
        if seq.bounds is not None:  # derived from the restored keys: the bounds their prefill kept
            seq.bounds.update(layer, start, keys.permute(0, 2, 1, 3).reshape(n * ps, a.num_kv_heads,
                                                                              a.head_dim)[:tokens])
        seq.lengths[layer] = end

    def _restore_packed(self, layer: int, pages: torch.Tensor, packed: list[int], tiers: list[Tier],
                        slots: list[int]) -> torch.Tensor:
        """Write the packed pages among restored ``pages`` (indices ``packed``: their blobs at
        the start of each page's bytes) into their slots; returns the pages' keys [n,
        num_kv_heads, page_size, head_dim], the packed ones dequantized."""
        keys = pages[:, 0]
        if not packed:
            return keys
        layout = self.kv.packed.layout
        blobs = pages[packed].contiguous().view(len(packed), -1).view(torch.uint8)[:, : layout.page_bytes]
        for tier in dict.fromkeys(tiers[i] for i in packed):
            at = [j for j, i in enumerate(packed) if tiers[i] == tier]
            tier_slots = [slots[packed[j]] for j in at]
            if tier == Tier.DISK:
                for j, slot0, m in _runs(tier_slots):
                    self.submit_blobs(layer, slot0, blobs[at[j:j + m]])
            else:
                self.kv.pool_for(tier, True).write_rows(tier_slots, blobs[at])
        keys = keys.clone()
        keys[packed] = layout.dequantize(blobs)[0].transpose(0, 1).to(keys.dtype)
        return keys

    def restore(self, seq: KVSequence, layer: int, start: int, k: torch.Tensor, v: torch.Tensor,
                placement: Placement | None = None) -> None:
        """Load stored tokens [start, start + T) of an empty layer of ``seq`` (a DocCache):
        ``start`` (a page boundary) is the first live page's first token (0, or where a
        sliding layer's ring began); the pages before it count as dropped."""
        ps = self.kv.page_size
        if seq.lengths[layer] or seq.table.num_pages(layer) or start % ps:
            raise ValueError(f"restore needs an empty layer and a page-aligned start, got start {start}")
        _mark_dropped(seq, layer, start // ps)
        seq.lengths[layer] = start
        self.kv.append(seq, layer, k, v, placement)

    def clear_ring(self, seq: KVSequence, layer: int) -> None:
        """Empty a sliding layer of ``seq`` (its ring's slots freed), so that ``restore`` can
        load a stored ring into it (a DocCache restore that recomputed a prefix first)."""
        kv = self.kv
        if kv.windows[layer] is None:
            raise ValueError(f"clear_ring empties a sliding layer; layer {layer} is global")
        kv._drop_pages(seq, layer, seq.table.num_pages(layer))
        seq.table.clear(layer)
        seq.lengths[layer] = 0

    def copy_off_device(self, layer: int, old: int, target: Tier, new: int, packed: bool) -> None:
        """Copy DEVICE slot ``old`` (of the format's arena) to slot ``new`` of HOST or DISK (an
        eviction: the page table is the caller's)."""
        kv = self.kv
        if packed:
            assert kv.packed is not None
            blob = kv.packed.arenas[Tier.DEVICE].rows([old])
            if target == Tier.HOST:
                kv.packed.arenas[Tier.HOST].write_rows([new], blob)
            else:
                self.submit_blobs(layer, new, blob.cpu())
        elif target == Tier.HOST:
            assert kv.host_arena is not None
            kv.host_arena.k[:, new].copy_(kv.arena.k[:, old])
            kv.host_arena.v[:, new].copy_(kv.arena.v[:, old])
        else:
            k = kv.arena.k[:, old].transpose(0, 1).cpu()  # [page_size, nkv, hd]
            v = kv.arena.v[:, old].transpose(0, 1).cpu()
            self.submit_tokens(layer, new, k, v, 1)

    # ----- the DISK write queue -----------------------------------------------------------
    def submit_tokens(self, layer: int, slot0: int, k: torch.Tensor, v: torch.Tensor, n: int) -> None:
        """Write ``n`` whole pages of tokens (k, v [n * page_size, num_kv_heads, head_dim])
        to DISK slots ``slot0 ..``."""
        kv = self.kv
        assert kv.disk is not None and kv.layout is not None
        buf = AlignedBuffer(n * kv.disk.disk_page_bytes)
        pages = kv.layout.pages(buf, n)
        shape = (n, kv.page_size, kv.arena.num_kv_heads, kv.arena.head_dim)
        pages[:, 0].copy_(k.reshape(shape).transpose(1, 2))
        pages[:, 1].copy_(v.reshape(shape).transpose(1, 2))
        del pages
        self._submit_buffer(layer, slot0, buf, n)

    def submit_pages(self, layer: int, slot0: int, src: torch.Tensor) -> None:
        """Write whole pages [n, 2, num_kv_heads, page_size, head_dim] (DISK's layout) to
        DISK slots ``slot0 ..``."""
        kv = self.kv
        assert kv.disk is not None and kv.layout is not None
        n = src.shape[0]
        if (kv.disk.disk_page_bytes == kv.page_bytes and src.is_contiguous() and src.device.type == "cpu"
                and src.data_ptr() % DISK_ALIGNMENT == 0):
            # Already laid out as the slots are and aligned for O_DIRECT: written from where it is.
            raw = src.view(torch.uint8).reshape(-1)
            self._submit_view(layer, slot0, memoryview(raw.numpy()), raw, n)
            return
        buf = AlignedBuffer(n * kv.disk.disk_page_bytes)
        pages = kv.layout.pages(buf, n)
        pages.copy_(src)
        del pages
        self._submit_buffer(layer, slot0, buf, n)

    def submit_blobs(self, layer: int, slot0: int, blobs: torch.Tensor) -> None:
        """Write packed pages, blobs [n, >= page_bytes] uint8 on the CPU, to DISK slots ``slot0 ..``."""
        kv = self.kv
        assert kv.disk is not None
        n, size = blobs.shape[0], kv.disk.disk_page_bytes
        if blobs.shape[1] == size and blobs.is_contiguous() and blobs.data_ptr() % DISK_ALIGNMENT == 0:
            self._submit_view(layer, slot0, memoryview(blobs.numpy()).cast("B"), blobs, n)
            return
        buf = AlignedBuffer(n * size)
        buf.torch()[: n * size].view(n, size)[:, : blobs.shape[1]].copy_(blobs)
        self._submit_buffer(layer, slot0, buf, n)

    def _submit_buffer(self, layer: int, slot0: int, buf: AlignedBuffer, n: int) -> None:
        assert self.kv.disk is not None
        self._submit_view(layer, slot0, buf.memoryview()[: n * self.kv.disk.disk_page_bytes], buf, n)

    def _submit_view(self, layer: int, slot0: int, view: memoryview, keep: object, n: int) -> None:
        """Write ``n`` slots from ``view`` (aligned, ``n`` DISK slots long); ``keep`` holds its
        memory until the write is done."""
        disk = self.kv.disk
        assert disk is not None
        handle = disk.submit_write(layer, slot0, view, n)
        self._writes.append((handle, keep, view.nbytes))
        self._write_bytes += view.nbytes
        self.kv.io.disk_bytes_written += n * disk.disk_page_bytes
        while self._write_bytes > self.max_write_bytes:  # bound the write staging
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        handle, _, nbytes = self._writes.popleft()
        self._write_bytes -= nbytes
        handle.wait()

    def flush(self) -> None:
        """Wait for every DISK write in flight (errors surface here)."""
        while self._writes:
            self._finish_oldest()


def _extend_run(runs: list[tuple[int, int, int]], index: int, slot: int) -> None:
    """Add page ``index`` at DISK ``slot`` to runs of (first index, first slot, pages),
    extending the last run when both continue it."""
    last = runs[-1] if runs else None
    if last and last[0] + last[2] == index and last[1] + last[2] == slot:
        runs[-1] = (last[0], last[1], last[2] + 1)
    else:
        runs.append((index, slot, 1))


def _runs(slots: list[int]) -> list[tuple[int, int, int]]:
    """Runs of consecutive slots as (first index, first slot, length)."""
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(slots):
        _extend_run(runs, i, slot)
    return runs


def _mark_dropped(seq: KVSequence, layer: int, pages: int) -> None:
    """The layer's first ``pages`` pages exist only as dropped entries (out of a window)."""
    for _ in range(pages):
        seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
    seq.table.drop_before(layer, pages)
