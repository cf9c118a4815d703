"""Float64 numpy reference of LSH sampling attention (MagicPIG, Chen et al., ICLR 2025): the
independent check of ``cpu_kernels.lsh`` and ``cpu_kernels.lsh_attention``.

It shares only the specification with the kernels: the hyperplanes (``hash_planes``, drawn
from a seed), the bit order of a code, the retrieval rule (at least ``min_hits`` equal codes of
``tables``, tokens in [lo, hi)), the capped subset (the ``cap`` tokens of a KV group's union with
the smallest splitmix64 hash of ``token ^ salt``) and the estimator. Codes are compared
brute force (no buckets), the collision probability comes from scipy's binomial tail, and the
sums run in float64.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binom

__all__ = ["lsh_codes_ref", "lsh_candidates_ref", "lsh_attention_ref", "inclusion_probability_ref",
           "splitmix64_ref"]

_MASK = (1 << 64) - 1


def splitmix64_ref(x: int) -> int:
    """splitmix64's finaliser of x + golden gamma, in Python integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def lsh_codes_ref(x: Any, planes: Any, bits: int) -> np.ndarray:
    """x [n, head_dim], planes [tables * bits, head_dim] -> codes [tables, n] (int64)."""
    proj = np.asarray(x, dtype=np.float64) @ np.asarray(planes, dtype=np.float64).T > 0  # [n, tables * bits]
    tables = proj.shape[1] // bits
    weights = 1 << np.arange(bits, dtype=np.int64)
    return (proj.reshape(-1, tables, bits) * weights).sum(axis=2).T


def inclusion_probability_ref(cos: Any, *, bits: int, tables: int, min_hits: int) -> np.ndarray:
    """P[Binomial(tables, p) >= min_hits] with p = (1 - arccos(cos) / pi) ** bits."""
    p = (1.0 - np.arccos(np.clip(np.asarray(cos, dtype=np.float64), -1.0, 1.0)) / np.pi) ** bits
    return binom.sf(min_hits - 1, tables, p)


def _bottom(items: list[int], k: int, salt: int) -> set[int]:
    """The k items with the smallest splitmix64 hash of ``item ^ salt``."""
    return set(sorted(items, key=lambda t: splitmix64_ref(int(t) ^ salt))[:k])


def lsh_candidates_ref(q: Any, keys: Any, planes: Any, *, bits: int, min_hits: int, lo: int, hi: int, salt: int = 0,
                       mean: Any = None, page_size: int = 1, disk_page: Any = None, row_caps: Any = None,
                       page_cap: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per query head, its candidate tokens (sorted) and each one's log thinning factor.

    Args:
        q: [num_heads, head_dim]; keys [num_kv_heads, n, head_dim]; planes [num_kv_heads,
            tables * bits, head_dim].
        mean: [num_kv_heads, head_dim] the keys are centred by (None: their own mean).
        page_size, disk_page: [num_pages] bool, pages on DISK (None: none).
        row_caps: [num_kv_heads] distinct memory rows kept per KV head (None: all); page_cap:
            distinct DISK pages kept (None: all). The kept subsets are the smallest hashes of
            ``token ^ salt`` and ``page ^ ~salt`` (64 bits).
    """
    q = np.asarray(q, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    num_heads, nkv, n = q.shape[0], keys.shape[0], keys.shape[1]
    group = num_heads // nkv
    mean = keys.mean(axis=1) if mean is None else np.asarray(mean, dtype=np.float64)
    on_disk = np.zeros(-(-n // page_size), dtype=bool) if disk_page is None else np.asarray(disk_page, dtype=bool)
    heads: list[np.ndarray] = []
    for h in range(nkv):
        kc = lsh_codes_ref(keys[h] - mean[h], planes[h], bits)  # [tables, n]
        for g in range(h * group, (h + 1) * group):
            hits = (kc == lsh_codes_ref(q[g:g + 1], planes[h], bits)).sum(axis=0)
            toks = np.nonzero(hits >= min_hits)[0]
            heads.append(toks[(toks >= lo) & (toks < hi)])
    disk_pages = sorted({int(t) // page_size for toks in heads for t in toks if on_disk[t // page_size]})
    kept_pages, page_log = set(disk_pages), 0.0
    if page_cap is not None and len(disk_pages) > page_cap:
        kept_pages = _bottom(disk_pages, page_cap, ~salt & _MASK)
        page_log = np.log(len(disk_pages) / page_cap)
    out_t, out_f = [], []
    for h in range(nkv):
        mem = sorted({int(t) for g in range(h * group, (h + 1) * group) for t in heads[g]
                      if not on_disk[t // page_size]})
        kept_rows, row_log = set(mem), 0.0
        if row_caps is not None and len(mem) > row_caps[h]:
            kept_rows = _bottom(mem, int(row_caps[h]), salt & _MASK)
            row_log = np.log(len(mem) / row_caps[h])
        for g in range(h * group, (h + 1) * group):
            toks, logs = [], []
            for t in heads[g]:
                if on_disk[t // page_size] and t // page_size in kept_pages:
                    toks.append(t)
                    logs.append(page_log)
                elif not on_disk[t // page_size] and t in kept_rows:
                    toks.append(t)
                    logs.append(row_log)
            out_t.append(np.asarray(toks, dtype=np.int64))
            out_f.append(np.asarray(logs, dtype=np.float64))
    return out_t, out_f


def lsh_attention_ref(q: Any, keys: Any, values: Any, planes: Any, *, bits: int, min_hits: int, lo: int, hi: int,
                      scale: float, **thinning: Any) -> tuple[np.ndarray, np.ndarray]:
    """The sampled partial of every query head over [lo, hi): out [num_heads, head_dim],
    lse [num_heads] (float64; -inf and zeros for a head without candidates). ``thinning``:
    ``lsh_candidates_ref``'s keyword arguments (salt, mean, page_size, disk_page, caps)."""
    q = np.asarray(q, dtype=np.float64)
    keys = np.asarray(keys, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    tables = np.asarray(planes).shape[1] // bits
    mean = thinning.pop("mean", None)
    mean = keys.mean(axis=1) if mean is None else np.asarray(mean, dtype=np.float64)
    cands, factors = lsh_candidates_ref(q, keys, planes, bits=bits, min_hits=min_hits, lo=lo, hi=hi, mean=mean,
                                        **thinning)
    num_heads, head_dim = q.shape
    group = num_heads // keys.shape[0]
    out = np.zeros((num_heads, head_dim))
    lse = np.full(num_heads, -np.inf)
    for g, (toks, log_f) in enumerate(zip(cands, factors)):
        if len(toks) == 0:
            continue
        k = keys[g // group, toks]
        centred = k - mean[g // group]
        cos = centred @ q[g] / (np.linalg.norm(centred, axis=1) * np.linalg.norm(q[g]))
        prob = inclusion_probability_ref(cos, bits=bits, tables=tables, min_hits=min_hits)
        logits = scale * (k @ q[g]) - np.log(prob) + log_f
        top = logits.max()
        w = np.exp(logits - top)
        out[g] = w @ values[g // group, toks] / w.sum()
        lse[g] = top + np.log(w.sum())
    return out, lse
