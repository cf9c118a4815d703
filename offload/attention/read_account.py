"""What decode steps read of the global layers' K/V, against what exact attention would read.

Every mode is measured the same way, from the read sets the step consumed (exact mode gives
1.0): per step, over the global layers (sliding rings are reported apart, in
``bytes_read_per_token_by_kind``)::

    kv_fraction_read    = (pages attended * page bytes + sampled rows read in memory
                           + key bounds / hash ids scanned) / exact bytes
    kv_fraction_fetched = (HOST and DISK pages attended + pages read ahead and left unused)
                          * page bytes / exact bytes
    exact bytes         = every live page of the step's global layers * page bytes

A page is counted whole even when partly filled, as exact attention's own denominator is. A
4-bit page counts its packed bytes as stored (a DISK slot's aligned size), against exact pages
in the denominator.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

from offload.kv.page_table import LayerKind
from offload.kv.reads import LayerReads, Piece
from offload.stats import RunStats
from storage import Tier

__all__ = ["StepReads", "ReadAccount"]


@dataclasses.dataclass(slots=True)
class StepReads:
    """One decode step's global-layer bytes (see the module docstring)."""

    exact_bytes: int = 0
    read_bytes: int = 0
    fetched_bytes: int = 0
    sync_miss_bytes: int = 0  # HOST/DISK pages named only once the query existed: read on demand
    wasted_bytes: int = 0  # DISK chunks read ahead for pages the final set dropped
    bounds_bytes: int = 0
    selected_pages: int = 0
    layers: int = 0
    selection_s: float = 0.0
    fallback: str = ""
    spec_hits: int = 0  # speculative mode: live-chosen pages the prediction had named
    spec_chosen: int = 0  # speculative mode: pages the live query chose

    def add_layer(self, before: LayerReads, after: LayerReads, *, exact_pages: int, page_bytes: int,
                  stored: Callable[[Piece], int] | None = None) -> None:
        """A layer's set before the query (``before``) and the one attention consumed.
        ``page_bytes``: an exact page's bytes (the denominator's); ``stored``: a piece's
        bytes per page as stored (4-bit pages: their packed bytes; default ``page_bytes``)."""
        if after.kind != LayerKind.GLOBAL:
            return
        per_page = stored or (lambda piece: page_bytes)
        self.layers += 1
        self.exact_bytes += exact_pages * page_bytes
        for piece in after.pieces:
            self.selected_pages += piece.num_pages
            self.read_bytes += piece.bytes_read(per_page(piece))
            if piece.tier != Tier.DEVICE:
                self.fetched_bytes += piece.bytes_read(per_page(piece))
        if before is after:  # chosen before the query (exact mode): nothing read on demand or dropped
            return
        named_before = set(before.pages())
        for piece in after.pieces:
            if piece.tier != Tier.DEVICE and piece.nbytes is None:
                self.sync_miss_bytes += sum(p not in named_before for p in piece.page_ids) * per_page(piece)
        used = sum(piece.num_pages * per_page(piece) for piece in after.pieces
                   if piece.chunk is not None and piece.ahead)
        ahead = {p.chunk: p for p in before.pieces if p.chunk is not None and p.ahead}
        self.wasted_bytes += sum(c.num_pages * per_page(p) for c, p in ahead.items()) - used

    def finish(self, *, bounds_bytes: int, selection_s: float, fallback: str) -> None:
        self.bounds_bytes, self.selection_s, self.fallback = bounds_bytes, selection_s, fallback
        self.read_bytes += bounds_bytes
        self.fetched_bytes += self.wasted_bytes

    def speculated(self, *, hits: int, chosen: int) -> None:
        self.spec_hits, self.spec_chosen = hits, chosen

    @property
    def fraction_read(self) -> float:
        return self.read_bytes / self.exact_bytes if self.exact_bytes else 1.0

    @property
    def fraction_fetched(self) -> float:
        return self.fetched_bytes / self.exact_bytes if self.exact_bytes else 0.0


class ReadAccount:
    """The decode steps of one request, summed into its ``RunStats`` (running sums: filling the
    stats after every step costs the same at step 10 and at step 10,000)."""

    def __init__(self) -> None:
        self.steps = 0
        self._read = self._read_max = self._fetched = self._selection_s = 0.0
        self._pages = self._layers = self._miss = self._wasted = self._bounds = 0
        self._fallbacks = 0
        self._last_fallback = ""
        self._spec_hits = self._spec_chosen = 0

    def add(self, step: StepReads) -> None:
        self.steps += 1
        self._read += step.fraction_read
        self._read_max = max(self._read_max, step.fraction_read)
        self._fetched += step.fraction_fetched
        self._selection_s += step.selection_s
        self._pages += step.selected_pages
        self._layers += step.layers
        self._miss += step.sync_miss_bytes
        self._wasted += step.wasted_bytes
        self._bounds += step.bounds_bytes
        self._spec_hits += step.spec_hits
        self._spec_chosen += step.spec_chosen
        if step.fallback:
            self._fallbacks += 1
            self._last_fallback = step.fallback

    def fill(self, stats: RunStats) -> None:
        n = self.steps
        if not n:
            return
        stats.kv_fraction_read = min(self._read / n, self._read_max)  # rounding of the sum
        stats.kv_fraction_read_max = self._read_max
        stats.kv_fraction_fetched = self._fetched / n
        stats.selection_s = self._selection_s
        stats.selected_pages_per_layer = self._pages / self._layers if self._layers else 0.0
        stats.sync_miss_bytes_per_token = self._miss // n
        stats.wasted_prefetch_bytes_per_token = self._wasted // n
        stats.key_bounds_bytes_read_per_token = self._bounds // n
        stats.speculation_hit_rate = self._spec_hits / self._spec_chosen if self._spec_chosen else None
        stats.sparse_fallback = (f"{self._fallbacks} of {n} steps exact: {self._last_fallback}"
                                 if self._fallbacks else "")
