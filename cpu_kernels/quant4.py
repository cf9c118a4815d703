"""4-bit KV pages on the CPU (Numba): quantize full pages and dequantize them.

The format is shared with the Triton kernels (``gpu_kernels.quant4``); only full pages are
quantized:

- keys per channel over the page's tokens (KIVI, Liu et al. 2024): ``k_scale``, ``k_min``
  float16 [num_kv_heads, P, head_dim];
- values per token in groups of G consecutive channels (FlexGen, Sheng et al. 2023), G = 32
  if head_dim % 32 == 0 else 16: ``v_scale``, ``v_min`` float16 [num_kv_heads, P, page_size,
  head_dim // G];
- lo / hi are the group's min / max in float32, scale = (hi - lo) / 15 and min = lo are stored
  rounded to float16; with s, m those float16 values back in float32,
  code = clamp(floor((x - m) / s + 0.5), 0, 15), and 0 where s == 0;
- codes two per byte, ``k_q`` / ``v_q`` uint8 [num_kv_heads, P, page_size, head_dim // 2]:
  byte j holds channel 2j in its low nibble and channel 2j + 1 in its high nibble;
- dequantized x = code * s + m in float32.

The kernels use no fast-math: every division is IEEE float32, as in the references, so codes
match them bit for bit.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit, prange

from cpu_kernels.halfbits import f16_bits_to_f32, f32_to_f16_bits, load_page
from cpu_kernels.inputs import kernel_pages

logger = logging.getLogger(__name__)

__all__ = ["QUANT4_LEVELS", "Quant4PagesNp", "dequantize_pages_4bit", "quantize_pages_4bit",
           "value_group_size"]

QUANT4_LEVELS = 15  # codes 0..15


def value_group_size(head_dim: int) -> int:
    """Channels per value group: 32 if head_dim % 32 == 0 else 16.

    Raises:
        ValueError: head_dim is not a positive multiple of 16.
    """
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim must be a positive multiple of 16 for 4-bit pages, got {head_dim}")
    return 32 if head_dim % 32 == 0 else 16


@dataclass(frozen=True, slots=True)
class Quant4PagesNp:
    """4-bit K/V pages as numpy arrays; page p of the input is index p (format: module doc).

    Invariants (checked on construction): codes are uint8, scales and mins float16, shapes
    agree as documented and head_dim is a multiple of 16.
    """

    k_q: np.ndarray  # [num_kv_heads, P, page_size, head_dim // 2] uint8
    k_scale: np.ndarray  # [num_kv_heads, P, head_dim] float16
    k_min: np.ndarray  # [num_kv_heads, P, head_dim] float16
    v_q: np.ndarray  # [num_kv_heads, P, page_size, head_dim // 2] uint8
    v_scale: np.ndarray  # [num_kv_heads, P, page_size, head_dim // G] float16
    v_min: np.ndarray  # [num_kv_heads, P, page_size, head_dim // G] float16

    def __post_init__(self) -> None:
        if self.k_q.ndim != 4 or self.k_q.dtype != np.uint8:
            raise ValueError(f"k_q must be uint8 [num_kv_heads, P, page_size, head_dim // 2], "
                             f"got {self.k_q.dtype} {self.k_q.shape}")
        nkv, num_pages, page_size, half = self.k_q.shape
        group = value_group_size(2 * half)
        stats = (nkv, num_pages, 2 * half)
        vstats = (nkv, num_pages, page_size, 2 * half // group)
        for name, shape, dtype in (("k_scale", stats, np.float16), ("k_min", stats, np.float16),
                                   ("v_q", self.k_q.shape, np.uint8),
                                   ("v_scale", vstats, np.float16), ("v_min", vstats, np.float16)):
            arr = getattr(self, name)
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(f"{name} must be {np.dtype(dtype)} {shape}, got {arr.dtype} {arr.shape}")

    @property
    def head_dim(self) -> int:
        return 2 * self.k_q.shape[3]

    @property
    def group_size(self) -> int:
        """Channels per value group (G)."""
        return value_group_size(self.head_dim)

    @property
    def nbytes(self) -> int:
        """Bytes of the six arrays together."""
        return sum(a.nbytes for a in (self.k_q, self.k_scale, self.k_min, self.v_q,
                                      self.v_scale, self.v_min))


@njit(cache=True, nogil=True)
def _quantize_group_nb(lo, hi):
    """fp16 bits of (scale, min) for float32 lo / hi, and the scale / min back in float32."""
    s16 = f32_to_f16_bits((hi - lo) / np.float32(QUANT4_LEVELS))
    m16 = f32_to_f16_bits(lo)
    return s16, m16, f16_bits_to_f32(s16), f16_bits_to_f32(m16)


@njit(cache=True, nogil=True)
def _code_nb(x, s, m):
    """The 4-bit code (uint8) of float32 x for float32 scale s and min m; selects only, so
    loops over a row vectorize."""
    safe = s if s != 0.0 else np.float32(1.0)
    c = np.floor((x - m) / safe + np.float32(0.5))
    c = min(max(c, np.float32(0.0)), np.float32(QUANT4_LEVELS))
    return np.uint8(c if s != 0.0 else np.float32(0.0))


@njit(cache=True, nogil=True)
def _pack_row_nb(codes, q_out):
    """Byte j = codes[2j] | codes[2j + 1] << 4."""
    for j in range(q_out.shape[0]):
        q_out[j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_keys_page_nb(page, q_out, s_out, m_out, stats, codes):
    page_size, head_dim = page.shape
    lo, hi = stats[0], stats[1]
    # Step 1: per-channel min / max over the tokens (rows), then fp16 scale and min; stats
    # rows 0 / 1 become the float32 values of those fp16 numbers.
    lo[:] = page[0]
    hi[:] = page[0]
    for t in range(1, page_size):
        for c in range(head_dim):
            lo[c] = min(lo[c], page[t, c])
            hi[c] = max(hi[c], page[t, c])
    for c in range(head_dim):
        s_out[c], m_out[c], hi[c], lo[c] = _quantize_group_nb(lo[c], hi[c])
    # Step 2: a row of codes, then channels 2j (low nibble) and 2j + 1 (high) per byte.
    for t in range(page_size):
        for c in range(head_dim):
            codes[c] = _code_nb(page[t, c], hi[c], lo[c])
        _pack_row_nb(codes, q_out[t])


@njit(cache=True, nogil=True, error_model="numpy")
def _quantize_values_page_nb(page, group, q_out, s_out, m_out, codes):
    page_size, head_dim = page.shape
    for t in range(page_size):
        for gi in range(head_dim // group):
            c0 = gi * group
            # Step 1: min / max of the token's group; fp16 scale and min.
            lo = page[t, c0]
            hi = page[t, c0]
            for c in range(c0 + 1, c0 + group):
                lo = min(lo, page[t, c])
                hi = max(hi, page[t, c])
            s_out[t, gi], m_out[t, gi], s, m = _quantize_group_nb(lo, hi)
            # Step 2: the group's codes; the row is packed once all groups are done.
            for c in range(c0, c0 + group):
                codes[c] = _code_nb(page[t, c], s, m)
        _pack_row_nb(codes, q_out[t])


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _quantize_pages_nb(k_pages, v_pages, group, k_q, k_scale, k_min, v_q, v_scale, v_min):
    num_kv_heads, num_pages, page_size, head_dim = k_pages.shape
    for it in prange(num_kv_heads * num_pages):
        h, p = it // num_pages, it % num_pages
        buf = np.empty((page_size, head_dim), dtype=np.float32)
        stats = np.empty((2, head_dim), dtype=np.float32)
        codes = np.empty(head_dim, dtype=np.uint8)
        _quantize_keys_page_nb(load_page(k_pages, h, p, page_size, buf), k_q[h, p],
                               k_scale[h, p], k_min[h, p], stats, codes)
        _quantize_values_page_nb(load_page(v_pages, h, p, page_size, buf), group, v_q[h, p],
                                 v_scale[h, p], v_min[h, p], codes)


@njit(cache=True, nogil=True, error_model="numpy")
def _dequantize_keys_page_nb(codes, scale16, min16, out, s, m):
    """One page's keys: per-channel scale / min (widened once into s, m), then code * s + m."""
    for c in range(s.shape[0]):
        s[c] = f16_bits_to_f32(scale16[c])
        m[c] = f16_bits_to_f32(min16[c])
    for t in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            out[t, 2 * j] = np.float32(codes[t, j] & 15) * s[2 * j] + m[2 * j]
            out[t, 2 * j + 1] = np.float32(codes[t, j] >> 4) * s[2 * j + 1] + m[2 * j + 1]


@njit(cache=True, nogil=True, error_model="numpy")
def _dequantize_values_page_nb(codes, scale16, min16, group, out):
    """One page's values: per (token, group) scale / min, then code * s + m."""
    half_group = group // 2
    for t in range(codes.shape[0]):
        for gi in range(scale16.shape[1]):
            s = f16_bits_to_f32(scale16[t, gi])
            m = f16_bits_to_f32(min16[t, gi])
            for j in range(gi * half_group, (gi + 1) * half_group):
                out[t, 2 * j] = np.float32(codes[t, j] & 15) * s + m
                out[t, 2 * j + 1] = np.float32(codes[t, j] >> 4) * s + m


@njit(cache=True, nogil=True, parallel=True, error_model="numpy")
def _dequantize_pages_nb(k_q, k_scale, k_min, v_q, v_scale, v_min, group, k_out, v_out):
    num_kv_heads, num_pages, page_size, half = k_q.shape
    for it in prange(num_kv_heads * num_pages):
        h, p = it // num_pages, it % num_pages
        s = np.empty(2 * half, dtype=np.float32)
        m = np.empty(2 * half, dtype=np.float32)
        _dequantize_keys_page_nb(k_q[h, p], k_scale[h, p], k_min[h, p], k_out[h, p], s, m)
        _dequantize_values_page_nb(v_q[h, p], v_scale[h, p], v_min[h, p], group, v_out[h, p])


def quantize_pages_4bit(k_pages: Any, v_pages: Any, *, out: Quant4PagesNp | None = None) -> Quant4PagesNp:
    """Quantize full K/V pages to the 4-bit format of the module docstring.

    Args:
        k_pages, v_pages: [num_kv_heads, P, page_size, head_dim] pages, every one full (the
            runtime keeps a partial tail page in full precision): numpy float32/float16 or CPU
            torch float32/float16/bfloat16, one dtype, any strides. head_dim must be a multiple
            of 16 and the values lie within float16's range (scales and mins are float16).
        out: optional arrays of exactly these pages' shapes (any strides, e.g. views into a
            packed page arena), overwritten.

    Returns:
        The quantized pages as numpy arrays (``out`` when given, else new memory).

    Raises:
        ValueError: a bad dtype, shape or head_dim.
    """
    k = kernel_pages(k_pages, "k_pages", 4)
    v = kernel_pages(v_pages, "v_pages", 4)
    if k.shape != v.shape or k.dtype != v.dtype:
        raise ValueError(f"k_pages and v_pages must share shape and dtype, got {k.shape} {k.dtype} "
                         f"and {v.shape} {v.dtype}")
    nkv, num_pages, page_size, head_dim = k.shape
    group = value_group_size(head_dim)
    if page_size == 0:
        raise ValueError("page_size must be positive")
    if out is None:
        codes = np.empty((nkv, num_pages, page_size, head_dim // 2), dtype=np.uint8)
        stats = np.empty((nkv, num_pages, head_dim), dtype=np.float16)
        groups = np.empty((nkv, num_pages, page_size, head_dim // group), dtype=np.float16)
        out = Quant4PagesNp(codes, stats, np.empty_like(stats), np.empty_like(codes), groups,
                            np.empty_like(groups))
    elif not isinstance(out, Quant4PagesNp) or out.k_q.shape != (nkv, num_pages, page_size, head_dim // 2):
        raise ValueError(f"out must be a Quant4PagesNp of {nkv} x {num_pages} pages of {page_size} x "
                         f"{head_dim}, got {getattr(getattr(out, 'k_q', None), 'shape', type(out).__name__)}")
    _quantize_pages_nb(k, v, group, out.k_q, out.k_scale.view(np.uint16), out.k_min.view(np.uint16), out.v_q,
                       out.v_scale.view(np.uint16), out.v_min.view(np.uint16))
    return out


def dequantize_pages_4bit(qp: Quant4PagesNp) -> tuple[np.ndarray, np.ndarray]:
    """(K, V) float32 [num_kv_heads, P, page_size, head_dim] of 4-bit pages: code * s + m.

    Raises:
        ValueError: ``qp`` is not a Quant4PagesNp.
    """
    if not isinstance(qp, Quant4PagesNp):
        raise ValueError(f"qp must be a Quant4PagesNp, got {type(qp).__name__}")
    nkv, num_pages, page_size, half = qp.k_q.shape
    k = np.empty((nkv, num_pages, page_size, 2 * half), dtype=np.float32)
    v = np.empty_like(k)
    _dequantize_pages_nb(qp.k_q, qp.k_scale.view(np.uint16), qp.k_min.view(np.uint16), qp.v_q,
                         qp.v_scale.view(np.uint16), qp.v_min.view(np.uint16), qp.group_size, k, v)
    return k, v
