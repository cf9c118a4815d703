"""Query-aware page selection: the prompt's own attention and key bounds (Quest, Tang et al.
2024), within a byte budget F.

At every decode step, for every global layer of n pages (n = cdiv(length, page_size))::

    fixed:   the sink page (0), the recent window (``WINDOW_PAGES`` before the tail), the tail
    prior:   with the prompt prior (``offload.attention.prompt_prior``: the prompt's last
             tokens' exact attention per page, kept by prefill), ``PRIOR_SHARE`` of the pages
             left by F: the prior's best. Known before the query: read ahead.
    live:    the rest, by Quest bounds of the live query (``offload.kv.key_bounds``) scanned
             over ``POOL_FACTOR`` times as many candidates: the pages newer than the prompt and
             the prior's next best. The pool is known before the query, so it is read ahead
             whole (``prefetch_pool``): the pages the query leaves are read and not attended
             (counted in ``kv_fraction_fetched``, not in ``kv_fraction_read``), and no chosen
             page waits for an on-demand read. Without ``prefetch_pool``, the chosen ones are
             read on demand once the query exists.
    without a prior (classic Quest, ``use_prior=False``, or a sequence no prefill made):
             every candidate's bounds scanned, the best chosen.

F bounds the bytes the step attends in the layer: ``F * n`` pages, the scanned bounds paid
from it (``1 / page_size`` of a page each). Pages not chosen stay where they are; the next
step may choose them. Sliding layers (rings, always whole) are not selected. When F covers
every page, or leaves no candidate to choose, the step is exact (``fallback`` says why); with a
prior, a budget too small for the pool's bounds still takes the prior's best pages alone.

Bound scores: the bound of each query head is maxed over its KV group (a group shares one
read), each KV head's bounds become a distribution over the candidates (softmax), and a page
scores its largest share in any KV head: pages are read for all heads at once, so the union of
the heads' needs decides.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from offload.kv.page_table import KVSequence, LayerKind, cdiv
from offload.kv.reads import PageChoice

__all__ = ["QuestSelector", "WINDOW_PAGES", "SINK_PAGES", "pages_within_budget", "split_within_budget",
           "pool_fetch_ratio"]

# With a prompt prior (measured with bench/selector_quality.py, Gemma 3 270M, 4K-token QA cases,
# F = 0.1 / 0.2: the pages holding the facts were chosen in 56% / 94% of steps and layers by
# the prior alone, 44% / 94% with 75% of the pages from the prior, 39% / 75% with prior and
# bounds mixed half and half over a pool, 8% / 22% by the bounds alone):
PRIOR_SHARE = 0.75  # of the chosen pages, this share by the prior alone
POOL_FACTOR = 2  # the rest by live bounds over twice as many of the prior's next pages
SINK_PAGES = 1  # the first page: attention sinks (StreamingLLM, Xiao et al. 2024)
WINDOW_PAGES = 2  # recent pages before the tail, always attended


def fixed_pages(n: int) -> list[int]:
    """The pages every step attends of a layer of ``n`` pages: sink, recent window, tail."""
    return sorted({*range(min(SINK_PAGES, n)), *range(max(0, n - 1 - WINDOW_PAGES), n)})


def _allowed(n: int, budget: float, page_size: int, scans: int) -> int:
    """Pages F leaves once every candidate's bounds are paid ``scans`` times."""
    return math.floor(budget * n - scans * (n - len(fixed_pages(n))) / page_size + 1e-9)


def _covers_every_page(n: int, budget: float, page_size: int, scans: int = 1) -> bool:
    """Reading all ``n`` pages, with no bounds, fits F: the step is exact."""
    return budget >= 1.0 or _allowed(n, budget, page_size, scans) >= n


def pages_within_budget(n: int, budget: float, page_size: int, scans: int = 1) -> tuple[int | None, str]:
    """How many of a layer's ``n`` pages a step may attend at budget F, once the candidates'
    bounds are paid (each ``1 / page_size`` of a page, ``scans`` times), and why not (None:
    exact instead)."""
    fixed = len(fixed_pages(n))
    allowed = _allowed(n, budget, page_size, scans)
    if _covers_every_page(n, budget, page_size, scans):
        return None, f"the budget covers every page ({n} pages at F={budget:g})"
    if allowed <= fixed:
        return None, (f"too few pages to choose from: {n} pages at F={budget:g} leave "
                      f"{max(0, allowed)} after the bounds, and sink, window and tail take {fixed}")
    return allowed, ""


def split_within_budget(n: int, budget: float, page_size: int, scans: int = 1) -> tuple[int, int, int]:
    """With a prompt prior: (pages chosen by the prior alone, pages chosen by live bounds,
    candidates whose bounds are scanned), the most that fit F once the scanned bounds are
    paid; (0, 0, 0) when none fits. ``PRIOR_SHARE`` of the chosen pages come from the prior,
    the rest from ``POOL_FACTOR`` times as many scanned candidates (their bounds paid ``scans``
    times)."""
    fixed = len(fixed_pages(n))
    candidates = n - fixed
    for take in range(min(candidates, math.floor(budget * n + 1e-9) - fixed), 0, -1):
        by_prior = max(1, round(PRIOR_SHARE * take))
        live = take - by_prior
        scanned = min(candidates - by_prior, POOL_FACTOR * live)
        if fixed + take + scans * scanned / page_size <= budget * n + 1e-9:
            return by_prior, live, scanned
    return 0, 0, 0


def pool_fetch_ratio(n: int, budget: float, page_size: int) -> float:
    """Pages a step brings from HOST or DISK per page it attends there, with a prompt prior
    and the pool read ahead (the planner's ``sparse_fetch``): (prior's + pool) / (prior's +
    chosen); 1 where no prior split fits (the step is exact, or classic Quest on demand)."""
    by_prior, live, scan = split_within_budget(n, budget, page_size)
    return (by_prior + scan) / (by_prior + live) if by_prior >= 1 else 1.0


class QuestSelector:
    """The Quest ``PageSelector`` (``offload.attention.selection``).

    Args:
        budget: F in (0, 1].
        page_size: tokens per page.
        kinds: each layer's kind (sliding layers attend their ring whole).
        scale: the softmax scale of the model's attention.
    """

    def __init__(self, *, budget: float, page_size: int, kinds: tuple[LayerKind, ...], scale: float,
                 use_prior: bool = True, prefetch_pool: bool = True) -> None:
        self.budget, self.page_size, self.kinds, self.scale = budget, page_size, kinds, scale
        self.wants_prior = use_prior  # the engine keeps the prompt prior for us (``prompt_prior``)
        self.prefetch_pool = prefetch_pool  # read the live pool ahead too (else: its chosen pages on demand)
        self.scans = 1  # times a step scans the pool's bounds (paid from F each time)
        self.selection_s = 0.0  # time spent scoring and choosing (read and reset by the engine)
        self.fallback = ""  # why the last step was exact, if it was
        self.bounds_bytes = 0  # bounds scanned since the engine last reset it
        self._plans: dict[int, tuple[int, torch.Tensor | None, object]] = {}  # layer -> (n, prior, plan)

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        if self.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        n = cdiv(length, self.page_size)
        t0 = time.perf_counter()
        plan = self._plan(seq, layer, n)
        if isinstance(plan, str):
            self.fallback = plan
            return PageChoice(pages=None, needs_query=False)
        known, scanned, take, ahead = plan
        if query is None:  # what is known before the query is read ahead
            self.selection_s += time.perf_counter() - t0
            return PageChoice(pages=ahead, needs_query=bool(take and len(scanned)))
        assert seq.bounds is not None, "a sparse step needs the sequence's key bounds"
        lo, hi = seq.bounds.get(layer)
        if lo.shape[1] != n:
            raise RuntimeError(f"layer {layer} has key bounds of {lo.shape[1]} pages and attends {n}")
        chosen = scanned[self._best(self._bound_scores(query, lo, hi, scanned), min(take, len(scanned)))].tolist()
        pages = tuple(sorted({*known, *chosen}))
        self.bounds_bytes += len(scanned) * seq.bounds.page_bytes
        self.selection_s += time.perf_counter() - t0
        return PageChoice(pages=pages, needs_query=False)

    def _plan(self, seq: KVSequence, layer: int, n: int) -> tuple[tuple[int, ...], np.ndarray, int, tuple[int, ...]] | str:
        """What a layer of ``n`` pages knows before its query: (pages chosen already, the
        candidates the query's bounds choose from, how many it takes, the pages to read
        ahead), or why the step is exact. It depends only on ``n`` and the layer's prior, so
        the step's two asks (before and with the query), and the steps of other sequences
        with the same prior and length, compute it once."""
        prior = seq.prior.get(layer) if self.wants_prior else None
        cached = self._plans.get(layer)
        if cached is not None and cached[0] == n and cached[1] is prior:
            return cached[2]
        plan = self._make_plan(prior, n)
        self._plans[layer] = (n, prior, plan)
        return plan

    def _make_plan(self, prior: torch.Tensor | None, n: int) -> tuple[tuple[int, ...], np.ndarray, int, tuple[int, ...]] | str:
        allowed, why = pages_within_budget(n, self.budget, self.page_size, self.scans)
        if allowed is None and (prior is None or _covers_every_page(n, self.budget, self.page_size, self.scans)):
            return why
        # With a prior, a budget too small to scan every candidate's bounds still chooses: the
        # prior's pages, and the live pool only where F leaves room for it.
        fixed = fixed_pages(n)
        candidates = np.setdiff1d(np.arange(n, dtype=np.int32), np.asarray(fixed, dtype=np.int32))
        if prior is None:  # classic Quest: every candidate's bounds, once the query exists
            assert allowed is not None
            return tuple(fixed), candidates, allowed - len(fixed), tuple(fixed)
        by_prior, take, scan = split_within_budget(n, self.budget, self.page_size, self.scans)
        if by_prior < 1:
            return f"too few pages to choose from: {n} pages at F={self.budget:g}"
        first, scanned = self._split(prior, candidates, by_prior, scan)
        known = tuple(sorted({*fixed, *first.tolist()}))
        ahead = tuple(sorted({*known, *scanned.tolist()})) if self.prefetch_pool else known
        return known, scanned, take, ahead

    @staticmethod
    def _split(prior: torch.Tensor, candidates: np.ndarray, by_prior: int, scan: int) -> tuple[np.ndarray, np.ndarray]:
        """The prior's ``by_prior`` best candidates, and the ``scan`` candidates whose bounds
        are scanned: pages newer than the prompt (the prior never saw them) first, then the
        prior's next best."""
        p = prior.cpu().numpy()
        seen = candidates < p.shape[0]
        old, newer = candidates[seen], candidates[~seen]
        order = old[np.argsort(-p[old], kind="stable")]
        first = order[:by_prior]
        newer = newer[len(newer) - min(len(newer), scan):]
        pool = np.concatenate([newer, order[by_prior:by_prior + scan - len(newer)]])
        return first, np.sort(pool).astype(np.int32)

    @staticmethod
    def _best(scores: torch.Tensor | np.ndarray, k: int) -> np.ndarray:
        """Indices of the ``k`` best candidates: each KV head's scores [num_kv_heads, M]
        softmaxed over the candidates, a candidate's score its largest share in any head."""
        if isinstance(scores, torch.Tensor):
            return torch.topk(torch.softmax(scores, dim=1).amax(dim=0), k).indices.cpu().numpy()
        # On the CPU in numpy: torch ops on the kernel's numpy-backed output measured 100x slower.
        e = np.exp(scores - scores.max(axis=1, keepdims=True))
        share = (e / e.sum(axis=1, keepdims=True)).max(axis=0)
        return np.argpartition(-share, k - 1)[:k] if k < len(share) else np.arange(len(share))

    def _bound_scores(self, q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                      candidates: np.ndarray) -> torch.Tensor | np.ndarray:
        """Quest bounds [num_kv_heads, len(candidates)] of the candidates (scaled): a CUDA
        tensor (Triton), or a numpy array (Numba) on the CPU."""
        if q.device.type == "cuda":
            from gpu_kernels.scoring import quest_page_scores as gpu_scores

            table = torch.from_numpy(candidates).to(q.device, non_blocking=True).view(1, -1)
            count = torch.tensor([len(candidates)], dtype=torch.int32).to(q.device, non_blocking=True)
            return gpu_scores(q.reshape(1, q.shape[-2], q.shape[-1]), lo, hi, table, count, scale=self.scale)[0]
        from cpu_kernels import quest_page_scores_trusted
        from cpu_kernels.inputs import kernel_pages

        # The checked entry point's checks cost several times the kernel on a pool this size.
        q_np = np.ascontiguousarray(q.reshape(q.shape[-2], q.shape[-1]).float().numpy())
        return quest_page_scores_trusted(q_np, kernel_pages(lo, "k_min", 3), kernel_pages(hi, "k_max", 3),
                                         candidates, self.scale)
