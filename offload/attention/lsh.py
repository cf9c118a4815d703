"""LSH sampling attention (MagicPIG, Chen et al., ICLR 2025) as a ``PageSelector``, within F.

At every decode step, for every global layer of n pages::

    exact:    the sink page, the recent window and the tail (``quest.fixed_pages``), as pages
    sampled:  every other token, wherever it lives: the keys whose SimHash codes equal the
              live query's in at least ``min_hits`` of L tables (``cpu_kernels.lsh``), each
              weighted by 1 / P(retrieved) (``cpu_kernels.lsh_attention``); the two partials
              merge by log-sum-exp, no token in both

Bytes, within F (``kv_fraction_read``): the exact pages, the bucket ids the retrieval walks
(2 bytes each), the sampled rows in memory (DEVICE and HOST on a CPU-only machine: one K and
one V row of a KV head per distinct token its query heads sampled) and the DISK pages holding
sampled tokens, read whole since a page is the unit of I/O. When they exceed F the rows and
the DISK pages are thinned to fit, in the same proportion, each a uniform subset whose weights
grow by distinct / kept (``cpu_kernels.lsh.thin``): the estimate stays unbiased, its variance
grows. DISK pages are chosen once the query exists, so they are read on demand.

A query far from every key retrieves almost nothing: below ``MIN_CANDIDATES`` per query head
on average, the layer takes Quest's pages at the same F instead (``quest_fallbacks`` counts
it). When F covers every page, or leaves no region to sample, the step is exact.
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from cpu_kernels.lsh import demand, thin
from offload.attention.quest import SINK_PAGES, WINDOW_PAGES, QuestSelector, fixed_pages
from offload.kv.lsh_index import LshParams
from offload.kv.page_table import KVSequence, LayerKind, cdiv
from offload.kv.reads import PageChoice, Sample
from storage import Tier

__all__ = ["LshSelector", "lsh_selector", "lsh_params", "MIN_CANDIDATES", "DEFAULT_BITS", "DEFAULT_TABLES", "MIN_HITS"]

DEFAULT_BITS = 10  # K: SimHash bits per table (MagicPIG's setting)
DEFAULT_TABLES = 150  # L: tables
MIN_HITS = 2  # collisions a candidate needs (MagicPIG's rule)
MIN_CANDIDATES = 2  # per query head on average, below which a layer takes Quest's pages
_TIERS = (Tier.DEVICE, Tier.HOST, Tier.DISK)
_TIER_CODE = {t: i for i, t in enumerate(_TIERS)}  # a page's tier as a small int (vectorized counts)


def lsh_params(*, seed: int, bits: int | None = None, tables: int | None = None) -> LshParams:
    """K, L and hits for a run (defaults where not given)."""
    return LshParams(bits=bits or DEFAULT_BITS, tables=tables or DEFAULT_TABLES, min_hits=MIN_HITS, seed=seed)


def lsh_selector(engine, quest: QuestSelector, *, budget: float | None = None,
                 prior_share: float = 0.0) -> "LshSelector":
    """The engine's lsh selector, from its config (``lsh_seed``, ``lsh_bits``, ``lsh_tables``;
    F: ``budget`` or the config's)."""
    from offload.errors import InputError

    if engine.device.type != "cpu":
        raise InputError(f"sparse='lsh' samples on a CPU-only machine for now; on {engine.device} use "
                         "sparse='quest' or 'speculative'")
    cfg, rc = engine.model_config, engine.config
    params = engine.lsh_params or lsh_params(seed=rc.lsh_seed, bits=rc.lsh_bits, tables=rc.lsh_tables)
    return LshSelector(budget=rc.sparse_budget if budget is None else budget, page_size=rc.page_size,
                       kinds=engine.kv.kinds, params=params,
                       row_bytes=2 * cfg.head_dim * engine.kv_dtype.itemsize, num_kv_heads=cfg.num_kv_heads,
                       quest=quest, prior_share=prior_share)


def _drop_pages(cand, pages: tuple[int, ...], n: int, page_size: int) -> None:
    """Remove the candidates lying in ``pages`` (attended exactly) in place."""
    exact = np.zeros(n, dtype=bool)
    exact[list(pages)] = True
    for g in range(cand.count.shape[0]):
        toks = cand.tokens[g, :cand.count[g]]
        keep = toks[~exact[toks // page_size]]
        cand.tokens[g, :len(keep)] = keep
        cand.count[g] = len(keep)


class LshSelector:
    """The LSH sampling ``PageSelector`` (``offload.attention.selection``).

    Args:
        budget: F in (0, 1].
        page_size: tokens per page.
        kinds: each layer's kind (sliding layers attend their ring whole).
        params: K, L, hits and seed of the sequences' tables (``seq.lsh``).
        row_bytes: bytes of one token's K and V rows of one KV head.
        num_kv_heads: KV heads (a token's bytes are ``num_kv_heads * row_bytes``).
        quest: the selector a layer falls back to when too little is retrieved.
    """

    wants_lsh = True  # the engine keeps the sequences' LSH tables for us

    def __init__(self, *, budget: float, page_size: int, kinds: tuple[LayerKind, ...], params: LshParams,
                 row_bytes: int, num_kv_heads: int, quest: QuestSelector, prior_share: float = 0.0) -> None:
        self.budget, self.page_size, self.kinds, self.params = budget, page_size, kinds, params
        self.prior_share = prior_share  # of the pages F leaves, this share attended exactly by the prompt prior
        self._exact: dict[int, tuple[int, object, tuple[int, ...]]] = {}  # layer -> (n, prior, exact pages)
        self.row_bytes, self.num_kv_heads = row_bytes, num_kv_heads
        self.quest = quest
        self.wants_prior = quest.wants_prior  # the fallback's prompt prior
        self.fallback = ""  # why the last step was exact, if it was
        self.bounds_bytes = 0  # bucket ids scanned (and the fallback's bounds), in bytes
        self.selection_s = 0.0
        self.quest_fallbacks = 0  # layers that took Quest's pages
        self.sampled_tokens = 0  # candidates attended, summed over query heads, layers and steps

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        if self.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        ps = self.page_size
        n = cdiv(length, ps)
        fixed = fixed_pages(n)
        lo, hi = SINK_PAGES * ps, (n - 1 - WINDOW_PAGES) * ps
        if self.budget >= 1.0 or math.floor(self.budget * n + 1e-9) >= n:
            self.fallback = f"the budget covers every page ({n} pages at F={self.budget:g})"
            return PageChoice(pages=None, needs_query=False)
        if hi <= lo or len(fixed) >= self.budget * n:  # rows are sampled: any room past the fixed pages serves
            self.fallback = f"too few pages to sample: {n} pages at F={self.budget:g}"
            return PageChoice(pages=None, needs_query=False)
        exact = self._exact_pages(seq, layer, n, fixed)
        if query is None:
            return PageChoice(pages=exact, needs_query=True)
        assert seq.lsh is not None, "an lsh step needs the sequence's LSH tables"
        t0 = time.perf_counter()
        tables = seq.lsh.get(layer)
        q = np.ascontiguousarray(query.reshape(query.shape[-2], query.shape[-1]).float().cpu().numpy())
        num_heads = q.shape[0]
        p = seq.lsh.params  # the tables' own (the selector's unless a harness swapped it)
        cand = tables.retrieve(q, lo=lo, hi=hi, min_hits=p.min_hits)
        if len(exact) > len(fixed):
            _drop_pages(cand, exact, n, ps)
        self.bounds_bytes += 2 * cand.ids_scanned
        token_bytes = self.num_kv_heads * self.row_bytes
        room = self.budget * n * ps - len(exact) * ps - 2 * cand.ids_scanned / token_bytes  # in tokens
        if int(cand.count.sum()) < MIN_CANDIDATES * num_heads or room < 1:
            self.selection_s += time.perf_counter() - t0
            return self._quest(seq, layer, length, query)
        tier_of = np.fromiter((_TIER_CODE[t] for t in seq.table.tiers(layer)[:n]), dtype=np.int8, count=n)
        disk_page = tier_of == _TIER_CODE[Tier.DISK]
        group = num_heads // self.num_kv_heads
        scratch = tables.scratch(num_heads)[0]
        need = demand(cand, group=group, page_size=ps, disk_page=disk_page, scratch=scratch)
        cost = need.rows.sum() / self.num_kv_heads + len(need.pages) * ps
        share = min(1.0, room / cost) if cost else 1.0
        thin(cand, group=group, page_size=ps, disk_page=disk_page, need=need, salt=self._salt(layer, length),
             row_caps=np.floor(share * need.rows).astype(np.int64), page_cap=math.floor(share * len(need.pages)),
             scratch=scratch)
        sampled, row_bytes = self._pages_and_rows(cand, tier_of, group)
        sample = Sample(candidates=cand, mean=tables.mean, bits=p.bits, tables=p.tables, min_hits=p.min_hits,
                        row_bytes=row_bytes)
        self.sampled_tokens += int(cand.count.sum())
        self.selection_s += time.perf_counter() - t0
        return PageChoice(pages=exact, needs_query=False, sampled=sampled, sample=sample)

    def _exact_pages(self, seq: KVSequence, layer: int, n: int, fixed: list[int]) -> tuple[int, ...]:
        """The pages attended exactly: sink, window and tail, and with ``prior_share`` the
        prompt prior's best pages (known before the query: read ahead). The same for both of a
        step's asks: computed once per layer, length and prior."""
        prior = seq.prior.get(layer) if self.prior_share > 0 else None
        if prior is None:
            return tuple(fixed)
        cached = self._exact.get(layer)
        if cached is not None and cached[0] == n and cached[1] is prior:
            return cached[2]
        take = round(self.prior_share * (math.floor(self.budget * n + 1e-9) - len(fixed)))
        mass = prior.cpu().numpy()
        old = np.setdiff1d(np.arange(min(n, mass.shape[0])), np.asarray(fixed))
        best = old[np.argsort(-mass[old], kind="stable")[:max(0, take)]]
        exact = tuple(sorted({*fixed, *best.tolist()}))
        self._exact[layer] = (n, prior, exact)
        return exact

    def _salt(self, layer: int, length: int) -> int:
        """The thinning's hash salt: a function of the seed, the layer and the step (the same
        run twice samples the same tokens)."""
        return (self.params.seed * 0x9E3779B1 + layer * 0x85EBCA77 + length * 0xC2B2AE3D) & 0xFFFFFFFFFFFFFFFF

    def _pages_and_rows(self, cand, tier_of: np.ndarray, group: int) -> tuple[tuple[int, ...], dict[Tier, int]]:
        """The pages holding the kept candidates, and the bytes of the distinct rows read per
        memory tier (a KV group reads each of its tokens once); ``tier_of``: each page's
        ``_TIER_CODE``."""
        ps = self.page_size
        owners = []
        rows = np.zeros(len(_TIERS), dtype=np.int64)
        for h in range(self.num_kv_heads):
            toks = np.unique(np.concatenate([cand.tokens[g, :cand.count[g]]
                                             for g in range(h * group, (h + 1) * group)]))
            owner = toks // ps
            owners.append(owner)
            rows += np.bincount(tier_of[owner], minlength=len(_TIERS))
        pages = np.unique(np.concatenate(owners)) if owners else np.zeros(0, dtype=np.int64)
        row_bytes = {t: int(rows[i]) * self.row_bytes for i, t in enumerate(_TIERS) if t != Tier.DISK and rows[i]}
        return tuple(pages.tolist()), row_bytes

    def _quest(self, seq: KVSequence, layer: int, length: int, query: torch.Tensor) -> PageChoice:
        """Quest's pages at the same F (its bounds' bytes and time counted as ours)."""
        self.quest_fallbacks += 1
        q = self.quest
        bounds0, spent0 = q.bounds_bytes, q.selection_s
        first = q.choose(seq, layer, length=length, query=None)
        choice = q.choose(seq, layer, length=length, query=query) if first.needs_query else first
        self.bounds_bytes += q.bounds_bytes - bounds0
        self.selection_s += q.selection_s - spent0
        if q.fallback:
            self.fallback = q.fallback
        return PageChoice(pages=choice.pages, needs_query=False)
