"""Page selection: which pages of a layer a decode step attends.

A ``PageSelector`` owns the policy; the read set (``offload.kv.reads.LayerReads``) built from
its answer is the only description of the step's bytes that the read-ahead, the CUDA
fetch-ahead and attention see. A selector is asked twice at most per layer and step:

1. at the step's start, before any query exists (``query=None``): the pages it can name
   already are read ahead, all layers in order;
2. if that answer said ``needs_query``, again with the layer's query: the final set. Pages it
   adds are read on demand; planned pages it no longer names are dropped unread where possible.

Exact mode (``ExactSelector``) names every live page at step 1 and is never asked again. The
sparse modes (page bounds, speculation one layer ahead, LSH sampling) are further selectors.
"""
from __future__ import annotations

from typing import Protocol

import torch

from offload.kv.page_table import KVSequence
from offload.kv.reads import PageChoice

__all__ = ["PageSelector", "ExactSelector", "PageChoice"]


class PageSelector(Protocol):
    """Chooses the pages a decode step attends, layer by layer.

    Attributes (read by the engine's ``read_account``): ``fallback``, why the current step
    attends every page in a sparse mode ("" otherwise; the engine resets it per step);
    ``bounds_bytes`` and ``selection_s``, key-bound bytes scanned and seconds spent so far.
    """

    fallback: str
    bounds_bytes: int
    selection_s: float

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        """The pages of ``layer`` to attend when it holds ``length`` tokens (the step's own
        token included; page ids ``seq.table.first_live(layer) .. cdiv(length, page_size) - 1``).

        Args:
            query: None at the step's start (read ahead); the layer's query
                [1, num_heads, head_dim] when the first answer said ``needs_query``.
        """
        ...


class ExactSelector:
    """Every live page, known before the query (exact mode)."""

    def __init__(self) -> None:
        self.fallback, self.bounds_bytes, self.selection_s = "", 0, 0.0

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        return PageChoice(pages=None, needs_query=False)
