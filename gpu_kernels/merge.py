"""Merge of attention partials over disjoint key pieces by log-sum-exp (Triton).

Each piece ``p`` gives ``(out_p, lse_p)``; the union of the pieces has
``lse = logsumexp_p(lse_p)`` and ``out = sum_p exp(lse_p - lse) * out_p`` (flash-decoding,
Dao et al. 2023; FlexGen, Sheng et al. 2023, merges CPU and GPU pieces the same way). The
split-KV decode kernel (``gpu_kernels.paged_attention``) reduces its splits with this kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.dispatch import use_triton
from gpu_kernels.reference import merge_partials_ref

__all__ = ["merge_partials"]

# Rows per program: a tile of BLOCK_R rows x BLOCK_D channels of fp32 per loaded piece.
_ROW_ELEMENTS = 2048


@triton.jit
def _merge_partials_kernel(
    outs_ptr, lses_ptr, out_ptr, lse_ptr,
    num_pieces, num_rows, head_dim,
    stride_outs_p, stride_outs_r, stride_outs_d,
    stride_lses_p, stride_lses_r,
    stride_out_r, stride_out_d, stride_lse_r,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < num_rows
    tile_ok = row_ok[:, None] & (cols[None, :] < head_dim)
    rows64 = rows.to(tl.int64)

    # Step 1: the largest lse of each row over the pieces (-inf where every piece is empty).
    # Pointers advance by the piece stride (64-bit pointer arithmetic, no index overflow).
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    lse_ptrs = lses_ptr + rows64 * stride_lses_r
    for _ in range(num_pieces):
        m = tl.maximum(m, tl.load(lse_ptrs, mask=row_ok, other=float("-inf")))
        lse_ptrs += stride_lses_p
    # Rows with no key anywhere use 0 as reference so that exp() never sees -inf - -inf.
    m_ref = tl.where(m == float("-inf"), 0.0, m)

    # Step 2: weighted sum of the pieces' outputs; an empty piece (lse -inf) adds nothing,
    # whatever its out holds.
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    denom = tl.zeros([BLOCK_R], tl.float32)
    lse_ptrs = lses_ptr + rows64 * stride_lses_r
    o_ptrs = outs_ptr + rows64[:, None] * stride_outs_r + cols[None, :] * stride_outs_d
    for _ in range(num_pieces):
        w = tl.exp(tl.load(lse_ptrs, mask=row_ok, other=float("-inf")) - m_ref)
        o_p = tl.load(o_ptrs, mask=tile_ok & (w > 0)[:, None], other=0.0)
        acc += w[:, None] * o_p
        denom += w
        lse_ptrs += stride_lses_p
        o_ptrs += stride_outs_p

    # Step 3: normalize and write; empty rows give out 0 and lse log(0) = -inf.
    safe = tl.where(denom > 0, denom, 1.0)
    out = acc / safe[:, None]
    lse = tl.where(denom > 0, m_ref + tl.log(safe), float("-inf"))
    tl.store(out_ptr + rows64[:, None] * stride_out_r + cols[None, :] * stride_out_d, out,
             mask=tile_ok)
    tl.store(lse_ptr + rows64 * stride_lse_r, lse, mask=row_ok)


def _check_inputs(outs: torch.Tensor, lses: torch.Tensor) -> None:
    if not isinstance(outs, torch.Tensor) or not isinstance(lses, torch.Tensor):
        raise ValueError("outs and lses must be stacked tensors [P, ..., head_dim] and [P, ...]; "
                         "torch.stack a list of partials first")
    if outs.dtype != torch.float32 or lses.dtype != torch.float32:
        raise ValueError(f"outs and lses must be float32, got {outs.dtype} and {lses.dtype}")
    if outs.dim() < 2 or outs.shape[0] < 1:
        raise ValueError(f"outs must be [P >= 1, ..., head_dim], got shape {tuple(outs.shape)}")
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"lses must have shape outs.shape[:-1] = {tuple(outs.shape[:-1])}, "
                         f"got {tuple(lses.shape)}")
    if lses.device != outs.device:
        raise ValueError(f"outs and lses must be on one device, got {outs.device} and "
                         f"{lses.device}")


def _check_out(name: str, t: torch.Tensor | None, shape: tuple[int, ...],
               device: torch.device) -> None:
    if t is None:
        return
    if t.dtype != torch.float32 or tuple(t.shape) != shape or t.device != device:
        raise ValueError(f"{name} must be float32 of shape {shape} on {device}, got "
                         f"{t.dtype} {tuple(t.shape)} on {t.device}")


def merge_partials(
    outs: torch.Tensor,
    lses: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge P partials over disjoint key pieces into the partial of their union.

    Args:
        outs: [P, N..., head_dim] float32, P >= 1 stacked partial outputs (any strides);
            CUDA (or CPU: Triton interpreter, else the torch reference).
        lses: [P, N...] float32 natural-log log-sum-exps on the same device; -inf marks an
            empty piece, whose out is ignored.
        out: optional [N..., head_dim] float32 destination (any strides).
        lse: optional [N...] float32 destination.

    Returns:
        ``(out, lse)``: [N..., head_dim] and [N...] float32; rows empty in every piece give
        zeros and -inf. Inputs are not modified.

    Raises:
        ValueError: a shape, dtype or device does not match the above.
    """
    _check_inputs(outs, lses)
    num_pieces, head_dim = outs.shape[0], outs.shape[-1]
    row_shape = tuple(outs.shape[1:-1])
    _check_out("out", out, (*row_shape, head_dim), outs.device)
    _check_out("lse", lse, row_shape, outs.device)
    if not use_triton(outs):
        m_out, m_lse = merge_partials_ref(list(outs.unbind(0)), list(lses.unbind(0)))
        if num_pieces == 1:  # the reference hands back the piece itself: never alias inputs
            m_out, m_lse = m_out.clone(), m_lse.clone()
        return _deliver(m_out, m_lse, out, lse)
    num_rows = 1
    for n in row_shape:
        num_rows *= n
    outs3 = outs.reshape(num_pieces, num_rows, head_dim)  # a view unless the strides forbid it
    lses2 = lses.reshape(num_pieces, num_rows)
    res_out = _rows_view(out, (num_rows, head_dim), outs.device)
    res_lse = _rows_view(lse, (num_rows,), outs.device)
    if num_rows > 0:
        block_d = max(16, triton.next_power_of_2(head_dim))
        block_r = max(1, min(64, _ROW_ELEMENTS // block_d, triton.next_power_of_2(num_rows)))
        _merge_partials_kernel[(triton.cdiv(num_rows, block_r),)](
            outs3, lses2, res_out, res_lse, num_pieces, num_rows, head_dim,
            outs3.stride(0), outs3.stride(1), outs3.stride(2), lses2.stride(0), lses2.stride(1),
            res_out.stride(0), res_out.stride(1), res_lse.stride(0),
            BLOCK_R=block_r, BLOCK_D=block_d)
    return _deliver(res_out.view(*row_shape, head_dim), res_lse.view(row_shape), out, lse)


def _rows_view(dst: torch.Tensor | None, shape: tuple[int, ...],
               device: torch.device) -> torch.Tensor:
    """``dst`` flattened to ``shape`` without a copy, or a fresh tensor when that is impossible
    (no destination, or strides that do not flatten; ``_deliver`` then copies)."""
    if dst is not None:
        try:
            return dst.view(shape)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=torch.float32, device=device)


def _deliver(
    m_out: torch.Tensor, m_lse: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy the results into the caller's destinations where given (a no-op when the kernel
    already wrote there)."""
    if out is not None:
        if m_out.data_ptr() != out.data_ptr() or m_out.stride() != out.stride():
            out.copy_(m_out)
        m_out = out
    if lse is not None:
        if m_lse.data_ptr() != lse.data_ptr() or m_lse.stride() != lse.stride():
            lse.copy_(m_lse)
        m_lse = lse
    return m_out, m_lse
