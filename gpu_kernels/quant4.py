"""4-bit KV pages: quantize and dequantize (Triton).

The format is defined in ``gpu_kernels.reference_sparse`` (keys per channel over a page,
KIVI, Liu et al. 2024; values per token in groups of G channels, FlexGen, Sheng et al. 2023;
two codes per byte, channel 2j in the low nibble). The kernels work on the even and odd
channels as two half-width tiles, so packing and unpacking are plain nibble shifts: column j
of both tiles is byte j. One program handles one (KV head, page).

Divisions use ``tl.math.div_rn`` (IEEE round-to-nearest, as torch and numpy divide) so the
codes match the reference bit for bit on the GPU too; the default fp32 division there is
approximate and could move a value sitting on a rounding boundary by one code.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.dispatch import use_triton
from gpu_kernels.reference_sparse import (
    Quant4Pages,
    dequantize_pages_4bit_ref,
    quantize_pages_4bit_ref,
    value_group_size,
)

__all__ = ["Quant4Pages", "dequantize_pages_4bit", "quantize_pages_4bit"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _div_rn(x, y):
    """x / y rounded to nearest (IEEE); div_rn does not broadcast, so both get one shape."""
    x, y = tl.broadcast(x, y)
    return tl.math.div_rn(x, y)


@triton.jit
def _quant4_scale(lo, hi):
    """(hi - lo) / 15 in fp32, rounded to the stored fp16 scale."""
    diff = hi - lo
    return _div_rn(diff, tl.zeros_like(diff) + 15.0).to(tl.float16)


@triton.jit
def _column_min_max(x, mask, col_ok):
    """Min and max over axis 0 of x where mask holds; 0 for padding columns (no inf - inf)."""
    lo = tl.min(tl.where(mask, x, float("inf")), axis=0)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=0)
    return tl.where(col_ok, lo, 0.0), tl.where(col_ok, hi, 0.0)


@triton.jit
def _quant4_codes(x, s, m):
    """Codes 0..15 (int32) of fp32 x given fp32 scale s and min m (broadcast); 0 where s == 0."""
    t = _div_rn(x - m, tl.where(s == 0.0, 1.0, s))
    code = tl.minimum(tl.maximum(tl.floor(t + 0.5), 0.0), 15.0).to(tl.int32)
    return tl.where(s == 0.0, 0, code)


@triton.jit
def _quantize_keys_4bit_kernel(
    k_ptr, q_ptr, scale_ptr, min_ptr, half_dim,
    stride_k_head, stride_k_page, stride_k_tok, stride_k_d,
    stride_q_head, stride_q_page, stride_q_tok, stride_q_byte,
    stride_s_head, stride_s_page, stride_s_d,
    stride_m_head, stride_m_page, stride_m_d,
    PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    page = tl.program_id(1).to(tl.int64)
    # Step 1: the page's keys as even / odd channel tiles [BLOCK_P, BLOCK_HALF] in fp32.
    t = tl.arange(0, BLOCK_P)
    j = tl.arange(0, BLOCK_HALF)
    j_ok = j < half_dim
    mask = (t < PAGE_SIZE)[:, None] & j_ok[None, :]
    base = k_ptr + head * stride_k_head + page * stride_k_page + t[:, None] * stride_k_tok
    x_even = tl.load(base + (2 * j)[None, :] * stride_k_d, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(base + (2 * j + 1)[None, :] * stride_k_d, mask=mask, other=0.0).to(tl.float32)
    # Step 2: per-channel min / max over the tokens; scale and min rounded to fp16, then the
    # rounded values define the codes.
    lo_e, hi_e = _column_min_max(x_even, mask, j_ok)
    lo_o, hi_o = _column_min_max(x_odd, mask, j_ok)
    s_e, s_o = _quant4_scale(lo_e, hi_e), _quant4_scale(lo_o, hi_o)
    m_e, m_o = lo_e.to(tl.float16), lo_o.to(tl.float16)
    code_e = _quant4_codes(x_even, s_e.to(tl.float32)[None, :], m_e.to(tl.float32)[None, :])
    code_o = _quant4_codes(x_odd, s_o.to(tl.float32)[None, :], m_o.to(tl.float32)[None, :])
    # Step 3: store the packed bytes and the per-channel scale / min.
    packed = (code_e | (code_o << 4)).to(tl.uint8)
    tl.store(q_ptr + head * stride_q_head + page * stride_q_page + t[:, None] * stride_q_tok
             + j[None, :] * stride_q_byte, packed, mask=mask)
    s_base = scale_ptr + head * stride_s_head + page * stride_s_page
    m_base = min_ptr + head * stride_m_head + page * stride_m_page
    tl.store(s_base + 2 * j * stride_s_d, s_e, mask=j_ok)
    tl.store(s_base + (2 * j + 1) * stride_s_d, s_o, mask=j_ok)
    tl.store(m_base + 2 * j * stride_m_d, m_e, mask=j_ok)
    tl.store(m_base + (2 * j + 1) * stride_m_d, m_o, mask=j_ok)


@triton.jit
def _quantize_values_4bit_kernel(
    v_ptr, q_ptr, scale_ptr, min_ptr, num_groups,
    stride_v_head, stride_v_page, stride_v_tok, stride_v_d,
    stride_q_head, stride_q_page, stride_q_tok, stride_q_byte,
    stride_s_head, stride_s_page, stride_s_tok, stride_s_group,
    stride_m_head, stride_m_page, stride_m_tok, stride_m_group,
    PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_GROUPS: tl.constexpr,
    HALF_GROUP: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    page = tl.program_id(1).to(tl.int64)
    # Step 1: values as [BLOCK_P, BLOCK_GROUPS, HALF_GROUP] tiles: byte j = g * HALF_GROUP + i
    # holds channels 2j (even tile) and 2j + 1 (odd tile), both in group g.
    t = tl.arange(0, BLOCK_P)[:, None, None]
    g = tl.arange(0, BLOCK_GROUPS)[None, :, None]
    i = tl.arange(0, HALF_GROUP)[None, None, :]
    byte = g * HALF_GROUP + i
    mask = (t < PAGE_SIZE) & (g < num_groups) & (i < HALF_GROUP)
    base = v_ptr + head * stride_v_head + page * stride_v_page + t * stride_v_tok
    x_even = tl.load(base + 2 * byte * stride_v_d, mask=mask, other=0.0).to(tl.float32)
    x_odd = tl.load(base + (2 * byte + 1) * stride_v_d, mask=mask, other=0.0).to(tl.float32)
    # Step 2: per (token, group) min / max over both tiles; fp16 scale and min define codes.
    lo = tl.minimum(tl.min(x_even, axis=2), tl.min(x_odd, axis=2))  # [BLOCK_P, BLOCK_GROUPS]
    hi = tl.maximum(tl.max(x_even, axis=2), tl.max(x_odd, axis=2))
    s16 = _quant4_scale(lo, hi)
    m16 = lo.to(tl.float16)
    s = s16.to(tl.float32)[:, :, None]
    m = m16.to(tl.float32)[:, :, None]
    packed = (_quant4_codes(x_even, s, m) | (_quant4_codes(x_odd, s, m) << 4)).to(tl.uint8)
    # Step 3: store the packed bytes and the per-(token, group) scale / min.
    tl.store(q_ptr + head * stride_q_head + page * stride_q_page + t * stride_q_tok
             + byte * stride_q_byte, packed, mask=mask)
    t2 = tl.arange(0, BLOCK_P)[:, None]
    g2 = tl.arange(0, BLOCK_GROUPS)[None, :]
    mask2 = (t2 < PAGE_SIZE) & (g2 < num_groups)
    tl.store(scale_ptr + head * stride_s_head + page * stride_s_page + t2 * stride_s_tok
             + g2 * stride_s_group, s16, mask=mask2)
    tl.store(min_ptr + head * stride_m_head + page * stride_m_page + t2 * stride_m_tok
             + g2 * stride_m_group, m16, mask=mask2)


@triton.jit
def _dequantize_pages_4bit_kernel(
    kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, k_ptr, v_ptr, half_dim,
    stride_kq_head, stride_kq_page, stride_kq_tok, stride_kq_byte,
    stride_ks_head, stride_ks_page, stride_ks_d,
    stride_km_head, stride_km_page, stride_km_d,
    stride_vq_head, stride_vq_page, stride_vq_tok, stride_vq_byte,
    stride_vs_head, stride_vs_page, stride_vs_tok, stride_vs_group,
    stride_vm_head, stride_vm_page, stride_vm_tok, stride_vm_group,
    stride_k_head, stride_k_page, stride_k_tok, stride_k_d,
    stride_v_head, stride_v_page, stride_v_tok, stride_v_d,
    PAGE_SIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_HALF: tl.constexpr,
    HALF_GROUP: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    page = tl.program_id(1).to(tl.int64)
    t = tl.arange(0, BLOCK_P)[:, None]
    j = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (t < PAGE_SIZE) & (j < half_dim)
    # Step 1: keys: byte j -> codes of channels 2j, 2j + 1 with their per-channel scale / min.
    kq = tl.load(kq_ptr + head * stride_kq_head + page * stride_kq_page + t * stride_kq_tok
                 + j * stride_kq_byte, mask=mask, other=0).to(tl.int32)
    ks = ks_ptr + head * stride_ks_head + page * stride_ks_page
    km = km_ptr + head * stride_km_head + page * stride_km_page
    j_ok = j < half_dim
    k_even = (kq & 15).to(tl.float32) * tl.load(ks + 2 * j * stride_ks_d, mask=j_ok, other=0.0).to(
        tl.float32) + tl.load(km + 2 * j * stride_km_d, mask=j_ok, other=0.0).to(tl.float32)
    k_odd = (kq >> 4).to(tl.float32) * tl.load(ks + (2 * j + 1) * stride_ks_d, mask=j_ok, other=0.0).to(
        tl.float32) + tl.load(km + (2 * j + 1) * stride_km_d, mask=j_ok, other=0.0).to(tl.float32)
    k_base = k_ptr + head * stride_k_head + page * stride_k_page + t * stride_k_tok
    tl.store(k_base + 2 * j * stride_k_d, k_even.to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(k_base + (2 * j + 1) * stride_k_d, k_odd.to(k_ptr.dtype.element_ty), mask=mask)
    # Step 2: values: byte j lies in group j // HALF_GROUP of its token.
    vq = tl.load(vq_ptr + head * stride_vq_head + page * stride_vq_page + t * stride_vq_tok
                 + j * stride_vq_byte, mask=mask, other=0).to(tl.int32)
    grp = j // HALF_GROUP
    vs = tl.load(vs_ptr + head * stride_vs_head + page * stride_vs_page + t * stride_vs_tok
                 + grp * stride_vs_group, mask=mask, other=0.0).to(tl.float32)
    vm = tl.load(vm_ptr + head * stride_vm_head + page * stride_vm_page + t * stride_vm_tok
                 + grp * stride_vm_group, mask=mask, other=0.0).to(tl.float32)
    v_base = v_ptr + head * stride_v_head + page * stride_v_page + t * stride_v_tok
    tl.store(v_base + 2 * j * stride_v_d, ((vq & 15).to(tl.float32) * vs + vm).to(
        v_ptr.dtype.element_ty), mask=mask)
    tl.store(v_base + (2 * j + 1) * stride_v_d, ((vq >> 4).to(tl.float32) * vs + vm).to(
        v_ptr.dtype.element_ty), mask=mask)


def quantize_pages_4bit(k_pages: torch.Tensor, v_pages: torch.Tensor, *,
                        out: Quant4Pages | None = None) -> Quant4Pages:
    """Quantize full K/V pages to 4 bits (format in ``gpu_kernels.reference_sparse``).

    Args:
        k_pages, v_pages: [num_kv_heads, P, page_size, head_dim] float32/float16/bfloat16,
            one dtype and device, any strides; every page full (the runtime keeps a partial
            tail page in full precision). head_dim a multiple of 16. Values must lie within
            the float16 range (scales and mins are stored in float16).
        out: optional arena of exactly [num_kv_heads, P, page_size, head_dim] on the same
            device (e.g. ``arena.slot_range(a, a + P)``); its tensors are overwritten.

    Returns:
        The quantized pages (``out`` when given). Inputs are not modified.

    Raises:
        ValueError: a shape, dtype or device is off (the message names the argument).

    Runs the Triton kernels where ``use_triton(k_pages)``; elsewhere
    ``quantize_pages_4bit_ref``.
    """
    _check_pages(k_pages, v_pages)
    nkv, num_pages, ps, hd = k_pages.shape
    if out is not None:
        if not isinstance(out, Quant4Pages):
            raise ValueError(f"out must be a Quant4Pages, got {type(out).__name__}")
        if (out.num_kv_heads, out.num_slots, out.page_size, out.head_dim) != tuple(k_pages.shape) \
                or out.k_q.device != k_pages.device:
            raise ValueError(f"out must hold [num_kv_heads, P, page_size, head_dim] = "
                             f"{tuple(k_pages.shape)} on {k_pages.device}, got "
                             f"{(out.num_kv_heads, out.num_slots, out.page_size, out.head_dim)} "
                             f"on {out.k_q.device}")
    if not use_triton(k_pages):
        return quantize_pages_4bit_ref(k_pages, v_pages, out=out)
    res = out if out is not None else Quant4Pages.empty(nkv, num_pages, ps, hd, device=k_pages.device)
    if nkv * num_pages == 0:
        return res
    block_p = triton.next_power_of_2(ps)
    half_group = value_group_size(hd) // 2
    _quantize_keys_4bit_kernel[(nkv, num_pages)](
        k_pages, res.k_q, res.k_scale, res.k_min, hd // 2, *k_pages.stride(), *res.k_q.stride(),
        *res.k_scale.stride(), *res.k_min.stride(),
        PAGE_SIZE=ps, BLOCK_P=block_p, BLOCK_HALF=triton.next_power_of_2(hd // 2))
    num_groups = hd // (2 * half_group)
    _quantize_values_4bit_kernel[(nkv, num_pages)](
        v_pages, res.v_q, res.v_scale, res.v_min, num_groups, *v_pages.stride(),
        *res.v_q.stride(), *res.v_scale.stride(), *res.v_min.stride(),
        PAGE_SIZE=ps, BLOCK_P=block_p, BLOCK_GROUPS=triton.next_power_of_2(num_groups),
        HALF_GROUP=half_group)
    return res


def dequantize_pages_4bit(qp: Quant4Pages, *,
                          dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-precision K and V of a 4-bit arena: code * scale + min in float32, cast to ``dtype``.

    Args:
        qp: the arena (any strides), on CUDA or CPU.
        dtype: float32, float16 or bfloat16.

    Returns:
        (k, v): [num_kv_heads, num_slots, page_size, head_dim] ``dtype`` on qp's device.

    Raises:
        ValueError: qp is not a Quant4Pages or dtype is not supported.
    """
    if not isinstance(qp, Quant4Pages):
        raise ValueError(f"qp must be a Quant4Pages, got {type(qp).__name__}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype}")
    if not use_triton(qp.k_q):
        return dequantize_pages_4bit_ref(qp, dtype=dtype)
    shape = (qp.num_kv_heads, qp.num_slots, qp.page_size, qp.head_dim)
    k = torch.empty(shape, dtype=dtype, device=qp.k_q.device)
    v = torch.empty(shape, dtype=dtype, device=qp.k_q.device)
    if k.numel() == 0:
        return k, v
    _dequantize_pages_4bit_kernel[(qp.num_kv_heads, qp.num_slots)](
        *qp.tensors(), k, v, qp.head_dim // 2, *(s for t in qp.tensors() for s in t.stride()),
        *k.stride(), *v.stride(), PAGE_SIZE=qp.page_size,
        BLOCK_P=triton.next_power_of_2(qp.page_size),
        BLOCK_HALF=triton.next_power_of_2(qp.head_dim // 2), HALF_GROUP=qp.group_size // 2)
    return k, v


def _check_pages(k_pages: torch.Tensor, v_pages: torch.Tensor) -> None:
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [num_kv_heads, P, page_size, head_dim] tensor, "
                             f"got {got}")
    if tuple(v_pages.shape) != tuple(k_pages.shape):
        raise ValueError(f"v_pages must have k_pages' shape {tuple(k_pages.shape)}, got "
                         f"{tuple(v_pages.shape)}")
    if k_pages.dtype not in _DTYPES or v_pages.dtype != k_pages.dtype:
        raise ValueError(f"k_pages and v_pages must share one dtype of {_DTYPES}, got "
                         f"{k_pages.dtype} and {v_pages.dtype}")
    if v_pages.device != k_pages.device:
        raise ValueError(f"v_pages must be on k_pages' device {k_pages.device}, got {v_pages.device}")
    if k_pages.shape[2] < 1:
        raise ValueError("page_size (k_pages.shape[2]) must be >= 1")
    head_dim = k_pages.shape[3]
    if head_dim < 16 or head_dim % 16:
        raise ValueError(f"head_dim (k_pages.shape[3]) must be a positive multiple of 16 for "
                         f"4-bit pages, got {head_dim}")
