"""The query-agnostic control of the sparse modes: the sink page and the most recent pages.

StreamingLLM (Xiao et al. 2024) keeps the first tokens (attention sinks) and a recent window.
Here, page-granular and at the same budget F as a query-aware mode: a layer of ``n`` pages
attends page 0 and its last ``floor(F * n) - 1`` pages. It scans no metadata, so it is known
before the query and read ahead. Fidelity runs (``bench/fidelity.py``) compare every mode
with it: a query-aware mode must beat it at the same F.
"""
from __future__ import annotations

import math

import torch

from offload.attention.quest import fixed_pages
from offload.kv.page_table import KVSequence, LayerKind, cdiv
from offload.kv.reads import PageChoice

__all__ = ["SinkWindowSelector"]


class SinkWindowSelector:
    """A ``PageSelector``: sink page plus recent pages, ``floor(F * n)`` pages per global layer."""

    def __init__(self, *, budget: float, page_size: int, kinds: tuple[LayerKind, ...]) -> None:
        self.budget, self.page_size, self.kinds = budget, page_size, kinds
        self.fallback, self.bounds_bytes, self.selection_s = "", 0, 0.0

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        if self.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        n = cdiv(length, self.page_size)
        allowed = math.floor(self.budget * n + 1e-9)
        if allowed >= n or allowed <= len(fixed_pages(n)):
            self.fallback = f"sink+window at F={self.budget:g} over {n} pages leaves nothing to drop or to add"
            return PageChoice(pages=None, needs_query=False)
        return PageChoice(pages=(0, *range(n - allowed + 1, n)), needs_query=False)
