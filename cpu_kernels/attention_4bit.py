"""Single-query attention over 4-bit pages on the CPU (Numba), returning ``(out, lse)``.

The CPU twin of ``gpu_kernels.paged_attention_4bit``: the same page format
(``cpu_kernels.quant4``: keys per channel over a page, KIVI, Liu et al. 2024; values per token
in groups of channels, FlexGen, Sheng et al. 2023) and the same result as
``cpu_kernels.attention.attention_pages`` over the dequantized pages. Full-precision pages are
never materialized in memory: each listed page's codes are widened into one page-sized float32
scratch (8 KiB for 32 tokens x 64 channels, in L1) just before its scores, and its values just
before they are accumulated, so the bytes read per page are the 4-bit page's (a sixth of
fp32's at head_dim 64, scales and mins included).

Work is split as in ``cpu_kernels.attention``: every KV head's page list is cut into ranges,
one parallel item each, with an online softmax per item and a log-sum-exp merge at the end.
The arena is a ``Quant4PagesNp`` whose page axis is the slot axis:
``k_q [num_kv_heads, num_slots, page_size, head_dim // 2]`` and so on.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from cpu_kernels.attention import (_FASTMATH, _check_selection, _merge_ranges_nb, _num_splits, softmax_page,
                                   split_partials, split_range)
from cpu_kernels.inputs import index_array, like_query, numba_threads, query_matrix
from cpu_kernels.quant4 import Quant4PagesNp, _dequantize_keys_page_nb, _dequantize_values_page_nb

logger = logging.getLogger(__name__)

__all__ = ["attention_pages_4bit", "attention_pages_4bit_trusted"]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _attend_range_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, group_size, slots, lens, starts,
                          h, start, stop, scale, acc, m, l):
    """Online-softmax partial of KV head h over its listed 4-bit pages start..stop-1, page i
    contributing its rows starts[h, i]..lens[h, i]-1. Writes acc [G, D], m [G], l [G]."""
    group, head_dim = acc.shape
    page_size = k_q.shape[2]
    buf = np.empty((page_size, head_dim), dtype=np.float32)
    s = np.empty((group, page_size), dtype=np.float32)
    ks = np.empty(head_dim, dtype=np.float32)
    km = np.empty(head_dim, dtype=np.float32)
    acc[:] = 0.0
    m[:] = -np.inf
    l[:] = 0.0
    qg = q[h * group:(h + 1) * group]
    for i in range(start, stop):
        n = lens[h, i]
        t0 = starts[h, i]
        if n <= t0:
            continue
        slot = slots[h, i]
        count = n - t0
        # Step 1: the page's keys widened (code * scale + min per channel), then the scores.
        _dequantize_keys_page_nb(k_q[h, slot], k_scale[h, slot], k_min[h, slot], buf, ks, km)
        kp = buf[t0:]
        for t in range(count):
            for g in range(group):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += qg[g, d] * kp[t, d]
                s[g, t] = dot * scale
        softmax_page(s, count, m, l, acc)
        # Step 2: the values widened into the same scratch, then p * v accumulated.
        _dequantize_values_page_nb(v_q[h, slot], v_scale[h, slot], v_min[h, slot], group_size, buf)
        vp = buf[t0:]
        for t in range(count):
            for g in range(group):
                p = s[g, t]
                for d in range(head_dim):
                    acc[g, d] += p * vp[t, d]


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _attention_pages_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, group_size, slots, lens, starts,
                             scale, num_splits, out, lse):
    acc, m, l, per_split = split_partials(q, slots, num_splits)
    for it in prange(acc.shape[0]):
        h, start, stop = split_range(it, num_splits, per_split, slots.shape[1])
        _attend_range_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, group_size, slots, lens, starts,
                              h, start, stop, np.float32(scale), acc[it], m[it], l[it])
    _merge_ranges_nb(acc, m, l, num_splits, out, lse)


def attention_pages_4bit(q: Any, pages: Quant4PagesNp, slots: Any, lens: Any, *, scale: float,
                         starts: Any = None, num_threads: int | None = None) -> tuple[Any, Any]:
    """Attention of one query per head over listed 4-bit pages, as a mergeable partial.

    Args:
        q: [num_heads, head_dim] float32, numpy or CPU torch; query head ``h * group + j``
            uses KV head h (group = num_heads // num_kv_heads).
        pages: the 4-bit arena, read in place; its page axis is the slot axis.
        slots, lens, starts: as in ``cpu_kernels.attention.attention_pages``: per KV head the
            slots attended in order, their valid leading rows (0..page_size; 0 = not read) and
            optionally their first visible row (None: 0).
        scale: softmax scale applied to q . k.
        num_threads: Numba threads for this call (None: Numba's current setting).

    Returns:
        out [num_heads, head_dim] float32 and lse [num_heads] float32 (natural log), as
        ``attention_pages`` over the dequantized pages (``cpu_kernels.quant4``); torch tensors
        when q is a tensor, numpy arrays otherwise.

    Raises:
        ValueError: a dtype, shape, slot, length or start that does not fit the above.
    """
    if not isinstance(pages, Quant4PagesNp):
        raise ValueError(f"pages must be a Quant4PagesNp (cpu_kernels.quant4), got {type(pages).__name__}")
    qn = query_matrix(q)
    num_kv_heads, num_slots, page_size, half = pages.k_q.shape
    if qn.shape[1] != 2 * half:
        raise ValueError(f"q has head_dim {qn.shape[1]} but the pages have {2 * half}")
    if qn.shape[0] % num_kv_heads:
        raise ValueError(f"q's num_heads ({qn.shape[0]}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if np.ndim(slots) != 2:
        raise ValueError(f"slots must be [num_kv_heads, M], got shape {tuple(np.shape(slots))}")
    num_listed = int(np.shape(slots)[1])
    sl = index_array(slots, "slots", (num_kv_heads, num_listed))
    ln = index_array(lens, "lens", (num_kv_heads, num_listed))
    st = (np.zeros((num_kv_heads, num_listed), dtype=np.int32) if starts is None
          else index_array(starts, "starts", (num_kv_heads, num_listed)))
    _check_selection(sl, ln, st, num_slots, page_size)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out = np.empty((qn.shape[0], qn.shape[1]), dtype=np.float32)
    lse = np.empty(qn.shape[0], dtype=np.float32)
    with numba_threads(num_threads) as threads:
        splits = _num_splits(num_kv_heads, max(num_listed, 1), threads)
        _attention_pages_4bit_nb(qn, pages.k_q, pages.k_scale.view(np.uint16), pages.k_min.view(np.uint16),
                                 pages.v_q, pages.v_scale.view(np.uint16), pages.v_min.view(np.uint16),
                                 pages.group_size, sl, ln, st, float(scale), splits, out, lse)
    return like_query(q, out, lse)


def attention_pages_4bit_trusted(q: np.ndarray, pages: Quant4PagesNp, slots_1d: np.ndarray,
                                 scale: float) -> tuple[np.ndarray, np.ndarray]:
    """``attention_pages_4bit`` for a caller that built every input itself (the engine's
    decode): every KV head attends the full pages ``slots_1d`` (int32 [M], within the arena)
    in order; q float32 C-contiguous [num_heads, head_dim]; Numba's current thread count.
    Returns numpy (out, lse)."""
    num_kv_heads, _, page_size, _ = pages.k_q.shape
    num_listed = slots_1d.shape[0]
    slots = np.empty((num_kv_heads, num_listed), dtype=np.int32)
    slots[:] = slots_1d
    lens = np.full((num_kv_heads, num_listed), page_size, dtype=np.int32)
    starts = np.zeros((num_kv_heads, num_listed), dtype=np.int32)
    out = np.empty(q.shape, dtype=np.float32)
    lse = np.empty(q.shape[0], dtype=np.float32)
    splits = _num_splits(num_kv_heads, max(num_listed, 1), numba.get_num_threads())
    _attention_pages_4bit_nb(q, pages.k_q, pages.k_scale.view(np.uint16), pages.k_min.view(np.uint16), pages.v_q,
                             pages.v_scale.view(np.uint16), pages.v_min.view(np.uint16), pages.group_size, slots, lens,
                             starts, float(scale), splits, out, lse)
    return out, lse
