"""Read sets: the pages one layer attends in one step, derived once, consumed by everyone.

A decode step makes one ``LayerReads`` per layer, right after the step's page moves
(``PagedKV.prepare_decode``) and before anything is read. It names, per piece, the pages, their
tier, their slots and how attention reaches them (``Route``). Then:

- the read-ahead reads exactly the DISK chunks of the pieces marked ``ahead``, all layers in
  order (``KVReader.plan``); pieces not marked ahead are read on demand (``read_now``);
- on CUDA the fetch-ahead copies exactly the HOST groups and DISK chunks of the pieces routed
  through the compute device (``KVReader.fetch_ahead``, keys from ``fetch_keys``);
- attention computes one ``(out, lse)`` partial per piece (``offload.attention.decode``);
- the I/O counters are updated from the read set when it is consumed (``KVReader.count``).

Nobody re-derives pages from the page table: a sparse selection (a ``PageSelector`` in
``offload.attention.selection``) only changes which pages the builder is given. The set
describes bytes to attend, not a policy::

    page ids:   0   1   2   3   4   5   6   7   8   9  (tail)
    tier:       D   D   H   H   H   K   K   K   K   D       D = DEVICE, H = HOST, K = DISK
    selected:   *       *   *       *   *       *   *
    pieces:     DEVICE PAGED_DEVICE [0, 9]; HOST PAGED_CPU [2] (delegated share);
                HOST GROUPS [3]; DISK chunk [5, 6, 8] (extents [5, 6] and [8]: one staging
                buffer, one kernel call)

A piece has a ``kind``. Exact mode builds only ``DENSE`` pieces (whole pages as stored); the
sparse, 4-bit and recompute modes add their own kinds (sampled tokens with weights, 4-bit
pages, keys rebuilt from low-rank factors) beside it.
"""
from __future__ import annotations

import collections
import contextlib
import weakref
from collections.abc import Collection, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from cpu_kernels.quant4 import Quant4PagesNp, dequantize_pages_4bit
from offload.kv.counters import IOCounters
from offload.kv.page_table import KVSequence, cdiv, group_pages
from offload.kv.read_sets import (
    GROUPS_ONLY,
    LayerReads,
    PageChoice,
    PageGroup,
    Piece,
    PieceKind,
    Route,
    RouteRule,
    Sample,
    fetch_keys,
)
from offload.kv.readahead import Chunk, Extent, PageLayout, ReadAhead
from storage import PageArena, Tier
from storage.aligned import AlignedBuffer

if TYPE_CHECKING:
    from offload.kv.paged_kv import PagedKV

__all__ = ["PieceKind", "Route", "Piece", "LayerReads", "PageChoice", "RouteRule", "PageGroup", "KVReader",
           "fetch_keys", "GROUPS_ONLY"]


def _by_tier(ids: list[int], tiers: list[Tier], formats: list[bool], *, whole: bool) -> dict[tuple[Tier, bool], list[int]]:
    """The page ids by (tier, packed), each in ``ids``' order (``whole``: ids are a slice of the
    table). Comprehensions per kind present, not a dict lookup per page: a decode step builds
    this for every layer over every page."""
    lo = ids[0] if ids else 0
    sel_t = tiers[lo:lo + len(ids)] if whole else [tiers[p] for p in ids]
    sel_f = formats[lo:lo + len(ids)] if whole else [formats[p] for p in ids]
    packed = True in sel_f
    out: dict[tuple[Tier, bool], list[int]] = collections.defaultdict(list)
    for tier in (Tier.DISK, Tier.HOST, Tier.DEVICE):
        if tier not in sel_t:
            continue
        if not packed:
            out[(tier, False)] = [p for p, t in zip(ids, sel_t) if t is tier]
            continue
        for fmt in (False, True):
            out[(tier, fmt)] = [p for p, t, f in zip(ids, sel_t, sel_f) if t is tier and f is fmt]
    return out


class KVReader:
    """Builds read sets from the page tables and executes their reads.

    Owned by the engine's thread, like the ``PagedKV`` it reads (``kv``); the store's threads
    only fill the read-ahead's staging buffers. ``kv`` owns this reader and is held through a
    weak proxy: a strong one made a cycle, so a closed engine's arenas and staging buffers
    (GPU and pinned memory on CUDA) stayed allocated until the cycle collector ran.
    """

    def __init__(self, kv: "PagedKV", *, readahead: ReadAhead | None, layout: PageLayout | None,
                 counters: IOCounters) -> None:
        self.kv: PagedKV = weakref.proxy(kv)  # type: ignore[assignment]  # see the class docstring
        self.readahead = readahead
        self.layout = layout
        self.io = counters
        self._unpack: tuple[torch.Tensor, torch.Tensor] | None = None
        # id(staging buffer) -> (the buffer, kept alive so the id stays its own; its slots as uint8 rows)
        self._staged_rows: dict[int, tuple[AlignedBuffer, np.ndarray]] = {}

    # ----- building -----------------------------------------------------------------------
    def layer_reads(self, seq: KVSequence, layer: int, *, rule: RouteRule = GROUPS_ONLY, length: int | None = None,
                    pages: Sequence[int] | None = None, host_share: float = 0.0, window: int | None = None,
                    planned: Collection[Chunk] | None = None, sampled: Sequence[int] = (),
                    sample: Sample | None = None, cached: bool = False) -> LayerReads:
        """The read set of ``layer`` over ``length`` tokens (default: the layer's length).

        Args:
            rule: the routes the consuming attention takes.
            length: tokens to attend over; a decode step passes the length after its append
                (its page exists already: ``PagedKV.prepare_decode``).
            pages: ascending page ids to attend (a selection); None = every live page.
            host_share: share of the set's HOST pages (the first ones in page order) the CPU
                attends in place (PAGED_CPU); the rest cross to the compute device.
            window: a sliding layer's window in keys, for a single query at position
                ``length - 1``: keys before ``length - window`` are skipped inside the first page.
            planned: the DISK chunks already planned for this layer (a set rebuilt once the
                query exists): a chunk of this set among them is taken from the read-ahead,
                any other is read on demand. None = every chunk is read ahead.
            sampled, sample: pages holding a sample's tokens (disjoint from ``pages``) and the
                sample: one SAMPLED piece per memory tier (rows read in place by the CPU,
                ``sample.row_bytes``) and DISK chunks of them (read whole).
            cached: a sparse decode step's selection: its exact DISK pages found in the page
                cache (``PagedKV.page_cache``) are attended there (one CACHED piece on the
                compute device), the others read and then added to it.
        """
        kv, ps = self.kv, self.kv.page_size
        length = seq.lengths[layer] if length is None else length
        first_live, n = seq.table.first_live(layer), cdiv(length, ps)
        ids = list(range(first_live, n)) if pages is None else list(pages)
        assert pages is None or all(first_live <= p < n for p in ids), "a selection names a page the layer does not hold"
        assert n <= seq.table.num_pages(layer), "the step's pages must exist before its reads are planned"
        tiers, slots, formats = seq.table.tiers(layer), seq.table.slots(layer), seq.table.packed(layer)
        skip = max(0, length - window) - first_live * ps if window is not None and ids and ids[0] == first_live else 0
        by_tier = _by_tier(ids, tiers, formats, whole=pages is None)
        pieces: list[Piece] = []

        def tokens(pids: list[int]) -> int:
            return len(pids) * ps - (ps * n - length if pids and pids[-1] == n - 1 else 0)

        def add(tier: Tier, route: Route, pids: list[int], packed: bool = False, *,
                kind: PieceKind | None = None, at: Sequence[int] | None = None, **kw: object) -> None:
            if not pids:
                return
            cpu = route == Route.PAGED_CPU or (route == Route.PAGED_DEVICE and rule.device_kernel_on_cpu)
            copied = route == Route.GROUPS and tier != Tier.DEVICE and rule.cuda
            kind = kind or (PieceKind.PACKED4 if packed else PieceKind.DENSE)
            pieces.append(Piece(tier=tier, kind=kind, route=route, page_ids=tuple(pids),
                                slots=tuple(map(slots.__getitem__, pids)) if at is None else tuple(at),
                                tokens=tokens(pids), skip=skip if pids[0] == first_live else 0, cpu_attended=cpu,
                                copied=copied, **kw))

        cache = kv.page_cache if cached and rule.device_paged and rule.cpu_in_ram else None
        if cache is not None and by_tier[(Tier.DISK, False)]:
            disk = by_tier[(Tier.DISK, False)]
            found = cache.lookup(layer, [slots[p] for p in disk])
            add(Tier.DEVICE, Route.PAGED_DEVICE, [p for p, c in zip(disk, found) if c is not None],
                kind=PieceKind.CACHED, at=[c for c in found if c is not None])
            by_tier[(Tier.DISK, False)] = [p for p, c in zip(disk, found) if c is None]
        for packed in (False, True):  # DISK holds one format: the engine's
            for pids, chunk in self._chunks(layer, by_tier[(Tier.DISK, packed)], slots, planned):
                route = Route.PAGED_CPU if rule.cpu_in_ram else Route.GROUPS
                add(Tier.DISK, route, pids, packed, chunk=chunk, ahead=planned is None or chunk in planned)
        device_route = Route.PAGED_DEVICE if rule.device_paged else Route.GROUPS
        if kv.acts is not None and kv.acts.slots:  # KVPR's pages: K/V recomputed on the compute device
            recomputed, by_tier[(Tier.HOST, False)] = kv.acts.split(by_tier[(Tier.HOST, False)], slots)
            add(Tier.HOST, Route.GROUPS, recomputed, kind=PieceKind.RECOMPUTED)
        for packed in (False, True):
            host = by_tier[(Tier.HOST, packed)]
            delegated = len(host) if rule.cpu_in_ram else round(host_share * len(host))
            add(Tier.HOST, Route.GROUPS, host[delegated:], packed)
            add(Tier.DEVICE, device_route, by_tier[(Tier.DEVICE, packed)], packed)
            add(Tier.HOST, Route.PAGED_CPU, host[:delegated], packed)
        if sample is not None:
            self._sampled_pieces(layer, list(sampled), tiers, slots, planned, sample, add)
        return LayerReads(layer=layer, kind=kv.kinds[layer], pieces=tuple(pieces), length=length, sample=sample,
                          fills_cache=cache is not None)

    def _sampled_pieces(self, layer: int, pids: list[int], tiers: list[Tier], slots: list[int],
                        planned: Collection[Chunk] | None, sample: Sample, add) -> None:
        """A sample's pages: DISK ones in chunks read whole, each memory tier's as one piece
        whose bytes are the rows it reads; the CPU attends them all in place (sampling runs on
        CPU-only machines)."""
        disk = [p for p in pids if tiers[p] == Tier.DISK]
        for part, chunk in self._chunks(layer, disk, slots, planned):
            add(Tier.DISK, Route.PAGED_CPU, part, kind=PieceKind.SAMPLED, chunk=chunk,
                ahead=planned is None or chunk in planned)
        for tier in (Tier.HOST, Tier.DEVICE):
            mine = [p for p in pids if tiers[p] == tier]
            add(tier, Route.PAGED_CPU, mine, kind=PieceKind.SAMPLED, nbytes=sample.row_bytes.get(tier, 0))

    def _chunks(self, layer: int, pids: list[int], slots: list[int],
                planned: Collection[Chunk] | None = None) -> Iterator[tuple[list[int], Chunk]]:
        """DISK pages cut into staging chunks of at most ``chunk_pages`` pages each, in page
        order, each chunk's extents the runs of consecutive pages at consecutive file positions.
        With ``planned``: first the planned chunks of the layer that still hold a named page,
        read ahead as they were (the piece takes the pages named, ``Piece.chunk_positions``;
        the others were read for nothing); then the pages left, in chunks of their own (read
        on demand)."""
        if not pids:
            return
        assert self.readahead is not None
        if planned:
            named, kept = set(pids), set()
            for c in sorted((c for c in planned if c.layer == layer), key=lambda c: c.extents[0].first_page):
                ids = c.page_ids  # in page order, as planned: the read-ahead hands chunks out in order
                use = [p for p in ids if p in named and p not in kept]
                if use:
                    kept.update(use)
                    yield use, c
            pids = [p for p in pids if p not in kept]
        limit = self.readahead.chunk_pages
        for s in range(0, len(pids), limit):
            part = pids[s:s + limit]
            extents, start = [], 0
            for i in range(1, len(part) + 1):
                if i == len(part) or part[i] != part[i - 1] + 1 or slots[part[i]] != slots[part[i - 1]] + 1:
                    extents.append(Extent(part[start], slots[part[start]], i - start))
                    start = i
            yield part, Chunk(layer, tuple(extents))

    # ----- reading ahead ------------------------------------------------------------------
    def plan(self, step_reads: Sequence[LayerReads]) -> None:
        """Start reading the DISK chunks the step's sets read ahead, layer by layer in order."""
        if self.readahead is None:
            return
        self.kv.writes.flush()
        self.readahead.plan([c for r in step_reads for c in r.chunks(ahead=True)])

    def plan_more(self, reads: LayerReads) -> None:
        """Read a later layer's set ahead too, after what is planned (a set made during the
        step: a speculative one, one layer ahead)."""
        if self.readahead is not None:
            self.readahead.extend(reads.chunks(ahead=True))

    def drop_unused(self, before: LayerReads, after: LayerReads) -> None:
        """Forget the chunks ``before`` read ahead that ``after`` (the same layer's set once
        the query existed) no longer names."""
        if self.readahead is not None:
            keep = set(after.chunks(ahead=True))
            self.readahead.drop([c for c in before.chunks(ahead=True) if c not in keep])

    def page_bytes(self, piece: Piece) -> int:
        """Bytes per page of a piece as stored (a 4-bit page's packed bytes; exact: a page)."""
        if piece.kind == PieceKind.RECOMPUTED:
            assert self.kv.acts is not None
            return self.kv.acts.page_bytes
        return self.kv.stored_page_bytes(piece.tier, True) if piece.kind == PieceKind.PACKED4 else self.kv.page_bytes

    def count(self, reads: LayerReads) -> None:
        """Count the set's bytes as read (and as CPU-attended or copied where it says)."""
        io = self.io
        by_kind = io.read_by_kind[reads.kind]
        for p in reads.pieces:
            nbytes = p.bytes_read(self.page_bytes(p))
            io.bytes_read[p.tier] += nbytes
            by_kind[p.tier] += nbytes
            if p.cpu_attended:
                io.cpu_attended_bytes[p.tier] += nbytes
            if p.copied:
                io.copied_to_device_bytes += nbytes

    # ----- staged DISK chunks ---------------------------------------------------------------
    def _take(self, piece: Piece) -> AlignedBuffer:
        assert self.readahead is not None and piece.chunk is not None
        if self.kv.writes.pending:
            self.kv.writes.flush()
        take = self.readahead.take if piece.ahead else self.readahead.read_now
        buf, waited = take(piece.chunk)
        self.io.fetch_wait_s += waited
        return buf

    @contextlib.contextmanager
    def staged(self, piece: Piece) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """A DISK piece's chunk where the read-ahead staged it, without unpacking: k and v
        strided views [num_kv_heads, n, page_size, head_dim] into the staging buffer (a page
        arena of the chunk's n pages for an in-place CPU kernel, the piece's at
        ``chunk_positions``), valid inside the ``with`` block."""
        assert self.layout is not None and self.readahead is not None
        buf = self._take(piece)
        try:
            pages = self.layout.pages(buf, piece.chunk.num_pages)
            yield pages[:, 0].transpose(0, 1), pages[:, 1].transpose(0, 1)
            del pages
        finally:
            self.readahead.give_back(buf)

    @contextlib.contextmanager
    def staged_rows(self, piece: Piece) -> Iterator[np.ndarray]:
        """A DISK piece of 4-bit pages where the read-ahead staged it: the staging buffer's
        slots as uint8 rows [slots, DISK slot bytes], one page blob at the start of each, the
        chunk's pages first (the piece's at ``chunk_positions``); valid inside the block. The
        rows of a buffer are made once."""
        kv = self.kv
        assert kv.packed is not None and kv.disk is not None and self.readahead is not None
        buf = self._take(piece)
        try:
            cached = self._staged_rows.get(id(buf))
            if cached is None or cached[0] is not buf:
                size = kv.disk.disk_page_bytes
                rows = buf.torch()[: buf.nbytes // size * size].view(-1, size).numpy()
                cached = self._staged_rows[id(buf)] = (buf, rows)
            yield cached[1]
        finally:
            self.readahead.give_back(buf)

    @contextlib.contextmanager
    def staged_packed(self, piece: Piece) -> Iterator[Quant4PagesNp]:
        """``staged_rows`` as head-major numpy views of the pages (``Quant4Layout.numpy_views``)."""
        assert self.kv.packed is not None
        with self.staged_rows(piece) as rows:
            yield self.kv.packed.layout.numpy_views(rows)

    def packed_blobs(self, piece: Piece) -> torch.Tensor:
        """The blobs of a piece of 4-bit pages, [n, page_bytes] uint8 on the CPU, in page order
        (a DISK piece's chunk read, or taken from the read-ahead)."""
        kv = self.kv
        assert kv.packed is not None and piece.kind == PieceKind.PACKED4
        size = kv.packed.layout.page_bytes
        if piece.tier != Tier.DISK:
            return kv.pool_for(piece.tier, True).rows(list(piece.slots))[:, :size].cpu()
        assert kv.disk is not None and self.readahead is not None
        buf = self._take(piece)
        try:
            rows = buf.torch()[: piece.chunk.num_pages * kv.disk.disk_page_bytes].view(-1, kv.disk.disk_page_bytes)
            return rows[piece.chunk_positions(), :size].clone()
        finally:
            self.readahead.give_back(buf)

    # ----- token groups -------------------------------------------------------------------
    def groups(self, piece: Piece, layer: int, max_tokens: int) -> Iterator[PageGroup]:
        """A piece as groups of at most ``max_tokens`` tokens (at least one page each) on the
        compute device: views or gathers of an arena (copied to a GPU for HOST pages), or an
        unpacked DISK chunk; pieces the CUDA fetch-ahead copied are taken from it. A sliding
        window's ``skip`` is cut from the first group."""
        cut = piece.skip
        for g in self._groups(piece, layer, max(1, max_tokens // self.kv.page_size)):
            if cut:
                g, cut = PageGroup(g.k[:, cut:], g.v[:, cut:], g.start_pos + cut, g.tier), 0
            yield g

    def _groups(self, piece: Piece, layer: int, max_pages: int) -> Iterator[PageGroup]:
        if piece.kind == PieceKind.RECOMPUTED:
            assert self.kv.acts is not None
            for run in piece.runs(self.kv.page_size):
                yield from self.kv.acts.groups(run, layer, max_pages)
            return
        if piece.kind == PieceKind.PACKED4:
            yield from self._packed_groups(piece, max_pages)
            return
        if piece.tier == Tier.DISK:
            yield from self._disk_groups(piece, max_pages)
            return
        for run in piece.runs(self.kv.page_size):
            yield from self._run_groups(run, layer, max_pages)

    def _packed_groups(self, piece: Piece, max_pages: int) -> Iterator[PageGroup]:
        """A piece of 4-bit pages dequantized into groups on the compute device (pages of one
        run are consecutive; the partly filled tail is never packed)."""
        kv = self.kv
        assert kv.packed is not None
        layout, ps = kv.packed.layout, kv.page_size
        if piece.tier == Tier.DISK:
            with self.staged_packed(piece) as pages:
                pos = piece.chunk_positions()
                kd, vd = (torch.from_numpy(a) for a in dequantize_pages_4bit(
                    Quant4PagesNp(*(x[:, pos] for x in (pages.k_q, pages.k_scale, pages.k_min, pages.v_q,
                                                        pages.v_scale, pages.v_min)))))
        else:
            kd, vd = layout.dequantize(kv.pool_for(piece.tier, True).rows(list(piece.slots)))
        nkv, n, _, hd = kd.shape
        k = kd.reshape(nkv, n * ps, hd).to(kv.compute_device, kv.arena.dtype)
        v = vd.reshape(nkv, n * ps, hd).to(kv.compute_device, kv.arena.dtype)
        for s in range(0, n, max_pages):
            e = min(n, s + max_pages)
            yield PageGroup(k[:, s * ps:e * ps], v[:, s * ps:e * ps], piece.page_ids[s] * ps, piece.tier)

    def _run_groups(self, piece: Piece, layer: int, max_pages: int) -> Iterator[PageGroup]:
        ps, kv = self.kv.page_size, self.kv
        pool: PageArena = kv.pool_of(piece.tier)
        fetcher = kv.fetcher
        short = piece.num_pages * ps - piece.tokens  # the partly filled last page's missing tokens
        for s, group, contiguous in group_pages(list(piece.slots), max_pages):
            n_tokens = len(group) * ps - (short if s + len(group) == piece.num_pages else 0)
            start = piece.page_ids[s] * ps
            fetched = fetcher.take((piece.tier, layer, tuple(group))) if fetcher is not None else None
            if fetched is not None:  # copied ahead on the side stream
                yield PageGroup(fetched[0][:, :n_tokens], fetched[1][:, :n_tokens], start, piece.tier)
                continue
            k, v = pool.read(group, n_tokens, contiguous=contiguous)
            if k.device != kv.compute_device:
                k = k.to(kv.compute_device, non_blocking=True)
                v = v.to(kv.compute_device, non_blocking=True)
            yield PageGroup(k, v, start, piece.tier)

    def _unpack_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [num_kv_heads, chunk tokens, head_dim] that DISK chunks are unpacked into.

        A group yielded from them is valid until the next group is asked for (attention
        computes each partial before asking for the next).
        """
        if self._unpack is None:
            assert self.readahead is not None and self.layout is not None
            lo = self.layout
            shape = (lo.num_kv_heads, self.readahead.chunk_pages * lo.page_size, lo.head_dim)
            self._unpack = (torch.empty(shape, dtype=lo.dtype), torch.empty(shape, dtype=lo.dtype))
        return self._unpack

    def _disk_groups(self, piece: Piece, max_pages: int) -> Iterator[PageGroup]:
        assert self.layout is not None and piece.chunk is not None
        ps, lo, kv = self.kv.page_size, self.layout, self.kv
        first = piece.page_ids[0] * ps  # (a start position only for exact sets: consecutive pages)
        pos = piece.chunk_positions()
        whole = len(pos) == piece.chunk.num_pages
        assert whole or piece.tokens == len(pos) * ps, "part of a chunk is taken in whole pages"
        fetched = kv.fetcher.take((Tier.DISK, piece.chunk)) if kv.fetcher is not None else None
        if fetched is not None:  # read, then copied ahead on the side stream
            k, v = fetched
            if not whole:  # the pages the selection kept of a chunk read ahead
                idx = torch.tensor(pos, dtype=torch.int64, device=k.device)
                k = k.reshape(k.shape[0], -1, ps, k.shape[2]).index_select(1, idx).reshape(k.shape[0], -1, k.shape[2])
                v = v.reshape(v.shape[0], -1, ps, v.shape[2]).index_select(1, idx).reshape(v.shape[0], -1, v.shape[2])
        else:
            n = piece.num_pages
            with self.staged(piece) as (k_pages, v_pages):
                # Pages are page-major on disk; attention wants head-major runs of tokens. The
                # copy goes into one persistent buffer (fresh memory each chunk would cost
                # page faults on every byte).
                k_all, v_all = self._unpack_buffers()
                k, v = k_all[:, : n * ps], v_all[:, : n * ps]
                k.view(lo.num_kv_heads, n, ps, lo.head_dim).copy_(k_pages if whole else k_pages[:, pos])
                v.view(lo.num_kv_heads, n, ps, lo.head_dim).copy_(v_pages if whole else v_pages[:, pos])
            k, v = k[:, : piece.tokens], v[:, : piece.tokens]
            if k.device != kv.compute_device:
                k, v = k.to(kv.compute_device), v.to(kv.compute_device)
        for s in range(0, k.shape[1], max_pages * ps):
            e = min(k.shape[1], s + max_pages * ps)
            yield PageGroup(k[:, s:e], v[:, s:e], first + s, Tier.DISK)

    def layer_groups(self, seq: KVSequence, layer: int, max_tokens: int) -> Iterator[PageGroup]:
        """Every stored token of ``layer`` as groups in page order, through an exact read set
        of token groups (prefill, DocCache writing, tests), counted as read."""
        reads = self.layer_reads(seq, layer)
        runs = [run for piece in reads.pieces for run in piece.runs(self.kv.page_size)]
        for run in sorted(runs, key=lambda r: r.page_ids[0]):
            yield from self.groups(run, layer, max_tokens)
        self.count(reads)

    # ----- CUDA fetch-ahead ---------------------------------------------------------------------
    def fetch_ahead(self, reads: LayerReads, max_tokens: int) -> None:
        """Start copying the set's HOST groups and DISK chunks routed through the CUDA device
        on the side stream (``offload.kv.cuda_fetch``), in the groups ``groups`` takes, until
        the fetcher's allowance is full. Waits for the chunks' disk reads (the GPU still runs
        the queued layer meanwhile). No-op without a fetcher."""
        f = self.kv.fetcher
        if f is None:
            return
        f.begin_layer()
        if self.kv.writes.pending:
            self.kv.writes.flush()
        by_key = {}
        for piece in reads.pieces:
            if piece.route == Route.GROUPS and piece.tier == Tier.DISK:
                by_key[(Tier.DISK, piece.chunk)] = piece
        max_pages = max(1, max_tokens // self.kv.page_size)
        for key, pages in fetch_keys(reads, max_pages, self.kv.page_size):
            if not f.room(pages):
                return
            if key[0] == Tier.DISK:
                piece = by_key[key]
                assert self.layout is not None and self.readahead is not None
                buf = self._take(piece)
                try:
                    assert piece.num_pages == pages, "fetched ahead: a set made before its query, of whole chunks"
                    f.put_pages(key, self.layout.pages(buf, pages), piece.tokens)
                finally:
                    self.readahead.give_back(buf)
            else:
                self._fetch_host_group(key, list(key[2]))

    def _fetch_host_group(self, key: Hashable, group: list[int]) -> None:
        pool, f = self.kv.pool_of(Tier.HOST), self.kv.fetcher
        assert f is not None
        s0, n = group[0], len(group)
        if group == list(range(s0, s0 + n)):
            k_src, v_src = pool.k[:, s0:s0 + n], pool.v[:, s0:s0 + n]
        else:
            idx = torch.tensor(group, dtype=torch.int64)
            shape = (pool.num_kv_heads, n, self.kv.page_size, pool.head_dim)
            k_src = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
            v_src = torch.empty(shape, dtype=pool.dtype, pin_memory=True)
            torch.index_select(pool.k, 1, idx, out=k_src)
            torch.index_select(pool.v, 1, idx, out=v_src)
        f.put_run(key, k_src, v_src, n * self.kv.page_size)
