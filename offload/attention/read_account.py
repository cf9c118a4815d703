"""What decode steps read of the global layers' K/V, against what exact attention would read.

Every mode is measured the same way, from the read sets the step consumed (exact mode gives
1.0): per step, over the global layers (sliding rings are reported apart, in
``bytes_read_per_token_by_kind``)::

    kv_fraction_read    = (pages attended * page bytes + key bounds scanned) / exact bytes
    kv_fraction_fetched = (HOST and DISK pages attended + read-ahead chunks dropped unused)
                          * page bytes / exact bytes
    exact bytes         = every live page of the step's global layers * page bytes

A page is counted whole even when partly filled, as exact attention's own denominator is.
"""
from __future__ import annotations

import dataclasses
import statistics

from offload.kv.page_table import LayerKind
from offload.kv.reads import LayerReads
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

    def add_layer(self, before: LayerReads, after: LayerReads, *, exact_pages: int, page_bytes: int) -> None:
        """A layer's set before the query (``before``) and the one attention consumed."""
        if after.kind != LayerKind.GLOBAL:
            return
        named_before = set(before.pages())
        self.layers += 1
        self.exact_bytes += exact_pages * page_bytes
        for piece in after.pieces:
            self.selected_pages += piece.num_pages
            self.read_bytes += piece.num_pages * page_bytes
            if piece.tier != Tier.DEVICE:
                self.fetched_bytes += piece.num_pages * page_bytes
                self.sync_miss_bytes += sum(p not in named_before for p in piece.page_ids) * page_bytes
        kept = set(after.chunks(ahead=True))
        self.wasted_bytes += sum(c.num_pages for c in before.chunks(ahead=True) if c not in kept) * page_bytes

    def finish(self, *, bounds_bytes: int, selection_s: float, fallback: str) -> None:
        self.bounds_bytes, self.selection_s, self.fallback = bounds_bytes, selection_s, fallback
        self.read_bytes += bounds_bytes
        self.fetched_bytes += self.wasted_bytes

    @property
    def fraction_read(self) -> float:
        return self.read_bytes / self.exact_bytes if self.exact_bytes else 1.0

    @property
    def fraction_fetched(self) -> float:
        return self.fetched_bytes / self.exact_bytes if self.exact_bytes else 0.0


class ReadAccount:
    """The decode steps of one request, summed into its ``RunStats``."""

    def __init__(self) -> None:
        self.steps: list[StepReads] = []

    def add(self, step: StepReads) -> None:
        self.steps.append(step)

    def fill(self, stats: RunStats) -> None:
        steps = self.steps
        if not steps:
            return
        n = len(steps)
        stats.kv_fraction_read = statistics.fmean(s.fraction_read for s in steps)
        stats.kv_fraction_read_max = max(s.fraction_read for s in steps)
        stats.kv_fraction_fetched = statistics.fmean(s.fraction_fetched for s in steps)
        stats.selection_s = sum(s.selection_s for s in steps)
        layers = sum(s.layers for s in steps)
        stats.selected_pages_per_layer = sum(s.selected_pages for s in steps) / layers if layers else 0.0
        stats.sync_miss_bytes_per_token = sum(s.sync_miss_bytes for s in steps) // n
        stats.wasted_prefetch_bytes_per_token = sum(s.wasted_bytes for s in steps) // n
        stats.key_bounds_bytes_read_per_token = sum(s.bounds_bytes for s in steps) // n
        fallbacks = [s.fallback for s in steps if s.fallback]
        stats.sparse_fallback = (f"{len(fallbacks)} of {n} steps exact: {fallbacks[-1]}" if fallbacks else "")
