"""Single-query attention over HOST pages on the CPU (Numba), returning ``(out, lse)``.

This is the CPU side of attention delegation (FlexGen, Sheng et al. 2023; MagicPIG, Chen et
al. 2024): pages that live in host memory are attended where they are and only the partial
result ``(out, lse)`` moves, to be merged with the device part by log-sum-exp.

Work is split flash-decoding style: every KV head's page list is cut into page ranges, one
range per parallel item, so two threads have work even with one KV head. An item streams its
pages once: each page of K and V is read while all query heads of the KV group use it (GQA),
with an online softmax rescaled once per page, and the next listed page is prefetched row by
row meanwhile (listed pages sit at scattered slots, which defeats the hardware prefetcher).
The per-range partials are merged by log-sum-exp at the end. A listed page may start at a
later row (``starts``; the dense entries' ``skip``), so a sliding-window ring's first page can
hide the keys that fell out of the window. Layout of the page arena:
``docs/layout.md`` (head-major ``[num_kv_heads, num_slots, page_size, head_dim]``).

Speed (this 2-core machine, 2 threads, SmolLM2 shapes, 8K tokens of fp32 pages at shuffled
slots read from memory): ~0.45-0.5 ms per call, ~25-28 GB/s of K and V.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from cpu_kernels.halfbits import load_page
from cpu_kernels.inputs import (
    index_array,
    index_vector,
    kernel_pages,
    like_query,
    numba_threads,
    query_matrix,
)
from cpu_kernels.prefetch import prefetch_rows

logger = logging.getLogger(__name__)

__all__ = ["attention_contiguous_pages", "attention_pages", "attention_contiguous_pages_trusted"]

# Reassociation lets LLVM vectorize the dot products; no nnan / ninf: -inf marks empty pieces.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_ITEMS_PER_THREAD = 4  # page ranges per thread, so uneven ranges still balance
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so that k * _LN2_HI is exact for |k| <= 127
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)  # exp below this is under float32's smallest normal: 0


@njit(inline="always", nogil=True, fastmath=_FASTMATH)
def _exp_nonpositive(x):
    """exp(x) for float32 x <= 0 (0 below -87, so -inf gives 0); branch-free so the loop over
    a page's scores vectorizes (libm's expf is a call per element).

    Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, then a degree-7 Taylor polynomial
    (truncation error < 1e-8) scaled by 2**k built from its exponent bits. Relative error
    measured against float64 exp: below 3e-7 (about 2 ulp).
    """
    xc = max(x, _EXP_FLOOR)
    k = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - k * _LN2_HI - k * _LN2_LO
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    two_k = np.uint32((np.int32(k) + np.int32(127)) << np.int32(23)).view(np.float32)
    return p * two_k if x >= _EXP_FLOOR else np.float32(0.0)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def softmax_page(s, count, m, l, acc):
    """One page's step of an online softmax: the scores s[:, :count] become unnormalised
    probabilities against the running max m (updated), their sum is added to l, and acc
    [group, head_dim] is rescaled once when the max moved."""
    group, head_dim = acc.shape
    for g in range(group):
        page_max = s[g, 0]
        for t in range(1, count):
            page_max = max(page_max, s[g, t])
        new_max = max(m[g], page_max)
        alpha = np.float32(math.exp(m[g] - new_max))
        total = np.float32(0.0)
        for t in range(count):
            p = _exp_nonpositive(s[g, t] - new_max)
            s[g, t] = p
            total += p
        l[g] = l[g] * alpha + total
        m[g] = new_max
        if alpha != 1.0:
            for d in range(head_dim):
                acc[g, d] *= alpha


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _attend_range_nb(q, k_pages, v_pages, slots, lens, starts, h, start, stop, scale, acc, m, l):
    """Online-softmax partial of KV head h over its listed pages start..stop-1, each page i
    contributing its rows starts[h, i]..lens[h, i]-1 (none when starts >= lens).

    Writes acc [G, D] (unnormalised sum of p * v), m [G] (running max), l [G] (sum of p).
    """
    group, head_dim = acc.shape
    page_size = k_pages.shape[2]
    kbuf = np.empty((page_size, head_dim), dtype=np.float32)
    vbuf = np.empty((page_size, head_dim), dtype=np.float32)
    s = np.empty((group, page_size), dtype=np.float32)
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
        # The next listed page's visible rows are requested one row per row computed here (a
        # hint spread over the work); rows it has beyond this page's count go at the end.
        next_t0 = starts[h, i + 1] if i + 1 < stop else 0
        next_count = lens[h, i + 1] - next_t0 if i + 1 < stop else 0
        next_slot = slots[h, i + 1] if next_count > 0 else slot
        # Step 1: scores of every query head of the group against the page's visible keys.
        # kp and vp are views from the first visible row, so every loop below counts from 0
        # (loops from a variable start vectorized worse: ~25% slower at 8K tokens). 16-bit
        # pages are widened from row 0: only the first page of a ring has rows to skip.
        kp = load_page(k_pages, h, slot, n, kbuf)[t0:]
        count = n - t0
        for t in range(count):
            if t < next_count:
                prefetch_rows(k_pages, h, next_slot, next_t0 + t, next_t0 + t + 1)
            for g in range(group):
                dot = np.float32(0.0)
                for d in range(head_dim):
                    dot += qg[g, d] * kp[t, d]
                s[g, t] = dot * scale
        # Step 2: one rescale per page and head; s becomes the unnormalised probabilities.
        softmax_page(s, count, m, l, acc)
        # Step 3: accumulate p * v while the page's values are in cache.
        vp = load_page(v_pages, h, slot, n, vbuf)[t0:]
        for t in range(count):
            if t < next_count:
                prefetch_rows(v_pages, h, next_slot, next_t0 + t, next_t0 + t + 1)
            for g in range(group):
                p = s[g, t]
                for d in range(head_dim):
                    acc[g, d] += p * vp[t, d]
        if next_count > count:
            prefetch_rows(k_pages, h, next_slot, next_t0 + count, next_t0 + next_count)
            prefetch_rows(v_pages, h, next_slot, next_t0 + count, next_t0 + next_count)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _merge_ranges_nb(acc, m, l, num_splits, out, lse):
    """Log-sum-exp merge of the page-range partials of every KV head into out / lse."""
    num_items, group, head_dim = acc.shape
    for it0 in range(0, num_items, num_splits):
        h = it0 // num_splits
        for g in range(group):
            row = h * group + g
            top = -np.inf
            for it in range(it0, it0 + num_splits):
                top = max(top, m[it, g])
            out[row, :] = 0.0
            if top == -np.inf:
                lse[row] = -np.inf
                continue
            total = np.float32(0.0)
            for it in range(it0, it0 + num_splits):
                if l[it, g] == 0.0:
                    continue
                w = np.float32(math.exp(m[it, g] - top))
                total += l[it, g] * w
                for d in range(head_dim):
                    out[row, d] += acc[it, g, d] * w
            inv = np.float32(1.0) / total
            for d in range(head_dim):
                out[row, d] *= inv
            lse[row] = top + np.float32(math.log(total))


@njit(inline="always", nogil=True)
def split_partials(q, num_kv_heads, num_listed, num_splits):
    """The per-item partials of a split-KV call (acc [items, G, D], m, l [items, G]) and the
    page-list length of one split."""
    group = q.shape[0] // num_kv_heads
    num_items = num_kv_heads * num_splits
    acc = np.empty((num_items, group, q.shape[1]), dtype=np.float32)
    m = np.empty((num_items, group), dtype=np.float32)
    l = np.empty((num_items, group), dtype=np.float32)
    return acc, m, l, (num_listed + num_splits - 1) // num_splits


@njit(inline="always", nogil=True)
def split_range(it, num_splits, per_split, num_listed):
    """Item ``it``'s KV head and its page range start..stop-1."""
    start = min(num_listed, (it % num_splits) * per_split)
    return it // num_splits, start, min(num_listed, start + per_split)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _attention_pages_nb(q, k_pages, v_pages, slots, lens, starts, scale, num_splits, out, lse):
    acc, m, l, per_split = split_partials(q, slots.shape[0], slots.shape[1], num_splits)
    for it in prange(acc.shape[0]):
        h, start, stop = split_range(it, num_splits, per_split, slots.shape[1])
        _attend_range_nb(q, k_pages, v_pages, slots, lens, starts, h, start, stop,
                         np.float32(scale), acc[it], m[it], l[it])
    _merge_ranges_nb(acc, m, l, num_splits, out, lse)


def _num_splits(num_kv_heads: int, num_listed: int, num_threads: int) -> int:
    """Page ranges per KV head: about _ITEMS_PER_THREAD items per thread, a multiple of it."""
    if num_threads <= 1 or num_listed <= 1:
        return 1
    splits = -(-_ITEMS_PER_THREAD * num_threads // num_kv_heads)
    while (splits * num_kv_heads) % num_threads:
        splits += 1
    return max(1, min(splits, num_listed))


def _check_pages(k: np.ndarray, v: np.ndarray, q: np.ndarray) -> None:
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k_pages and v_pages must share shape and dtype, got {k.shape} "
                         f"{k.dtype} and {v.shape} {v.dtype}")
    num_kv_heads, _, page_size, head_dim = k.shape
    if q.shape[1] != head_dim:
        raise ValueError(f"q has head_dim {q.shape[1]} but the pages have {head_dim}")
    if num_kv_heads == 0 or page_size == 0 or q.shape[0] % num_kv_heads:
        raise ValueError(f"q's num_heads ({q.shape[0]}) must be a positive multiple of "
                         f"num_kv_heads ({num_kv_heads}), with page_size > 0")


def _check_selection(slots: np.ndarray, lens: np.ndarray, starts: np.ndarray, num_slots: int,
                     page_size: int) -> None:
    if lens.size and (lens.min() < 0 or lens.max() > page_size):
        raise ValueError(f"lens must lie in 0..page_size ({page_size}), got "
                         f"{lens.min()}..{lens.max()}")
    if starts.size and (starts.min() < 0 or starts.max() > page_size):
        raise ValueError(f"starts must lie in 0..page_size ({page_size}), got "
                         f"{starts.min()}..{starts.max()}")
    used = slots[lens > starts]
    if used.size and (used.min() < 0 or used.max() >= num_slots):
        raise ValueError(f"slots with lens > 0 must lie in 0..{num_slots - 1} (a page with "
                         f"starts >= lens is not read), got {used.min()}..{used.max()}")


def attention_pages(q: Any, k_pages: Any, v_pages: Any, slots: Any, lens: Any, *,
                    scale: float, starts: Any = None,
                    num_threads: int | None = None) -> tuple[Any, Any]:
    """Attention of one query per head over listed host pages, as a mergeable partial.

    Args:
        q: [num_heads, head_dim] float32, numpy or CPU torch; query head ``h * group + j``
            uses KV head h (group = num_heads // num_kv_heads).
        k_pages, v_pages: [num_kv_heads, num_slots, page_size, head_dim] page arenas, numpy
            float32/float16 or CPU torch float32/float16/bfloat16 (one dtype for both), read in
            place (zero-copy; C-contiguous pages are fastest, strided ones are accepted).
        slots: [num_kv_heads, M] int32: the slots each KV head attends, in order (a sparse
            selection may differ per head).
        lens: [num_kv_heads, M] int32 in 0..page_size: valid (leading) tokens of each listed
            page; entries past a head's list have 0 (their slot is then ignored).
        scale: softmax scale applied to q . k.
        starts: optional [num_kv_heads, M] int32 in 0..page_size (numpy or CPU torch; None:
            all 0): the first visible row of each listed page, so page i contributes its rows
            ``starts[h, i] .. lens[h, i] - 1`` and nothing when ``starts >= lens`` (its slot is
            then ignored). A sliding-window ring uses it to hide the keys of its first page
            that fell out of the window.
        num_threads: Numba threads for this call (None: Numba's current setting).

    Returns:
        out [num_heads, head_dim] float32 and lse [num_heads] float32 (natural log of the sum
        of exp(scaled scores)); out = 0 and lse = -inf for a head group that sees no token.
        torch tensors when q is a tensor, numpy arrays otherwise.

    Raises:
        ValueError: a dtype, shape, device, slot, length or start that does not fit the above.
    """
    qn = query_matrix(q)
    k = kernel_pages(k_pages, "k_pages", 4)
    v = kernel_pages(v_pages, "v_pages", 4)
    _check_pages(k, v, qn)
    num_kv_heads, num_slots, page_size, head_dim = k.shape
    if np.ndim(slots) != 2:
        raise ValueError(f"slots must be [num_kv_heads, M], got shape {tuple(np.shape(slots))}")
    num_listed = int(np.shape(slots)[1])
    sl = index_array(slots, "slots", (num_kv_heads, num_listed))
    ln = index_array(lens, "lens", (num_kv_heads, num_listed))
    if starts is None:
        st = np.zeros((num_kv_heads, num_listed), dtype=np.int32)
    else:
        st = index_array(starts, "starts", (num_kv_heads, num_listed))
    _check_selection(sl, ln, st, num_slots, page_size)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    out = np.empty((qn.shape[0], head_dim), dtype=np.float32)
    lse = np.empty(qn.shape[0], dtype=np.float32)
    with numba_threads(num_threads) as threads:
        splits = _num_splits(num_kv_heads, max(num_listed, 1), threads)
        _attention_pages_nb(qn, k, v, sl, ln, st, float(scale), splits, out, lse)
    return like_query(q, out, lse)


def _ring_pages(num_listed: int, num_tokens: int, skip: int,
                page_size: int) -> tuple[int, np.ndarray, int]:
    """The dense walk of ``num_tokens`` tokens over ``num_listed`` pages with the first ``skip``
    hidden, as (first listed page kept, lens [num_kept] int32, first visible row of that page).
    Pages wholly before ``skip`` are dropped rather than listed empty::

        listed pages  | p0          | p1          | p2     |
        tokens        |xxxxxxxxxxxxx|xxxx.........|........|   x: skip, .: visible
                                         ^ first = 1, start = 4
    """
    first = skip // page_size
    lens = np.clip(num_tokens - page_size * np.arange(first, num_listed, dtype=np.int32), 0,
                   page_size).astype(np.int32, copy=False)
    return first, lens, skip - first * page_size


def attention_contiguous_pages(q: Any, k_pages: Any, v_pages: Any, slots_1d: Any,
                               num_tokens: int, *, scale: float, skip: int = 0,
                               num_threads: int | None = None) -> tuple[Any, Any]:
    """Dense case of ``attention_pages``: every KV head attends the tokens ``skip ..
    num_tokens - 1`` of the ``num_tokens`` laid over the pages ``slots_1d`` in order; the last
    page may be partial. Other arguments and the result are those of ``attention_pages``.

    Args:
        slots_1d: [M] int32 (numpy or CPU torch): the slots of the pages in order.
        num_tokens: tokens held by the listed pages, 0..M * page_size.
        skip: leading tokens not attended, 0..num_tokens (a sliding-window ring's keys that
            fell out of the window, all in its first page or pages); ``skip == num_tokens``
            leaves nothing visible (out 0, lse -inf). The slots of wholly skipped pages are not
            read.

    Raises:
        ValueError: num_tokens outside 0..M * page_size, skip outside 0..num_tokens, or what
            attention_pages rejects.
    """
    k_shape = np.shape(k_pages)
    if len(k_shape) != 4:
        raise ValueError(f"k_pages must be [num_kv_heads, num_slots, page_size, head_dim], got {k_shape}")
    num_kv_heads, _, page_size, _ = k_shape
    sl = index_vector(slots_1d, "slots_1d")
    num_pages = sl.shape[0]
    if not 0 <= int(num_tokens) <= num_pages * page_size:
        raise ValueError(f"num_tokens must lie in 0..{num_pages * page_size} "
                         f"(len(slots_1d) * page_size), got {num_tokens}")
    if isinstance(skip, bool) or not isinstance(skip, (int, np.integer)) \
            or not 0 <= int(skip) <= int(num_tokens):
        raise ValueError(f"skip must be an int in 0..num_tokens ({int(num_tokens)}), got {skip!r}")
    first, page_lens, start = _ring_pages(num_pages, int(num_tokens), int(skip), page_size)
    shape = (num_kv_heads, num_pages - first)
    starts = np.zeros(shape, dtype=np.int32)
    if starts.size:
        starts[:, 0] = start
    return attention_pages(q, k_pages, v_pages, np.broadcast_to(sl[first:], shape),
                           np.broadcast_to(page_lens, shape), scale=scale, starts=starts,
                           num_threads=num_threads)


@njit(cache=True, nogil=True)
def _dense_walk_nb(slots_1d, num_tokens, skip, page_size, num_kv_heads):
    """``_ring_pages``'s walk as the [num_kv_heads, kept] slots, lens and starts every head
    shares (one compiled call: the numpy steps cost more than a short kernel)."""
    first = skip // page_size
    kept = max(0, slots_1d.shape[0] - first)
    slots = np.empty((num_kv_heads, kept), dtype=np.int32)
    lens = np.empty((num_kv_heads, kept), dtype=np.int32)
    starts = np.zeros((num_kv_heads, kept), dtype=np.int32)
    for i in range(kept):
        n = min(page_size, max(0, num_tokens - page_size * (first + i)))
        for h in range(num_kv_heads):
            slots[h, i] = slots_1d[first + i]
            lens[h, i] = n
    if kept:
        for h in range(num_kv_heads):
            starts[h, 0] = skip - first * page_size
    return slots, lens, starts


def attention_contiguous_pages_trusted(q: np.ndarray, k_pages: np.ndarray, v_pages: np.ndarray,
                                       slots_1d: np.ndarray, num_tokens: int, scale: float, *,
                                       skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``attention_contiguous_pages`` without input checks or conversions, for a caller that
    built every input itself (the engine's decode, where the checks cost more than the
    kernel on short page lists): q float32 C-contiguous [num_heads, head_dim]; k/v numpy
    pages as ``kernel_pages`` returns them; slots_1d int32 [M] within the arena; 0 <=
    num_tokens <= M * page_size; 0 <= skip <= num_tokens (leading tokens not attended).
    Numba's current thread count. Returns numpy (out, lse)."""
    num_kv_heads, _, page_size, head_dim = k_pages.shape
    slots, lens, starts = _dense_walk_nb(slots_1d, num_tokens, skip, page_size, num_kv_heads)
    out = np.empty((q.shape[0], head_dim), dtype=np.float32)
    lse = np.empty(q.shape[0], dtype=np.float32)
    splits = _num_splits(num_kv_heads, max(slots.shape[1], 1), numba.get_num_threads())
    _attention_pages_nb(q, k_pages, v_pages, slots, lens, starts, float(scale), splits, out, lse)
    return out, lse
