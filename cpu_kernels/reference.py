"""Plain-numpy references of the Numba kernels (the spec the tests check them against).

Readable over fast: gathers, float32 matmuls and explicit loops. Inputs are numpy
float32/float16 arrays or CPU torch float32/float16/bfloat16 tensors (turned into float32
numpy first); results are numpy float32 (and the 4-bit arrays of ``Quant4PagesNp``).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cpu_kernels.quant4 import QUANT4_LEVELS, Quant4PagesNp, value_group_size

__all__ = [
    "as_float32",
    "attention_pages_ref",
    "dequantize_pages_4bit_ref",
    "page_key_bounds_ref",
    "partial_key_page_scores_ref",
    "quantize_pages_4bit_ref",
    "quest_page_scores_ref",
]


def as_float32(x: Any) -> np.ndarray:
    """float32 numpy copy of a numpy array or CPU torch tensor of any float dtype."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    return x.detach().float().numpy().copy()


def _ints(x: Any) -> np.ndarray:
    return np.asarray(x.numpy() if hasattr(x, "numpy") else x).astype(np.int64)


def attention_pages_ref(q: Any, k_pages: Any, v_pages: Any, slots: Any, lens: Any, *,
                        scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Spec of ``cpu_kernels.attention.attention_pages``: for KV head h, its keys are the
    first ``lens[h, i]`` tokens of page ``slots[h, i]`` for i in order; query head
    ``h * group + j`` attends them. Returns out [num_heads, head_dim] and lse [num_heads]
    float32 (0 and -inf for a group without keys)."""
    qf, k, v = as_float32(q), as_float32(k_pages), as_float32(v_pages)
    sl, ln = _ints(slots), _ints(lens)
    num_heads, head_dim = qf.shape
    num_kv_heads = k.shape[0]
    group = num_heads // num_kv_heads
    out = np.zeros((num_heads, head_dim), dtype=np.float32)
    lse = np.full(num_heads, -np.inf, dtype=np.float32)
    for h in range(num_kv_heads):
        rows = [(sl[h, i], t) for i in range(sl.shape[1]) for t in range(ln[h, i])]
        if not rows:
            continue
        keys = np.stack([k[h, s, t] for s, t in rows])  # [L, head_dim]
        vals = np.stack([v[h, s, t] for s, t in rows])
        heads = slice(h * group, (h + 1) * group)
        scores = (qf[heads] @ keys.T) * np.float32(scale)  # [group, L]
        top = scores.max(axis=1, keepdims=True)
        weights = np.exp(scores - top)
        total = weights.sum(axis=1, keepdims=True)
        out[heads] = (weights @ vals) / total
        lse[heads] = (top + np.log(total))[:, 0]
    return out, lse


def page_key_bounds_ref(k_pages: Any, num_tokens: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Spec of ``cpu_kernels.scoring.page_key_bounds``: channel min / max over each slot's
    first ``num_tokens[slot]`` tokens (all when None), float32; 0 for an empty slot."""
    k = as_float32(k_pages)
    num_kv_heads, num_slots, page_size, head_dim = k.shape
    counts = np.full(num_slots, page_size) if num_tokens is None else _ints(num_tokens)
    k_min = np.zeros((num_kv_heads, num_slots, head_dim), dtype=np.float32)
    k_max = np.zeros_like(k_min)
    for s in range(num_slots):
        if counts[s] > 0:
            k_min[:, s] = k[:, s, : counts[s]].min(axis=1)
            k_max[:, s] = k[:, s, : counts[s]].max(axis=1)
    return k_min, k_max


def quest_page_scores_ref(q: Any, k_min: Any, k_max: Any, slots: Any, *,
                          scale: float = 1.0) -> np.ndarray:
    """Spec of ``cpu_kernels.scoring.quest_page_scores`` (Quest, Tang et al. 2024):
    [num_kv_heads, M] = max over the group's query heads of
    ``scale * sum_c max(q_c * kmin_c, q_c * kmax_c)``."""
    qf, lo, hi = as_float32(q), as_float32(k_min), as_float32(k_max)
    sl = _ints(slots)
    num_kv_heads = lo.shape[0]
    qg = qf.reshape(num_kv_heads, -1, 1, qf.shape[1])  # [nkv, group, 1, head_dim]
    lo_s, hi_s = lo[:, None, sl], hi[:, None, sl]  # [nkv, 1, M, head_dim]
    bound = np.maximum(qg * lo_s, qg * hi_s).sum(axis=-1) * np.float32(scale)  # [nkv, group, M]
    return bound.max(axis=1).astype(np.float32)


def partial_key_page_scores_ref(q: Any, channels: Any, k_partial: Any, slots: Any, lens: Any, *,
                                scale: float = 1.0) -> np.ndarray:
    """Spec of ``cpu_kernels.scoring.partial_key_page_scores`` (InfiniGen-style, Lee et al.
    2024): per page the max over its first ``lens[i]`` tokens and the group's query heads of
    ``scale * sum_i q[j, channels[h, i]] * k_partial[h, slot, t, i]``; -inf when empty."""
    qf, kp = as_float32(q), as_float32(k_partial)
    ch, sl, ln = _ints(channels), _ints(slots), _ints(lens)
    num_kv_heads = kp.shape[0]
    group = qf.shape[0] // num_kv_heads
    out = np.full((num_kv_heads, sl.shape[0]), -np.inf, dtype=np.float32)
    for h in range(num_kv_heads):
        q_sel = qf[h * group:(h + 1) * group][:, ch[h]]  # [group, r]
        for i, (s, n) in enumerate(zip(sl, ln)):
            if n > 0:
                out[h, i] = (np.float32(scale) * (q_sel @ kp[h, s, :n].T)).max()
    return out


def _quantize_groups(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes (uint8), fp16 scale and fp16 min of float32 x, groups along ``axis`` (kept)."""
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    with np.errstate(over="ignore"):
        scale16 = ((hi - lo) / np.float32(QUANT4_LEVELS)).astype(np.float16)
        min16 = lo.astype(np.float16)
    s, m = scale16.astype(np.float32), min16.astype(np.float32)
    safe = np.where(s == 0, np.float32(1.0), s)
    codes = np.clip(np.floor((x - m) / safe + np.float32(0.5)), 0, QUANT4_LEVELS)
    codes = np.where(s == 0, 0, codes).astype(np.uint8)
    return codes, scale16, min16


def _pack(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _unpack(packed: np.ndarray) -> np.ndarray:
    codes = np.stack((packed & 15, packed >> 4), axis=-1)
    return codes.reshape(*packed.shape[:-1], -1).astype(np.float32)


def quantize_pages_4bit_ref(k_pages: Any, v_pages: Any) -> Quant4PagesNp:
    """Spec of ``cpu_kernels.quant4.quantize_pages_4bit`` (format in that module)."""
    k, v = as_float32(k_pages), as_float32(v_pages)
    nkv, num_pages, page_size, head_dim = k.shape
    group = value_group_size(head_dim)
    k_codes, k_scale, k_min = _quantize_groups(k, axis=2)  # stats [nkv, P, 1, head_dim]
    vg = v.reshape(nkv, num_pages, page_size, head_dim // group, group)
    v_codes, v_scale, v_min = _quantize_groups(vg, axis=4)  # stats [..., head_dim // G, 1]
    return Quant4PagesNp(_pack(k_codes), k_scale[:, :, 0], k_min[:, :, 0],
                         _pack(v_codes.reshape(v.shape)), v_scale[..., 0], v_min[..., 0])


def dequantize_pages_4bit_ref(qp: Quant4PagesNp) -> tuple[np.ndarray, np.ndarray]:
    """Spec of ``cpu_kernels.quant4.dequantize_pages_4bit``: code * s + m in float32."""
    nkv, num_pages, page_size, half = qp.k_q.shape
    group = qp.group_size
    k = _unpack(qp.k_q) * qp.k_scale.astype(np.float32)[:, :, None] \
        + qp.k_min.astype(np.float32)[:, :, None]
    v_codes = _unpack(qp.v_q).reshape(nkv, num_pages, page_size, 2 * half // group, group)
    v = v_codes * qp.v_scale.astype(np.float32)[..., None] + qp.v_min.astype(np.float32)[..., None]
    return k.astype(np.float32), v.reshape(nkv, num_pages, page_size, 2 * half).astype(np.float32)
