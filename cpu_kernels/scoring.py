"""Page scoring on the CPU (Numba): which host pages a sparse decode step should attend.

- Quest (Tang et al. 2024): an upper bound of q . k over a page from the per-channel min and
  max of its keys, ``scale * sum_c max(q_c * kmin_c, q_c * kmax_c)``; ``page_key_bounds``
  builds the min / max metadata.
- InfiniGen (Lee et al. 2024): approximate token scores from a few key channels kept for
  every token; a page scores the max over its valid tokens.

A KV group (the query heads ``h * group .. h * group + group - 1`` of KV head h) shares one
selection, so a page's score is the max over the group's query heads. The kernels are serial:
scoring reads page metadata or a few channels per token, far less than attention reads, and
the nogil kernels can run beside other work.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
from numba import njit

from cpu_kernels.halfbits import load_page, load_row
from cpu_kernels.inputs import index_array, index_vector, kernel_pages, like_query, query_matrix

logger = logging.getLogger(__name__)

__all__ = ["page_key_bounds", "partial_key_page_scores", "quest_page_scores", "quest_page_scores_trusted"]

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _quest_page_scores_nb(q, k_min, k_max, slots, scale, out):
    num_kv_heads, num_listed = out.shape
    group, head_dim = q.shape[0] // num_kv_heads, q.shape[1]
    lo_buf = np.empty(head_dim, dtype=np.float32)
    hi_buf = np.empty(head_dim, dtype=np.float32)
    for i in range(num_listed):
        for h in range(num_kv_heads):
            lo = load_row(k_min, h, slots[i], lo_buf)
            hi = load_row(k_max, h, slots[i], hi_buf)
            best = np.float32(-np.inf)
            for g in range(h * group, (h + 1) * group):
                bound = np.float32(0.0)
                for c in range(head_dim):
                    bound += max(q[g, c] * lo[c], q[g, c] * hi[c])
                best = max(best, scale * bound)
            out[h, i] = best


@njit(cache=True, nogil=True, error_model="numpy")
def _page_key_bounds_nb(k_pages, num_tokens, k_min, k_max):
    num_kv_heads, num_slots, page_size, head_dim = k_pages.shape
    buf = np.empty((page_size, head_dim), dtype=np.float32)
    for it in range(num_kv_heads * num_slots):
        h, slot = it // num_slots, it % num_slots
        n = num_tokens[slot]
        if n <= 0:
            k_min[h, slot, :] = 0.0
            k_max[h, slot, :] = 0.0
            continue
        page = load_page(k_pages, h, slot, n, buf)
        lo, hi = k_min[h, slot], k_max[h, slot]
        lo[:] = page[0]
        hi[:] = page[0]
        for t in range(1, n):
            for c in range(head_dim):
                lo[c] = min(lo[c], page[t, c])
                hi[c] = max(hi[c], page[t, c])


@njit(cache=True, nogil=True, fastmath=_FASTMATH, error_model="numpy")
def _partial_key_page_scores_nb(q_sel, k_partial, slots, lens, scale, out):
    num_kv_heads, group, rank = q_sel.shape
    page_size = k_partial.shape[2]
    buf = np.empty((page_size, rank), dtype=np.float32)
    for i in range(slots.shape[0]):
        n = lens[i]
        if n <= 0:
            out[:, i] = -np.inf
            continue
        for h in range(num_kv_heads):
            page = load_page(k_partial, h, slots[i], n, buf)
            best = np.float32(-np.inf)
            for t in range(n):
                for g in range(group):
                    dot = np.float32(0.0)
                    for c in range(rank):
                        dot += q_sel[h, g, c] * page[t, c]
                    best = max(best, scale * dot)
            out[h, i] = best


def _check_scale(scale: float) -> np.float32:
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return np.float32(scale)


def _check_slots(slots: np.ndarray, num_slots: int, name: str = "slots") -> None:
    if slots.size and (slots.min() < 0 or slots.max() >= num_slots):
        raise ValueError(f"{name} must lie in 0..{num_slots - 1}, got {slots.min()}..{slots.max()}")


def quest_page_scores(q: Any, k_min: Any, k_max: Any, slots: Any, *, scale: float = 1.0) -> Any:
    """Quest upper bounds of the attention score of each listed page (Tang et al. 2024).

    Args:
        q: [num_heads, head_dim] float32, numpy or CPU torch.
        k_min, k_max: [num_kv_heads, num_slots, head_dim] per-page channel min / max of the
            keys (``page_key_bounds``), float32/float16 (numpy) or float32/float16/bfloat16
            (torch), one dtype.
        slots: [M] int32 slots to score.
        scale: positive softmax scale.

    Returns:
        [num_kv_heads, M] float32: for KV head h and page i, the max over the group's query
        heads j of ``scale * sum_c max(q[j, c] * k_min[h, s, c], q[j, c] * k_max[h, s, c])``
        with s = slots[i] (torch when q is a tensor).

    Raises:
        ValueError: mismatched shapes or dtypes, slots out of range, bad scale.
    """
    qn = query_matrix(q)
    lo = kernel_pages(k_min, "k_min", 3)
    hi = kernel_pages(k_max, "k_max", 3)
    if lo.shape != hi.shape or lo.dtype != hi.dtype:
        raise ValueError(f"k_min and k_max must share shape and dtype, got {lo.shape} {lo.dtype} "
                         f"and {hi.shape} {hi.dtype}")
    num_kv_heads, num_slots, head_dim = lo.shape
    if qn.shape[1] != head_dim or num_kv_heads == 0 or qn.shape[0] % num_kv_heads:
        raise ValueError(f"q [{qn.shape[0]}, {qn.shape[1]}] must have head_dim {head_dim} and a "
                         f"multiple of num_kv_heads ({num_kv_heads}) heads")
    sl = index_vector(slots, "slots")
    _check_slots(sl, num_slots)
    out = np.empty((num_kv_heads, sl.shape[0]), dtype=np.float32)
    _quest_page_scores_nb(qn, lo, hi, sl, _check_scale(scale), out)
    return like_query(q, out)[0]


def quest_page_scores_trusted(q: np.ndarray, k_min: np.ndarray, k_max: np.ndarray, slots: np.ndarray,
                              scale: float) -> np.ndarray:
    """``quest_page_scores`` without input checks or conversions, for a caller that built
    every input itself (a sparse decode step scores a few hundred pages per layer, where the
    checks cost several times the kernel): q float32 [num_heads, head_dim]; k_min / k_max
    numpy bounds as ``kernel_pages`` returns them, one dtype and shape; slots int32 [M]
    within them; scale > 0. Returns numpy [num_kv_heads, M] float32."""
    out = np.empty((k_min.shape[0], slots.shape[0]), dtype=np.float32)
    _quest_page_scores_nb(q, k_min, k_max, slots, np.float32(scale), out)
    return out


def page_key_bounds(k_pages: Any, num_tokens: Any = None) -> tuple[Any, Any]:
    """Per-page channel min and max of the keys over each slot's valid tokens (Quest metadata).

    Args:
        k_pages: [num_kv_heads, num_slots, page_size, head_dim] float32/float16 (numpy) or
            float32/float16/bfloat16 (CPU torch).
        num_tokens: [num_slots] int32 in 0..page_size: valid (leading) tokens of each slot;
            None means every page is full.

    Returns:
        k_min, k_max: [num_kv_heads, num_slots, head_dim] float32 (exact: min and max of the
        inputs); 0 for a slot with no valid token. torch when k_pages is a tensor.

    Raises:
        ValueError: a bad dtype, shape or token count.
    """
    k = kernel_pages(k_pages, "k_pages", 4)
    num_kv_heads, num_slots, page_size, head_dim = k.shape
    if num_tokens is None:
        counts = np.full(num_slots, page_size, dtype=np.int32)
    else:
        counts = index_array(num_tokens, "num_tokens", (num_slots,))
        if counts.size and (counts.min() < 0 or counts.max() > page_size):
            raise ValueError(f"num_tokens must lie in 0..page_size ({page_size}), got "
                             f"{counts.min()}..{counts.max()}")
    k_min = np.empty((num_kv_heads, num_slots, head_dim), dtype=np.float32)
    k_max = np.empty_like(k_min)
    _page_key_bounds_nb(k, counts, k_min, k_max)
    return like_query(k_pages, k_min, k_max)


def partial_key_page_scores(q: Any, channels: Any, k_partial: Any, slots: Any, lens: Any, *,
                            scale: float = 1.0) -> Any:
    """InfiniGen-style page scores from a few key channels per token (Lee et al. 2024).

    Args:
        q: [num_heads, head_dim] float32, numpy or CPU torch.
        channels: [num_kv_heads, r] int32: the key channels kept for KV head h.
        k_partial: [num_kv_heads, num_slots, page_size, r] those channels of every token's key
            (float32/float16 numpy, or float32/float16/bfloat16 CPU torch).
        slots: [M] int32 slots to score; lens: [M] int32 in 0..page_size valid tokens.
        scale: positive softmax scale.

    Returns:
        [num_kv_heads, M] float32: per page the max over its valid tokens t of
        ``scale * max_j sum_i q[j, channels[h, i]] * k_partial[h, slot, t, i]`` (j over the
        group's query heads); -inf for a page with no valid token. torch when q is a tensor.

    Raises:
        ValueError: mismatched shapes, channels / slots / lens out of range, bad scale.
    """
    qn = query_matrix(q)
    kp = kernel_pages(k_partial, "k_partial", 4)
    num_kv_heads, num_slots, page_size, rank = kp.shape
    ch = index_array(channels, "channels", (num_kv_heads, rank))
    if num_kv_heads == 0 or qn.shape[0] % num_kv_heads:
        raise ValueError(f"q's num_heads ({qn.shape[0]}) must be a multiple of num_kv_heads "
                         f"({num_kv_heads})")
    if ch.size and (ch.min() < 0 or ch.max() >= qn.shape[1]):
        raise ValueError(f"channels must lie in 0..{qn.shape[1] - 1} (q's head_dim), got "
                         f"{ch.min()}..{ch.max()}")
    sl = index_vector(slots, "slots")
    num_listed = sl.shape[0]
    ln = index_vector(lens, "lens", num_listed)
    if ln.size and (ln.min() < 0 or ln.max() > page_size):
        raise ValueError(f"lens must lie in 0..page_size ({page_size}), got {ln.min()}..{ln.max()}")
    _check_slots(sl[ln > 0], num_slots)
    group = qn.shape[0] // num_kv_heads
    q_sel = np.take_along_axis(qn.reshape(num_kv_heads, group, -1), ch[:, None, :].astype(np.intp),
                               axis=2)  # [num_kv_heads, group, r]
    out = np.empty((num_kv_heads, num_listed), dtype=np.float32)
    _partial_key_page_scores_nb(np.ascontiguousarray(q_sel), kp, sl, ln, _check_scale(scale), out)
    return like_query(q, out)[0]
