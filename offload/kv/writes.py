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
            self.count_written(layer, tiers, start, end)
            return
        mem: dict[Tier, tuple[list[int], list[int], list[int]]] = {}  # tier -> token idx, slot, offset
        disk_runs: list[tuple[int, int, int]] = []  # (first page, first disk slot, pages)
        for pid in range(start // ps, cdiv(end, ps)):
            tier, slot = tiers[pid], slots[pid]
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
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
        self.count_written(layer, tiers, start, end)

    def count_written(self, layer: int, tiers: list[Tier], start: int, end: int) -> None:
        """Count the K/V bytes of tokens [start, end) of ``layer`` written, per tier."""
        ps = self.kv.page_size
        token_bytes = self.kv.page_bytes // ps
        written = self.kv.io.written_by_kind[self.kv.kinds[layer]]
        if start // ps == (end - 1) // ps:  # one page (every decode step)
            if end > start:
                written[tiers[start // ps]] += (end - start) * token_bytes
            return
        for pid in range(start // ps, cdiv(end, ps)):
            lo, hi = max(start, pid * ps), min(end, (pid + 1) * ps)
            written[tiers[pid]] += (hi - lo) * token_bytes

    # ----- restores (DocCache) ------------------------------------------------------------
    def restore_pages(self, seq: KVSequence, layer: int, start: int, pages: torch.Tensor, tokens: int,
                      placement: Placement | None = None) -> None:
        """Load a layer from whole pages as DISK stores them (a DocCache's bytes): ``pages``
        [n, 2, num_kv_heads, page_size, head_dim] on the CPU hold tokens [start, start +
        tokens) (the last page's tail is padding). Pages placed on DISK are written as they
        are, memory pages copied into their slots: no round trip through token order.

        A global layer may be restored in pieces: a later call continues at the page-aligned
        end of the previous one (``start`` = the layer's length)."""
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
        kv.add_pages(seq, layer, first, first + n, end, tokens, placement or Placement())
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        mem: dict[Tier, tuple[list[int], list[int]]] = {}  # tier -> page index into `pages`, slot
        disk_runs: list[tuple[int, int, int]] = []  # (page index, first disk slot, pages)
        for i in range(n):
            tier, slot = tiers[first + i], slots[first + i]
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
        self.count_written(layer, tiers, start, end)
        if seq.bounds is not None:  # derived from the restored keys: the bounds their prefill kept
            seq.bounds.update(layer, start, pages[:, 0].permute(0, 2, 1, 3).reshape(n * ps, a.num_kv_heads,
                                                                                     a.head_dim)[:tokens])
        seq.lengths[layer] = end

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


def _mark_dropped(seq: KVSequence, layer: int, pages: int) -> None:
    """The layer's first ``pages`` pages exist only as dropped entries (out of a window)."""
    for _ in range(pages):
        seq.table.append(layer, PageLocation(Tier.DEVICE, -1))
    seq.table.drop_before(layer, pages)
