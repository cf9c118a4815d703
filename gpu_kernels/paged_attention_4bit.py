"""Paged decode attention over 4-bit pages, dequantizing inside the kernel (Triton).

Same semantics as ``gpu_kernels.paged_attention.paged_decode_attention`` (one query per
sequence after all of its keys; sequence b's keys are positions 0..seq_lens[b]-1 over the
slots ``block_table[b, :]``; an optional sliding window), but the pages are a
``Quant4Pages`` arena (format in ``gpu_kernels.reference_sparse``: KIVI-style per-channel keys,
Liu et al. 2024; FlexGen-style per-token value groups, Sheng et al. 2023). Full-precision
pages are never materialized: each tile's codes are unpacked and scaled in registers.

Split-KV as in flash-decoding (Dao et al. 2023): the grid is (B, num_kv_heads, num_splits);
each program walks a contiguous range of BLOCK_N-token tiles of one sequence's visible pages
for one KV head, scores all the query heads of that group at once, keeps an fp32 online
softmax and writes a partial ``(out, lse)``; ``gpu_kernels.merge.merge_partials`` reduces the
splits. Byte j of a packed row holds channels 2j and 2j+1, so the kernel keeps q, K, V and
the output as even-channel and odd-channel halves: q·k = q_even·k_even + q_odd·k_odd. The
half width is padded to a power of two with masks (head_dim 80 -> 2 x 64 lanes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.dispatch import interpreting, use_triton
from gpu_kernels.merge import merge_partials
from gpu_kernels.reference_sparse import Quant4Pages, paged_decode_attention_4bit_ref

__all__ = ["paged_decode_attention_4bit"]

# BLOCK_N tokens per tile by padded half head_dim (two fp32 tiles [BLOCK_N, BLOCK_HALF] each
# for K and V live at once); chosen by reasoning, not tuned. num_warps 4 throughout.
_BLOCK_N = {16: 64, 32: 64, 64: 64, 128: 32}
_NUM_WARPS = 4
# Split sizing as in gpu_kernels.paged_attention: ~2 programs per SM of an H100 SXM on CUDA,
# a few programs in the interpreter (which runs them one after another).
_CUDA_SM_COUNT = 132
_PROGRAMS_PER_SM = 2
_MIN_TOKENS_PER_SPLIT = 256
_INTERPRETER_PROGRAMS = 8
_NO_WINDOW = 2**31 - 1
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _paged_decode_attention_4bit_kernel(
    q_ptr, kq_ptr, ks_ptr, km_ptr, vq_ptr, vs_ptr, vm_ptr, block_table_ptr, seq_lens_ptr,
    out_ptr, lse_ptr, scale, window, group, half_dim,
    stride_q_b, stride_q_h, stride_q_d,
    stride_kq_head, stride_kq_slot, stride_kq_tok, stride_kq_byte,
    stride_ks_head, stride_ks_slot, stride_ks_d,
    stride_km_head, stride_km_slot, stride_km_d,
    stride_vq_head, stride_vq_slot, stride_vq_tok, stride_vq_byte,
    stride_vs_head, stride_vs_slot, stride_vs_tok, stride_vs_group,
    stride_vm_head, stride_vm_slot, stride_vm_tok, stride_vm_group,
    stride_bt_b, stride_bt_page,
    stride_out_split, stride_out_b, stride_out_h, stride_out_d,
    stride_lse_split, stride_lse_b, stride_lse_h,
    PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_HALF: tl.constexpr, HALF_GROUP: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    # Step 1: visible positions lo..seq_len-1; the walk starts at the first visible page and
    # split `split` takes a contiguous range of its BLOCK_N-token tiles.
    seq_len = tl.load(seq_lens_ptr + b)
    lo = tl.maximum(seq_len - window, 0)
    walk_start = (lo // PAGE_SIZE) * PAGE_SIZE
    num_tiles = tl.cdiv(tl.maximum(seq_len - walk_start, 0), BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, tl.num_programs(2))
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    # Step 2: the group's query rows as even / odd channel halves [BLOCK_G, BLOCK_HALF] fp32.
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_HALF)
    heads = kv_head * group + g
    g_ok = g < group
    j_ok = j < half_dim
    q_mask = g_ok[:, None] & j_ok[None, :]
    q_rows = q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h
    q_even = tl.load(q_rows + (2 * j)[None, :] * stride_q_d, mask=q_mask, other=0.0).to(tl.float32)
    q_odd = tl.load(q_rows + (2 * j + 1)[None, :] * stride_q_d, mask=q_mask, other=0.0).to(tl.float32)
    kq_head = kq_ptr + kv_head * stride_kq_head
    ks_head = ks_ptr + kv_head * stride_ks_head
    km_head = km_ptr + kv_head * stride_km_head
    vq_head = vq_ptr + kv_head * stride_vq_head
    vs_head = vs_ptr + kv_head * stride_vs_head
    vm_head = vm_ptr + kv_head * stride_vm_head
    bt_row = block_table_ptr + b.to(tl.int64) * stride_bt_b

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc_even = tl.zeros([BLOCK_G, BLOCK_HALF], tl.float32)
    acc_odd = tl.zeros([BLOCK_G, BLOCK_HALF], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        # Step 3: the tile's tokens: position -> page -> slot, row within the page.
        pos = walk_start + tile * BLOCK_N + n
        tok_ok = (pos >= lo) & (pos < seq_len)
        row = (pos % PAGE_SIZE)[:, None]
        slot = tl.load(bt_row + (pos // PAGE_SIZE) * stride_bt_page, mask=tok_ok,
                       other=0).to(tl.int64)[:, None]
        mask = tok_ok[:, None] & j_ok[None, :]
        # Step 4: keys: unpack the nibbles, scale by the page's per-channel scale / min.
        kq = tl.load(kq_head + slot * stride_kq_slot + row * stride_kq_tok
                     + j[None, :] * stride_kq_byte, mask=mask, other=0).to(tl.int32)
        ks = ks_head + slot * stride_ks_slot
        km = km_head + slot * stride_km_slot
        d_even = (2 * j)[None, :]
        k_even = (kq & 15).to(tl.float32) * tl.load(ks + d_even * stride_ks_d, mask=mask, other=0.0).to(
            tl.float32) + tl.load(km + d_even * stride_km_d, mask=mask, other=0.0).to(tl.float32)
        k_odd = (kq >> 4).to(tl.float32) * tl.load(ks + (d_even + 1) * stride_ks_d, mask=mask,
                                                   other=0.0).to(tl.float32) + tl.load(
            km + (d_even + 1) * stride_km_d, mask=mask, other=0.0).to(tl.float32)
        # Step 5: values: byte j lies in group j // HALF_GROUP of its token.
        vq = tl.load(vq_head + slot * stride_vq_slot + row * stride_vq_tok
                     + j[None, :] * stride_vq_byte, mask=mask, other=0).to(tl.int32)
        grp = (j // HALF_GROUP)[None, :]
        vs = tl.load(vs_head + slot * stride_vs_slot + row * stride_vs_tok + grp * stride_vs_group,
                     mask=mask, other=0.0).to(tl.float32)
        vm = tl.load(vm_head + slot * stride_vm_slot + row * stride_vm_tok + grp * stride_vm_group,
                     mask=mask, other=0.0).to(tl.float32)
        v_even = (vq & 15).to(tl.float32) * vs + vm
        v_odd = (vq >> 4).to(tl.float32) * vs + vm

        # Step 6: scores [BLOCK_G, BLOCK_N] and the online-softmax update. A tile with no
        # visible token keeps m at -inf; 0 stands in for it so exp() never sees -inf - -inf.
        s = tl.dot(q_even, tl.trans(k_even), input_precision="ieee")
        s = (s + tl.dot(q_odd, tl.trans(k_odd), input_precision="ieee")) * scale
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc_even = acc_even * alpha[:, None] + tl.dot(p, v_even, input_precision="ieee")
        acc_odd = acc_odd * alpha[:, None] + tl.dot(p, v_odd, input_precision="ieee")
        m_i = m_new

    # Step 7: this split's partial; no visible key gives out 0 and lse -inf.
    safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(safe), float("-inf"))
    out_rows = (out_ptr + split.to(tl.int64) * stride_out_split + b.to(tl.int64) * stride_out_b
                + heads[:, None] * stride_out_h)
    tl.store(out_rows + (2 * j)[None, :] * stride_out_d, acc_even / safe[:, None], mask=q_mask)
    tl.store(out_rows + (2 * j + 1)[None, :] * stride_out_d, acc_odd / safe[:, None], mask=q_mask)
    lse_row = lse_ptr + split.to(tl.int64) * stride_lse_split + b.to(tl.int64) * stride_lse_b
    tl.store(lse_row + heads * stride_lse_h, lse, mask=g_ok)


def paged_decode_attention_4bit(
    q: torch.Tensor,
    qp: Quant4Pages,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per sequence over 4-bit pages, returning ``(out, lse)``.

    Args:
        q: [B, num_heads, head_dim] float32/float16/bfloat16 (any strides); query head
            ``h*group + j`` uses KV head h (group = num_heads // num_kv_heads).
        qp: 4-bit arena [num_kv_heads, num_slots, page_size, head_dim] on q's device (any
            strides). Every page is quantized whole; a partial last page counts only its
            first ``seq_lens[b] % page_size`` tokens.
        block_table: [B, max_pages] int32, same device: the slot of each logical page.
        seq_lens: [B] int32, same device: keys per sequence, 0 .. max_pages*page_size.
        scale: softmax scale applied to q·k.
        window: when given (>= 1), only the last ``window`` keys of each sequence are visible.
        num_splits: key splits per (sequence, KV head); default chosen from the page count.
        out: optional [B, num_heads, head_dim] float32 destination (any strides).
        lse: optional [B, num_heads] float32 destination.

    Returns:
        out [B, num_heads, head_dim] float32 and lse [B, num_heads] float32 (natural log);
        a sequence with no visible key gives zeros and -inf. Inputs are not modified.

    Raises:
        ValueError: a shape, dtype, device or value is off (the message names the argument).
            Slot and length ranges are checked only for CPU tensors (no device sync).

    Runs the Triton kernel where ``use_triton(q)``; elsewhere
    ``paged_decode_attention_4bit_ref`` (dequantize, then fp32 attention).
    """
    _check_inputs(q, qp, block_table, seq_lens, scale, window, num_splits, out, lse)
    if not use_triton(q):
        res = paged_decode_attention_4bit_ref(q, qp, block_table, seq_lens, scale=scale,
                                              window=window)
        return (res[0] if out is None else out.copy_(res[0]),
                res[1] if lse is None else lse.copy_(res[1]))
    return _launch(q, qp, block_table, seq_lens, scale=scale, window=window,
                   num_splits=num_splits, out=out, lse=lse)


def _launch(q: torch.Tensor, qp: Quant4Pages, block_table: torch.Tensor, seq_lens: torch.Tensor,
            *, scale: float, window: int | None, num_splits: int | None,
            out: torch.Tensor | None, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate, size the grid, run the kernel and merge the splits (inputs already checked)."""
    batch, num_heads, head_dim = q.shape
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    block_half = max(16, triton.next_power_of_2(head_dim // 2))
    block_n = _BLOCK_N.get(block_half, 16)  # head_dim > 256: the smallest tile
    max_tokens = block_table.shape[1] * qp.page_size
    if window is not None:  # a window spans at most window + page_size - 1 walked tokens
        max_tokens = min(max_tokens, window + qp.page_size)
    if num_splits is None:
        num_splits = _choose_num_splits(batch * qp.num_kv_heads, max_tokens, block_n)
    if num_splits == 1:  # the kernel writes the final result directly
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:  # [num_splits, B, num_heads, head_dim] and [num_splits, B, num_heads]
        part_out = torch.empty((num_splits, batch, num_heads, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_splits, batch, num_heads), dtype=torch.float32, device=q.device)
    group = num_heads // qp.num_kv_heads
    _paged_decode_attention_4bit_kernel[(batch, qp.num_kv_heads, num_splits)](
        q, *qp.tensors(), block_table, seq_lens, part_out, part_lse, float(scale),
        _NO_WINDOW if window is None else window, group, head_dim // 2, *q.stride(),
        *(s for t in qp.tensors() for s in t.stride()), *block_table.stride(),
        *part_out.stride(), *part_lse.stride(),
        PAGE_SIZE=qp.page_size, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_HALF=block_half, HALF_GROUP=qp.group_size // 2, num_warps=_NUM_WARPS)
    if num_splits > 1:
        merge_partials(part_out, part_lse, out=out, lse=lse)
    return out, lse


def _choose_num_splits(num_rows: int, max_tokens: int, block_n: int) -> int:
    """Splits per (sequence, KV head): about the target program count over ``num_rows``
    (sequence, KV head) pairs, each split at least one tile (CUDA: _MIN_TOKENS_PER_SPLIT)."""
    if interpreting():
        target, min_tokens = _INTERPRETER_PROGRAMS, block_n
    else:
        target, min_tokens = _PROGRAMS_PER_SM * _CUDA_SM_COUNT, max(block_n, _MIN_TOKENS_PER_SPLIT)
    wanted = triton.cdiv(target, max(1, num_rows))
    return max(1, min(wanted, triton.cdiv(max_tokens, min_tokens)))


def _check_inputs(q, qp, block_table, seq_lens, scale, window, num_splits, out, lse) -> None:
    """ValueError naming the argument and the fix; value ranges only for CPU tensors."""
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in _DTYPES:
        got = f"{q.dtype} {tuple(q.shape)}" if isinstance(q, torch.Tensor) else type(q).__name__
        raise ValueError(f"q must be a [B, num_heads, head_dim] tensor of {_DTYPES}, got {got}")
    if not isinstance(qp, Quant4Pages):
        raise ValueError(f"qp must be a Quant4Pages (see quantize_pages_4bit), got "
                         f"{type(qp).__name__}")
    batch, num_heads, head_dim = q.shape
    if head_dim != qp.head_dim or num_heads % qp.num_kv_heads:
        raise ValueError(f"q [B, num_heads={num_heads}, head_dim={head_dim}] does not fit qp "
                         f"[num_kv_heads={qp.num_kv_heads}, head_dim={qp.head_dim}]: head_dims "
                         f"must match and num_heads be a multiple of num_kv_heads")
    if qp.k_q.device != q.device:
        raise ValueError(f"qp must be on q's device {q.device}, got {qp.k_q.device}")
    for name, t, ndim in (("block_table", block_table, 2), ("seq_lens", seq_lens, 1)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
            raise ValueError(f"{name} must be an int32 tensor with {ndim} dims (convert with "
                             f".to(torch.int32)), got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if block_table.shape[0] != batch or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"block_table must be [B={batch}, max_pages] and seq_lens [B={batch}], "
                         f"got {tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < float("inf"):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    for name, value in (("window", window), ("num_splits", num_splits)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    for name, t, shape in (("out", out, (batch, num_heads, head_dim)), ("lse", lse, (batch, num_heads))):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                              or tuple(t.shape) != shape or t.device != q.device):
            raise ValueError(f"{name} must be a float32 tensor of shape {shape} on {q.device}")
    if q.device.type == "cpu":
        _check_ranges(block_table, seq_lens, qp.page_size, qp.num_slots)


def _check_ranges(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                  num_slots: int) -> None:
    """Lengths fit the block table and every page in use names a slot of the arena."""
    max_pages = block_table.shape[1]
    if seq_lens.numel() and (int(seq_lens.min()) < 0 or int(seq_lens.max()) > max_pages * page_size):
        raise ValueError(f"seq_lens must lie in 0 .. max_pages*page_size = {max_pages * page_size}"
                         f", got {seq_lens.tolist()}: widen block_table")
    in_use = torch.arange(max_pages)[None, :] < ((seq_lens.long() + page_size - 1) // page_size)[:, None]
    used = block_table[in_use]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_slots):
        raise ValueError(f"block_table entries in use must be slots 0 .. {num_slots - 1}, got "
                         f"values in {int(used.min())} .. {int(used.max())}")
