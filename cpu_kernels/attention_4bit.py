"""Single-query attention over 4-bit pages on the CPU (Numba), returning ``(out, lse)``.

The CPU twin of ``gpu_kernels.paged_attention_4bit``: the same page format
(``cpu_kernels.quant4``: keys per channel over a page, KIVI, Liu et al. 2024; values per token
in groups of channels, FlexGen, Sheng et al. 2023) and the same result as
``cpu_kernels.attention.attention_pages`` over the dequantized pages. Full-precision pages are
never materialized in memory: each listed page's codes are widened into two page-sized float32
planes (4 KiB each for 32 tokens x 64 channels, in L1), the even channels and the odd ones (a
byte holds channels 2j and 2j + 1), just before its scores, and its values just before they
are accumulated; the query and the sums are split the same way, so every inner loop runs over
consecutive floats and vectorizes. The bytes read per page are the 4-bit page's (a sixth of
fp32's at head_dim 64, scales and mins included).

Work is split as in ``cpu_kernels.attention``: every KV head's page list is cut into ranges,
one parallel item each, with an online softmax per item and a log-sum-exp merge at the end.
Two layouts of the same pages: a ``Quant4PagesNp`` whose page axis is the slot axis
(``k_q [num_kv_heads, num_slots, page_size, head_dim // 2]`` and so on; any strides), and blob
rows, one page per row of a uint8 [num_slots, stride] array (``attention_blobs_4bit_trusted``:
the engine's packed arenas and DISK staging buffers, read where they lie with no view objects
made per call). Speed (this 2-core machine, 1 thread, SmolLM2 shapes, 8K tokens at shuffled
slots, with other work on the machine, 9 rounds): medians 3.5 ms over views and 5.5 ms over
blob rows, 3.3 ms at best either way, against 8.2 ms for the earlier kernel that widened each page into one interleaved float32 page, and 2.0 ms for the
exact fp32 kernel.
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
from cpu_kernels.halfbits import f16_bits_to_f32
from cpu_kernels.quant4 import Quant4PagesNp, value_group_size

logger = logging.getLogger(__name__)

__all__ = ["BLOB_FIELDS", "attention_blobs_4bit_trusted", "attention_pages_4bit"]

BLOB_FIELDS = ("k_q", "v_q", "k_scale", "k_min", "v_scale", "v_min")
"""The fields of a 4-bit page blob, in the order ``attention_blobs_4bit_trusted`` takes their offsets."""


@njit(inline="always", nogil=True)
def _page_scratch(group, page_size, head_dim):
    """One item's scratch: even / odd channel planes of a widened page [page_size, half], the
    scores [group, page_size], the page's per-channel key scales and mins (even / odd), and the
    running p * v sums [group, head_dim] (even channels, then odd)."""
    half = head_dim // 2
    f32 = np.float32
    return (np.empty((page_size, half), f32), np.empty((page_size, half), f32), np.empty((group, page_size), f32),
            np.empty((4, half), f32), np.zeros((group, head_dim), f32))


@njit(inline="always", nogil=True, fastmath=_FASTMATH)
def _attend_page_4bit(qe, qo, k_codes, k_scale, k_min, v_codes, v_scale, v_min, value_group, t0, count,
                      even, odd, s, stats, sums, m, l):
    """One page of one KV head, rows t0..t0+count-1, folded into the online softmax (m, l) and
    sums. Codes are widened into the even / odd channel planes (byte j: channels 2j, 2j + 1),
    so every inner loop runs over consecutive floats and vectorizes; qe / qo are the query's
    even / odd channels times the softmax scale. k_codes, v_codes [page_size, half] uint8;
    k_scale, k_min [head_dim] and v_scale, v_min [page_size, head_dim // value_group] float16 bits."""
    group, half = qe.shape
    for j in range(half):
        stats[0, j] = f16_bits_to_f32(k_scale[2 * j])
        stats[1, j] = f16_bits_to_f32(k_scale[2 * j + 1])
        stats[2, j] = f16_bits_to_f32(k_min[2 * j])
        stats[3, j] = f16_bits_to_f32(k_min[2 * j + 1])
    for t in range(count):
        row = k_codes[t0 + t]
        for j in range(half):
            b = np.int32(row[j])
            even[t, j] = np.float32(b & 15) * stats[0, j] + stats[2, j]
            odd[t, j] = np.float32(b >> 4) * stats[1, j] + stats[3, j]
    for t in range(count):
        for g in range(group):
            dot = np.float32(0.0)
            for j in range(half):
                dot += qe[g, j] * even[t, j] + qo[g, j] * odd[t, j]
            s[g, t] = dot
    softmax_page(s, count, m, l, sums)
    half_group = value_group // 2
    for t in range(count):
        row = v_codes[t0 + t]
        for gi in range(v_scale.shape[1]):
            sc = f16_bits_to_f32(v_scale[t0 + t, gi])
            mn = f16_bits_to_f32(v_min[t0 + t, gi])
            for j in range(gi * half_group, (gi + 1) * half_group):
                b = np.int32(row[j])
                even[t, j] = np.float32(b & 15) * sc + mn
                odd[t, j] = np.float32(b >> 4) * sc + mn
    for t in range(count):
        for g in range(group):
            p = s[g, t]
            for j in range(half):
                sums[g, j] += p * even[t, j]
                sums[g, half + j] += p * odd[t, j]


@njit(inline="always", nogil=True)
def _split_query(q, h, group, scale):
    """KV head h's query rows, even and odd channels apart, times the softmax scale."""
    half = q.shape[1] // 2
    qe = np.empty((group, half), dtype=np.float32)
    qo = np.empty((group, half), dtype=np.float32)
    for g in range(group):
        for j in range(half):
            qe[g, j] = q[h * group + g, 2 * j] * scale
            qo[g, j] = q[h * group + g, 2 * j + 1] * scale
    return qe, qo


@njit(inline="always", nogil=True)
def _finish_item(sums, acc):
    """The even / odd sums back in channel order."""
    half = sums.shape[1] // 2
    for g in range(sums.shape[0]):
        for j in range(half):
            acc[g, 2 * j] = sums[g, j]
            acc[g, 2 * j + 1] = sums[g, half + j]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _attend_range_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, value_group, slots, lens, starts,
                          h, start, stop, scale, acc, m, l):
    """Online-softmax partial of KV head h over its listed 4-bit pages start..stop-1 of a
    ``Quant4PagesNp``, page i contributing its rows starts[h, i]..lens[h, i]-1. Writes acc
    [G, D], m [G], l [G]."""
    group, head_dim = acc.shape
    even, odd, s, stats, sums = _page_scratch(group, k_q.shape[2], head_dim)
    qe, qo = _split_query(q, h, group, scale)
    m[:] = -np.inf
    l[:] = 0.0
    for i in range(start, stop):
        n, t0, slot = lens[h, i], starts[h, i], slots[h, i]
        if n > t0:
            _attend_page_4bit(qe, qo, k_q[h, slot], k_scale[h, slot], k_min[h, slot], v_q[h, slot],
                              v_scale[h, slot], v_min[h, slot], value_group, t0, n - t0, even, odd, s, stats,
                              sums, m, l)
    _finish_item(sums, acc)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _attend_blob_range_nb(q, rows, fields, page_size, value_group, slots, h, start, stop, scale, acc, m, l):
    """The same over blob rows (uint8 [num_slots, stride], C-contiguous): KV head h's full pages
    at rows slots[start..stop-1], each field of the blob at its byte offset ``fields`` (k_q,
    v_q, k_scale, k_min, v_scale, v_min; every field head-major). Every view taken is
    contiguous, so the compiled loops know their strides."""
    group, head_dim = acc.shape
    half = head_dim // 2
    ngroups = head_dim // value_group
    even, odd, s, stats, sums = _page_scratch(group, page_size, head_dim)
    qe, qo = _split_query(q, h, group, scale)
    m[:] = -np.inf
    l[:] = 0.0
    codes, kstat, vstat = page_size * half, 2 * head_dim, 2 * page_size * ngroups  # bytes per head
    for i in range(start, stop):
        row = rows[slots[i]]
        k_codes = row[fields[0] + h * codes:fields[0] + (h + 1) * codes].reshape(page_size, half)
        v_codes = row[fields[1] + h * codes:fields[1] + (h + 1) * codes].reshape(page_size, half)
        k_scale = row[fields[2] + h * kstat:fields[2] + (h + 1) * kstat].view(np.uint16)
        k_min = row[fields[3] + h * kstat:fields[3] + (h + 1) * kstat].view(np.uint16)
        v_scale = row[fields[4] + h * vstat:fields[4] + (h + 1) * vstat].view(np.uint16).reshape(page_size, ngroups)
        v_min = row[fields[5] + h * vstat:fields[5] + (h + 1) * vstat].view(np.uint16).reshape(page_size, ngroups)
        _attend_page_4bit(qe, qo, k_codes, k_scale, k_min, v_codes, v_scale, v_min, value_group, 0, page_size,
                          even, odd, s, stats, sums, m, l)
    _finish_item(sums, acc)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _attention_pages_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, group_size, slots, lens, starts,
                             scale, num_splits, out, lse):
    acc, m, l, per_split = split_partials(q, slots.shape[0], slots.shape[1], num_splits)
    for it in prange(acc.shape[0]):
        h, start, stop = split_range(it, num_splits, per_split, slots.shape[1])
        _attend_range_4bit_nb(q, k_q, k_scale, k_min, v_q, v_scale, v_min, group_size, slots, lens, starts,
                              h, start, stop, np.float32(scale), acc[it], m[it], l[it])
    _merge_ranges_nb(acc, m, l, num_splits, out, lse)


@njit(cache=True, nogil=True, parallel=True, fastmath=_FASTMATH)
def _attention_blobs_4bit_nb(q, rows, fields, num_kv_heads, page_size, value_group, slots, scale, num_splits,
                             out, lse):
    acc, m, l, per_split = split_partials(q, num_kv_heads, slots.shape[0], num_splits)
    for it in prange(acc.shape[0]):
        h, start, stop = split_range(it, num_splits, per_split, slots.shape[0])
        _attend_blob_range_nb(q, rows, fields, page_size, value_group, slots, h, start, stop, np.float32(scale),
                              acc[it], m[it], l[it])
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


def attention_blobs_4bit_trusted(q: np.ndarray, rows: np.ndarray, fields: np.ndarray, page_shape: tuple[int, int, int],
                                 slots_1d: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Attention over full 4-bit pages stored as blobs, one per row of ``rows`` (uint8
    [num_slots, stride], C-contiguous: a packed arena or a DISK staging buffer), for a caller
    that built every input itself (the engine's decode).

    ``fields``: int64 [6], each field's byte offset in a blob (``BLOB_FIELDS`` order; a field
    holds every KV head, head-major, in the shapes of ``Quant4PagesNp`` without the page axis);
    ``page_shape``: (num_kv_heads, page_size, head_dim); every KV head attends the pages at rows
    ``slots_1d`` (int32 [M]) in order; q float32 C-contiguous [num_heads, head_dim]; Numba's
    current thread count. Returns numpy (out, lse), as ``attention_pages_4bit`` over the same
    pages."""
    num_kv_heads, page_size, head_dim = page_shape
    out = np.empty(q.shape, dtype=np.float32)
    lse = np.empty(q.shape[0], dtype=np.float32)
    splits = _num_splits(num_kv_heads, max(slots_1d.shape[0], 1), numba.get_num_threads())
    _attention_blobs_4bit_nb(q, rows, fields, num_kv_heads, page_size, value_group_size(head_dim), slots_1d,
                             float(scale), splits, out, lse)
    return out, lse
