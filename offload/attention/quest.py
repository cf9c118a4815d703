"""Query-aware page selection by key bounds (Quest, Tang et al. 2024), within a byte budget.

At every decode step, for every global layer, with the layer's live query::

    pages 0 .. n-1 of the layer (n = cdiv(length, page_size))
    fixed:      the sink page (0), the recent window (``WINDOW_PAGES`` before the tail), the tail
    candidates: every other page, scored by its upper bound of q . k (``offload.kv.key_bounds``)
    chosen:     the fixed pages and the best candidates, as many as the budget allows

The budget is F (``RuntimeConfig.sparse_budget``) of the bytes exact attention reads in the
layer at that step: ``F * n`` pages, less the candidates' bounds (``1 / page_size`` of a page
each). Pages not chosen stay where they are; the next step may choose them. Sliding layers
(rings, always whole) are not selected. When F covers every page, or leaves no candidate to
choose, the step is exact (``fallback`` says why).

Scores: the bound of each query head is maxed over its KV group (a group shares one read), each
KV head's bounds become a distribution over the candidates (softmax), and a page scores its
largest share in any KV head: the pages are read for all heads at once, so the union of the
heads' needs decides.

The pages it can name before the query (the fixed ones) are read ahead; the chosen candidates
are read on demand once the query exists (``needs_query``). That on-demand read is what
speculation one layer ahead removes.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from offload.kv.page_table import KVSequence, LayerKind, cdiv
from offload.kv.reads import PageChoice

__all__ = ["QuestSelector", "WINDOW_PAGES", "SINK_PAGES", "pages_within_budget"]

POOL_FACTOR = 2  # with a prompt prior: bounds scanned for twice as many of its best pages as are chosen
PRIOR_WEIGHT = 0.5  # the prior's share of a pooled page's score (the live bounds' share is the rest)
SINK_PAGES = 1  # the first page: attention sinks (StreamingLLM, Xiao et al. 2024)
WINDOW_PAGES = 2  # recent pages before the tail, always attended


def fixed_pages(n: int) -> list[int]:
    """The pages every step attends of a layer of ``n`` pages: sink, recent window, tail."""
    return sorted({*range(min(SINK_PAGES, n)), *range(max(0, n - 1 - WINDOW_PAGES), n)})


def pages_within_budget(n: int, budget: float, page_size: int) -> tuple[int | None, str]:
    """How many of a layer's ``n`` pages a step may attend at budget F, once the candidates'
    bounds are paid (each ``1 / page_size`` of a page), and why not (None: exact instead)."""
    fixed = len(fixed_pages(n))
    candidates = n - fixed
    allowed = math.floor(budget * n - candidates / page_size + 1e-9)
    if allowed >= n or budget >= 1.0:  # reading every page, with no bounds, fits
        return None, f"the budget covers every page ({n} pages at F={budget:g})"
    if allowed <= fixed:
        return None, (f"too few pages to choose from: {n} pages at F={budget:g} leave "
                      f"{max(0, allowed)} after the bounds, and sink, window and tail take {fixed}")
    return allowed, ""


def pool_within_budget(n: int, budget: float, page_size: int, pool_factor: int) -> tuple[int, int]:
    """With a prompt prior: (pages to choose beyond the fixed ones, candidates whose bounds
    are scanned: ``pool_factor`` times as many, the prior's best), the most that fit F with
    the scanned bounds paid; (0, 0) when none fits."""
    fixed = len(fixed_pages(n))
    candidates = n - fixed
    for take in range(min(candidates, math.floor(budget * n + 1e-9) - fixed), 0, -1):
        scanned = min(candidates, pool_factor * take)
        if fixed + take + scanned / page_size <= budget * n + 1e-9:
            return take, scanned
    return 0, 0


class QuestSelector:
    """The Quest ``PageSelector`` (``offload.attention.selection``).

    Args:
        budget: F in (0, 1].
        page_size: tokens per page.
        kinds: each layer's kind (sliding layers attend their ring whole).
        scale: the softmax scale of the model's attention.
    """

    def __init__(self, *, budget: float, page_size: int, kinds: tuple[LayerKind, ...], scale: float,
                 use_prior: bool = True) -> None:
        self.budget, self.page_size, self.kinds, self.scale = budget, page_size, kinds, scale
        self.wants_prior = use_prior  # the engine keeps the prompt prior for us (``prompt_prior``)
        self.selection_s = 0.0  # time spent scoring and choosing (read and reset by the engine)
        self.fallback = ""  # why the last step was exact, if it was
        self.bounds_bytes = 0  # bounds scanned since the engine last reset it

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        if self.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        n = cdiv(length, self.page_size)
        allowed, why = pages_within_budget(n, self.budget, self.page_size)
        if allowed is None:
            self.fallback = why
            return PageChoice(pages=None, needs_query=False)
        fixed = fixed_pages(n)
        if query is None:
            return PageChoice(pages=tuple(fixed), needs_query=True)
        t0 = time.perf_counter()
        assert seq.bounds is not None, "a sparse step needs the sequence's key bounds"
        lo, hi = seq.bounds.get(layer)
        if lo.shape[1] != n:
            raise RuntimeError(f"layer {layer} has key bounds of {lo.shape[1]} pages and attends {n}")
        candidates = np.setdiff1d(np.arange(n, dtype=np.int32), np.asarray(fixed, dtype=np.int32))
        prior = seq.prior.get(layer) if self.wants_prior else None
        if prior is None:  # classic Quest: every candidate's bounds
            scanned = candidates
            score = torch.softmax(self._bound_scores(query, lo, hi, scanned), dim=1).amax(dim=0)
            take = allowed - len(fixed)
        else:
            take, pool = pool_within_budget(n, self.budget, self.page_size, POOL_FACTOR)
            if take < 1:
                self.fallback = f"too few pages to choose from: {n} pages at F={self.budget:g}"
                return PageChoice(pages=None, needs_query=False)
            scanned, prior_share = self._pool(prior, candidates, pool)
            live = torch.softmax(self._bound_scores(query, lo, hi, scanned), dim=1).amax(dim=0)
            score = PRIOR_WEIGHT * prior_share + (1 - PRIOR_WEIGHT) * live.cpu() / live.sum().cpu()
        best = torch.topk(score.cpu(), min(take, len(scanned))).indices.numpy()
        pages = tuple(sorted({*fixed, *scanned[best].tolist()}))
        self.bounds_bytes += len(scanned) * seq.bounds.page_bytes
        self.selection_s += time.perf_counter() - t0
        return PageChoice(pages=pages, needs_query=False)

    @staticmethod
    def _pool(prior: torch.Tensor, candidates: np.ndarray, size: int) -> tuple[np.ndarray, torch.Tensor]:
        """The ``size`` candidates whose bounds are scanned (pages newer than the prompt, which
        the prior never saw, first; then the prior's best) and their prior shares (summing to 1)."""
        p = prior.cpu()
        seen = candidates < p.shape[0]
        newer = candidates[~seen][-size:]
        old = candidates[seen]
        k = min(len(old), size - len(newer))
        best = old[torch.topk(p[torch.from_numpy(old).long()], k).indices.numpy()] if k > 0 else old[:0]
        pool = np.sort(np.concatenate([best, newer])).astype(np.int32)
        share = torch.zeros(len(pool))
        in_prior = pool < p.shape[0]
        share[torch.from_numpy(in_prior)] = p[torch.from_numpy(pool[in_prior]).long()]
        return pool, share / share.sum().clamp_min(1e-12)

    def _bound_scores(self, q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      candidates: np.ndarray) -> torch.Tensor:
        """Quest bounds [num_kv_heads, len(candidates)] of the candidates (scaled)."""
        if q.device.type == "cuda":
            from gpu_kernels.scoring import quest_page_scores as gpu_scores

            table = torch.from_numpy(candidates).to(q.device, non_blocking=True).view(1, -1)
            count = torch.tensor([len(candidates)], dtype=torch.int32).to(q.device, non_blocking=True)
            return gpu_scores(q.reshape(1, q.shape[-2], q.shape[-1]), lo, hi, table, count, scale=self.scale)[0]
        from cpu_kernels import quest_page_scores as cpu_scores

        return cpu_scores(q.reshape(q.shape[-2], q.shape[-1]).float(), lo, hi, candidates, scale=self.scale)
