"""Importance-weighted attention over LSH candidates on the CPU (MagicPIG, Chen et al., ICLR
2025), in Numba, returning ``(out, lse)`` to merge with the exactly attended pages.

A candidate key k (retrieved by ``cpu_kernels.lsh.LshTables.retrieve``) of a query q was drawn
with probability ``P(k) = P[Binomial(L, p) >= m]``, where ``p = (1 - theta / pi) ** K`` is the
probability that one table of K SimHash bits gives q and the centred key ``k - mean`` the same
code (theta their angle; Charikar 2002) and m = ``min_hits`` of L tables. With
``w = exp(scale * q . k) / P(k)`` (times the thinning factor ``distinct / kept`` where the
candidates were capped: ``cpu_kernels.lsh.thin``)::

    out = sum_k w v_k / sum_k w        lse = log sum_k w

``sum_k w`` is an unbiased estimate of the softmax denominator over the sampled region, and the
pair merges by log-sum-exp with the exact pieces (sink, window, tail) like any partial.

Each query head's candidates are gathered row by row from pages ``[num_kv_heads, num_slots,
page_size, head_dim]`` (float32 or 16-bit bits; an arena, ``docs/layout.md``, or the strided
view of a staged DISK chunk) through ``page_slots`` (the slot of each page id; -1 where the
page lives elsewhere: those rows are skipped, another call attends them), in two passes: the
keys' logits, then the values.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
from numba import njit, prange

from cpu_kernels.halfbits import load_row
from cpu_kernels.inputs import kernel_pages, query_matrix
from cpu_kernels.lsh import Candidates

__all__ = ["inclusion_probability", "log_inclusion_table", "sampled_attention", "sampled_attention_trusted"]

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_TINY = 1e-300
_TABLE_POINTS = 16385  # angles of the log-probability table the kernel interpolates


@njit(cache=True, nogil=True)
def _inclusion_nb(cos, bits, tables, min_hits):
    """P[Binomial(tables, p) >= min_hits], p = (1 - arccos(cos) / pi) ** bits, in float64:
    the tail's own terms where the expected hits are few (no cancellation), else one minus
    the head's."""
    c = min(1.0, max(-1.0, cos))
    p = (1.0 - math.acos(c) / math.pi) ** bits
    if p >= 1.0:
        return 1.0
    if p <= 0.0:
        return _TINY
    log_q = math.log1p(-p)
    log_p = math.log(p)
    if tables * p < 1.0:  # the tail sum: terms fall fast from j = min_hits
        total = 0.0
        log_c = math.lgamma(tables + 1.0) - math.lgamma(min_hits + 1.0) - math.lgamma(tables - min_hits + 1.0)
        for j in range(min_hits, tables + 1):
            term = math.exp(log_c + j * log_p + (tables - j) * log_q)
            total += term
            if term < 1e-18 * total:
                break
            log_c += math.log((tables - j) / (j + 1.0)) if j < tables else 0.0
        return max(total, _TINY)
    head = 0.0
    log_c = 0.0
    for j in range(min_hits):
        head += math.exp(log_c + j * log_p + (tables - j) * log_q)
        log_c += math.log((tables - j) / (j + 1.0))
    return max(1.0 - head, _TINY)


@njit(cache=True, nogil=True)
def _inclusion_many_nb(cos, bits, tables, min_hits, out):
    for i in range(cos.shape[0]):
        out[i] = _inclusion_nb(cos[i], bits, tables, min_hits)


@functools.lru_cache(maxsize=16)
def log_inclusion_table(bits: int, tables: int, min_hits: int) -> np.ndarray:
    """log P(retrieved) at ``_TABLE_POINTS`` angles evenly spaced over [0, pi] (float64), which
    the kernel interpolates linearly in the angle (an exact evaluation per row costs more than
    the row's gather). Measured against the exact form, relative error in P: below 3e-7 for
    angles up to 2 radians, below 3e-5 up to pi - 0.1 (K 1..16, L 64..512); nearer pi, where
    keys opposite the query are almost never retrieved, the log diverges."""
    theta = np.linspace(0.0, math.pi, _TABLE_POINTS)
    table = np.log(inclusion_probability(np.cos(theta), bits=bits, tables=tables, min_hits=min_hits))
    table.flags.writeable = False
    return table


def inclusion_probability(cos: Any, *, bits: int, tables: int, min_hits: int) -> np.ndarray:
    """The probability that a key at cosine ``cos`` to the query (the key centred) collides
    with it in at least ``min_hits`` of ``tables`` tables of ``bits`` SimHash bits (float64)."""
    c = np.ascontiguousarray(np.atleast_1d(np.asarray(cos, dtype=np.float64)))
    out = np.empty_like(c)
    _inclusion_many_nb(c, bits, tables, min_hits, out)
    return out


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _sampled_attention_nb(q, k_pages, v_pages, page_slots, cand, count, log_factor, mean, log_prob, scale, out, lse):
    """q [H, D]; k_pages, v_pages [nkv, slots, page_size, D]; cand [H, max] / count [H] token
    ids, log_factor [H, max]; log_prob: ``log_inclusion_table``; writes out [H, D], lse [H]
    (-inf: no row here)."""
    steps = (log_prob.shape[0] - 1) / math.pi
    num_heads, head_dim = q.shape
    page_size = k_pages.shape[2]
    group = num_heads // k_pages.shape[0]
    for g in prange(num_heads):
        h = g // group
        qg, mu = q[g], mean[h]
        q_norm = math.sqrt(max(np.sum(qg * qg), 1e-30))
        q_mu = np.sum(qg * mu)
        mu2 = np.sum(mu * mu)
        n = count[g]
        logits = np.empty(n, dtype=np.float64)
        slots = np.empty(n, dtype=np.int64)
        offsets = np.empty(n, dtype=np.int64)
        kbuf = np.empty(head_dim, dtype=np.float32)
        vbuf = np.empty(head_dim, dtype=np.float32)
        m = 0
        best = -np.inf
        for i in range(n):  # pass 1: each row's logit, weight folded in (log w = scale s - log P)
            tok = cand[g, i]
            slot = page_slots[tok // page_size]
            if slot < 0:
                continue
            k = load_row(k_pages[h], slot, tok % page_size, kbuf)
            dot = np.float32(0.0)
            k_mu = np.float32(0.0)
            k2 = np.float32(0.0)
            for d in range(head_dim):
                dot += qg[d] * k[d]
                k_mu += k[d] * mu[d]
                k2 += k[d] * k[d]
            centred = math.sqrt(max(k2 - 2.0 * k_mu + mu2, 1e-30))
            x = math.acos(min(1.0, max(-1.0, (dot - q_mu) / (q_norm * centred)))) * steps
            j = min(int(x), log_prob.shape[0] - 2)
            logit = scale * dot - (log_prob[j] + (x - j) * (log_prob[j + 1] - log_prob[j])) + log_factor[g, i]
            logits[m] = logit
            slots[m] = slot
            offsets[m] = tok % page_size
            best = max(best, logit)
            m += 1
        acc = np.zeros(head_dim, dtype=np.float32)
        total = 0.0
        for i in range(m):  # pass 2: the values
            w = np.float32(math.exp(logits[i] - best))
            total += w
            v = load_row(v_pages[h], slots[i], offsets[i], vbuf)
            for d in range(head_dim):
                acc[d] += w * v[d]
        if m == 0:
            out[g, :] = 0.0
            lse[g] = -np.inf
        else:
            for d in range(head_dim):
                out[g, d] = acc[d] / total
            lse[g] = best + math.log(total)


def sampled_attention_trusted(q: np.ndarray, k_pages: np.ndarray, v_pages: np.ndarray, page_slots: np.ndarray,
                              cand: Candidates, mean: np.ndarray, *, bits: int, tables: int, min_hits: int,
                              scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``sampled_attention`` without its checks (the engine built every input)."""
    num_heads, head_dim = q.shape
    out = np.empty((num_heads, head_dim), dtype=np.float32)
    lse = np.empty(num_heads, dtype=np.float32)
    _sampled_attention_nb(q, k_pages, v_pages, page_slots, cand.tokens, cand.count, cand.log_factor, mean,
                          log_inclusion_table(bits, tables, min_hits), np.float32(scale), out, lse)
    return out, lse


def sampled_attention(q: Any, k_pages: Any, v_pages: Any, page_slots: Any, cand: Candidates, mean: np.ndarray, *,
                      bits: int, tables: int, min_hits: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Importance-weighted attention of each query head over its candidates.

    Args:
        q: [num_heads, head_dim] float32.
        k_pages, v_pages: [num_kv_heads, num_slots, page_size, head_dim] pages (float32,
            float16 or bfloat16; strided views allowed).
        page_slots: [num_pages] int32, the slot of each page id in this arena, -1 elsewhere.
        cand: the layer's ``Candidates`` (token ids of the sequence).
        mean: [num_kv_heads, head_dim] float32, the key mean the tables were hashed around.
        bits, tables, min_hits: the tables' K, L and the retrieval's hit threshold.
        scale: softmax scale.

    Returns:
        out [num_heads, head_dim] float32 and lse [num_heads] float32 (-inf for a head with no
        candidate in this arena).

    Raises:
        ValueError: shapes that disagree, a candidate beyond ``page_slots``.
    """
    qm = query_matrix(q)
    k, v = kernel_pages(k_pages, "k_pages", 4), kernel_pages(v_pages, "v_pages", 4)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k_pages and v_pages must be alike, got {k.shape} {k.dtype} and {v.shape} {v.dtype}")
    if qm.shape[0] % k.shape[0] or qm.shape[1] != k.shape[3]:
        raise ValueError(f"q {qm.shape} does not fit pages of {k.shape[0]} KV heads and head_dim {k.shape[3]}")
    slots = np.ascontiguousarray(page_slots, dtype=np.int32)
    for g in range(qm.shape[0]):
        toks = cand.tokens[g, :cand.count[g]]
        if len(toks) and (toks.min() < 0 or toks.max() // k.shape[2] >= len(slots)):
            raise ValueError(f"query head {g} has candidates beyond the {len(slots)} pages of page_slots")
    if len(slots) and slots.max() >= k.shape[1]:
        raise ValueError(f"page_slots names slot {slots.max()} of an arena of {k.shape[1]}")
    return sampled_attention_trusted(qm, k, v, slots, cand, np.ascontiguousarray(mean, dtype=np.float32),
                                     bits=bits, tables=tables, min_hits=min_hits, scale=scale)
