"""Page scores that sparse decode modes rank pages by (Triton).

- ``quest_page_scores``: the Quest upper bound (Tang et al. 2024) of q·k over a page from the
  per-channel min / max of its keys (``page_key_bounds``). Per channel
  max(q*kmin, q*kmax) = relu(q)*kmax + min(q, 0)*kmin when kmin <= kmax, so the kernel
  computes the bound of BLOCK_PAGES pages for all query heads of a KV group as two matmuls,
  BLOCK_D channels at a time, and reduces over the group by max.
- ``partial_key_page_scores``: InfiniGen-style (Lee et al. 2024) approximate scores from r
  kept key channels of every token; the page score is the max over its valid tokens. One
  program scores PAGES_PER_PROGRAM consecutive logical pages of one (sequence, KV head).

Both return [B, num_kv_heads, max_pages] float32 with -inf for pages past the sequence, and
compute in fp32 whatever the input dtypes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.dispatch import use_triton
from gpu_kernels.reference_sparse import (
    page_key_bounds_ref,
    partial_key_page_scores_ref,
    quest_page_scores_ref,
)

__all__ = ["page_key_bounds", "partial_key_page_scores", "quest_page_scores"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_QUEST_BLOCK_PAGES = 64
_QUEST_BLOCK_D = 64
_PARTIAL_PAGES_PER_PROGRAM = 8


@triton.jit
def _quest_page_scores_kernel(
    q_ptr, kmin_ptr, kmax_ptr, block_table_ptr, num_pages_ptr, scores_ptr,
    scale, group, head_dim, max_pages,
    stride_q_b, stride_q_h, stride_q_d,
    stride_kmin_head, stride_kmin_slot, stride_kmin_d,
    stride_kmax_head, stride_kmax_slot, stride_kmax_d,
    stride_bt_b, stride_bt_page,
    stride_scores_b, stride_scores_h, stride_scores_page,
    BLOCK_G: tl.constexpr, BLOCK_PAGES: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    # Step 1: this program's pages and their slots (pages past the sequence read slot 0).
    p = tl.program_id(2) * BLOCK_PAGES + tl.arange(0, BLOCK_PAGES)
    p_ok = p < tl.load(num_pages_ptr + b)
    slot = tl.load(block_table_ptr + b * stride_bt_b + p * stride_bt_page, mask=p_ok,
                   other=0).to(tl.int64)
    g = tl.arange(0, BLOCK_G)
    g_ok = g < group
    q_rows = q_ptr + b * stride_q_b + (kv_head * group + g)[:, None] * stride_q_h
    kmin_rows = kmin_ptr + kv_head * stride_kmin_head + slot[:, None] * stride_kmin_slot
    kmax_rows = kmax_ptr + kv_head * stride_kmax_head + slot[:, None] * stride_kmax_slot
    # Step 2: bound[g, p] = relu(q) . kmax + min(q, 0) . kmin, BLOCK_D channels at a time.
    bound = tl.zeros([BLOCK_G, BLOCK_PAGES], tl.float32)
    for d0 in range(0, head_dim, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_ok = d < head_dim
        q = tl.load(q_rows + d[None, :] * stride_q_d, mask=g_ok[:, None] & d_ok[None, :],
                    other=0.0).to(tl.float32)
        k_mask = p_ok[:, None] & d_ok[None, :]
        lo = tl.load(kmin_rows + d[None, :] * stride_kmin_d, mask=k_mask, other=0.0).to(tl.float32)
        hi = tl.load(kmax_rows + d[None, :] * stride_kmax_d, mask=k_mask, other=0.0).to(tl.float32)
        bound += tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
        bound += tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")
    # Step 3: max over the group's query heads; -inf past the sequence.
    best = tl.max(tl.where(g_ok[:, None], bound * scale, float("-inf")), axis=0)
    best = tl.where(p_ok, best, float("-inf"))
    tl.store(scores_ptr + b * stride_scores_b + kv_head * stride_scores_h
             + p * stride_scores_page, best, mask=p < max_pages)


@triton.jit
def _partial_key_page_scores_kernel(
    q_ptr, channels_ptr, kp_ptr, block_table_ptr, seq_lens_ptr, scores_ptr,
    scale, group, rank, max_pages,
    stride_q_b, stride_q_h, stride_q_d,
    stride_ch_head, stride_ch_i,
    stride_kp_head, stride_kp_slot, stride_kp_tok, stride_kp_i,
    stride_bt_b, stride_bt_page,
    stride_scores_b, stride_scores_h, stride_scores_page,
    PAGE_SIZE: tl.constexpr, PAGES_PER_PROGRAM: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + b)
    # Step 1: the group's queries at the kept channels [BLOCK_G, BLOCK_R] fp32.
    g = tl.arange(0, BLOCK_G)
    i = tl.arange(0, BLOCK_R)
    g_ok = g < group
    i_ok = i < rank
    ch = tl.load(channels_ptr + kv_head * stride_ch_head + i * stride_ch_i, mask=i_ok, other=0)
    q = tl.load(q_ptr + b * stride_q_b + (kv_head * group + g)[:, None] * stride_q_h
                + ch[None, :].to(tl.int64) * stride_q_d, mask=g_ok[:, None] & i_ok[None, :],
                other=0.0).to(tl.float32)
    t = tl.arange(0, BLOCK_P)
    kp_head = kp_ptr + kv_head * stride_kp_head
    for k in range(PAGES_PER_PROGRAM):
        # Step 2: one logical page: its valid tokens' partial keys [BLOCK_P, BLOCK_R].
        page = tl.program_id(2) * PAGES_PER_PROGRAM + k
        pos = page * PAGE_SIZE + t
        tok_ok = (t < PAGE_SIZE) & (pos < seq_len)
        slot = tl.load(block_table_ptr + b * stride_bt_b + page * stride_bt_page,
                       mask=page * PAGE_SIZE < seq_len, other=0).to(tl.int64)
        kp = tl.load(kp_head + slot * stride_kp_slot + t[:, None] * stride_kp_tok
                     + i[None, :] * stride_kp_i, mask=tok_ok[:, None] & i_ok[None, :],
                     other=0.0).to(tl.float32)
        # Step 3: token scores for every query head, max over heads and tokens (-inf when
        # the page holds no valid token).
        s = tl.dot(q, tl.trans(kp), input_precision="ieee") * scale  # [BLOCK_G, BLOCK_P]
        s = tl.where(g_ok[:, None] & tok_ok[None, :], s, float("-inf"))
        best = tl.max(tl.max(s, axis=1), axis=0)
        tl.store(scores_ptr + b * stride_scores_b + kv_head * stride_scores_h
                 + page * stride_scores_page, best, mask=page < max_pages)


def quest_page_scores(
    q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor, block_table: torch.Tensor,
    num_pages: torch.Tensor, *, scale: float = 1.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest upper bounds of the attention scores of each page (Tang et al. 2024).

    Args:
        q: [B, num_heads, head_dim] float32/float16/bfloat16 (any strides); query head
            ``h*group + j`` uses KV head h.
        k_min, k_max: [num_kv_heads, num_slots, head_dim] per-page channel min / max of the
            keys (``page_key_bounds``), float32/float16/bfloat16, same device; k_min <= k_max.
        block_table: [B, max_pages] int32 slots, same device.
        num_pages: [B] int32 pages per sequence, 0 .. max_pages, same device.
        scale: > 0, multiplies the bound (e.g. the softmax scale).
        out: optional [B, num_kv_heads, max_pages] float32 destination.

    Returns:
        [B, num_kv_heads, max_pages] float32: for page p, ``scale * sum_c max(q_jc *
        kmin_pc, q_jc * kmax_pc)`` maxed over the group's query heads j; -inf for
        p >= num_pages[b]. It is >= scale * q_j·k for every key k of the page.

    Raises:
        ValueError: a shape, dtype, device or value is off (ranges checked for CPU tensors).
    """
    _check_quest(q, k_min, k_max, block_table, num_pages, scale, out)
    if not use_triton(q):
        res = quest_page_scores_ref(q, k_min, k_max, block_table, num_pages, scale=scale)
        return res if out is None else out.copy_(res)
    batch, num_heads, head_dim = q.shape
    nkv, max_pages = k_min.shape[0], block_table.shape[1]
    res = out if out is not None else torch.empty((batch, nkv, max_pages), dtype=torch.float32,
                                                  device=q.device)
    if res.numel() == 0:
        return res
    group = num_heads // nkv
    grid = (batch, nkv, triton.cdiv(max_pages, _QUEST_BLOCK_PAGES))
    _quest_page_scores_kernel[grid](
        q, k_min, k_max, block_table, num_pages, res, float(scale), group, head_dim, max_pages,
        *q.stride(), *k_min.stride(), *k_max.stride(), *block_table.stride(), *res.stride(),
        BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_PAGES=_QUEST_BLOCK_PAGES,
        BLOCK_D=min(_QUEST_BLOCK_D, max(16, triton.next_power_of_2(head_dim))))
    return res


def partial_key_page_scores(
    q: torch.Tensor, channels: torch.Tensor, k_partial: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, *, scale: float = 1.0, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Approximate page scores from r kept key channels (InfiniGen, Lee et al. 2024).

    Args:
        q: [B, num_heads, head_dim] float32/float16/bfloat16 (any strides).
        channels: [num_kv_heads, r] int32 channel ids in 0 .. head_dim-1 kept for each KV head.
        k_partial: [num_kv_heads, num_slots, page_size, r] float32/float16/bfloat16: those
            channels of every stored key, same device (any strides).
        block_table: [B, max_pages] int32 slots; seq_lens: [B] int32 keys per sequence,
            0 .. max_pages*page_size.
        scale: > 0, multiplies the scores.
        out: optional [B, num_kv_heads, max_pages] float32 destination.

    Returns:
        [B, num_kv_heads, max_pages] float32: per token ``s_t = scale * max_j sum_i
        q[j, channels[h, i]] * k_partial[h, slot, t, i]`` over the group's query heads j, per
        page the max over its tokens before seq_lens[b]; -inf for pages past the sequence.

    Raises:
        ValueError: a shape, dtype, device or value is off (ranges checked for CPU tensors).
    """
    _check_partial(q, channels, k_partial, block_table, seq_lens, scale, out)
    if not use_triton(q):
        res = partial_key_page_scores_ref(q, channels, k_partial, block_table, seq_lens, scale=scale)
        return res if out is None else out.copy_(res)
    batch, num_heads, _ = q.shape
    nkv, _, page_size, rank = k_partial.shape
    max_pages = block_table.shape[1]
    res = out if out is not None else torch.empty((batch, nkv, max_pages), dtype=torch.float32,
                                                  device=q.device)
    if res.numel() == 0:
        return res
    group = num_heads // nkv
    grid = (batch, nkv, triton.cdiv(max_pages, _PARTIAL_PAGES_PER_PROGRAM))
    _partial_key_page_scores_kernel[grid](
        q, channels, k_partial, block_table, seq_lens, res, float(scale), group, rank, max_pages,
        *q.stride(), *channels.stride(), *k_partial.stride(), *block_table.stride(),
        *res.stride(), PAGE_SIZE=page_size, PAGES_PER_PROGRAM=_PARTIAL_PAGES_PER_PROGRAM,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_P=max(16, triton.next_power_of_2(page_size)),
        BLOCK_R=max(16, triton.next_power_of_2(rank)))
    return res


def page_key_bounds(k_cache: torch.Tensor, *, num_tokens: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page channel min / max of the keys: the metadata of ``quest_page_scores``.

    Args:
        k_cache: [num_kv_heads, num_slots, page_size, head_dim] float32/float16/bfloat16.
        num_tokens: optional [num_slots] int32 on k_cache's device, 0 .. page_size: valid
            tokens of each slot (its first ones; for partial pages). A slot with none gets
            min = max = 0.

    Returns:
        (k_min, k_max): [num_kv_heads, num_slots, head_dim] in k_cache's dtype (torch ops).

    Raises:
        ValueError: a shape, dtype, device or value is off.
    """
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4 or k_cache.dtype not in _DTYPES:
        raise ValueError(f"k_cache must be a [num_kv_heads, num_slots, page_size, head_dim] "
                         f"tensor of {_DTYPES}, got {_describe(k_cache)}")
    if num_tokens is not None:
        _check_index("num_tokens", num_tokens, (k_cache.shape[1],), k_cache.device)
        if num_tokens.device.type == "cpu" and num_tokens.numel() and (
                int(num_tokens.min()) < 0 or int(num_tokens.max()) > k_cache.shape[2]):
            raise ValueError(f"num_tokens must lie in 0 .. page_size = {k_cache.shape[2]}")
    return page_key_bounds_ref(k_cache, num_tokens=num_tokens)


# ---------------------------------------------------------------------------------------------
# Input checks (ValueError naming the argument and the fix); ranges only for CPU tensors.


def _describe(t: object) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_index(name: str, t: object, shape: tuple[int, ...], device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != len(shape):
        raise ValueError(f"{name} must be an int32 tensor with {len(shape)} dims (convert with "
                         f".to(torch.int32)), got {_describe(t)}")
    if any(want >= 0 and got != want for got, want in zip(t.shape, shape)):
        raise ValueError(f"{name} must have shape {shape} (-1: any), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")


def _check_q(q: object) -> None:
    if not isinstance(q, torch.Tensor) or q.dim() != 3 or q.dtype not in _DTYPES:
        raise ValueError(f"q must be a [B, num_heads, head_dim] tensor of {_DTYPES}, got "
                         f"{_describe(q)}")


def _check_heads_scale_out(q: torch.Tensor, num_kv_heads: int, scale: object, out: object,
                           max_pages: int) -> None:
    if num_kv_heads < 1 or q.shape[1] % num_kv_heads:
        raise ValueError(f"q's num_heads={q.shape[1]} must be a multiple of num_kv_heads="
                         f"{num_kv_heads}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
        raise ValueError(f"scale must be a finite float > 0, got {scale!r}")
    shape = (q.shape[0], num_kv_heads, max_pages)
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32
                            or tuple(out.shape) != shape or out.device != q.device):
        raise ValueError(f"out must be a float32 tensor of shape {shape} on {q.device}")


def _check_slots(block_table: torch.Tensor, pages_used: torch.Tensor, num_slots: int) -> None:
    """Every page in use names a slot of the arena (CPU tensors only)."""
    in_use = torch.arange(block_table.shape[1])[None, :] < pages_used.long()[:, None]
    used = block_table[in_use]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_slots):
        raise ValueError(f"block_table entries in use must be slots 0 .. {num_slots - 1}, got "
                         f"values in {int(used.min())} .. {int(used.max())}")


def _check_quest(q, k_min, k_max, block_table, num_pages, scale, out) -> None:
    _check_q(q)
    for name, t in (("k_min", k_min), ("k_max", k_max)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be a [num_kv_heads, num_slots, head_dim] tensor of "
                             f"{_DTYPES}, got {_describe(t)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    if tuple(k_max.shape) != tuple(k_min.shape) or k_min.shape[2] != q.shape[2]:
        raise ValueError(f"k_min and k_max must both be [num_kv_heads, num_slots, head_dim="
                         f"{q.shape[2]}], got {tuple(k_min.shape)} and {tuple(k_max.shape)}")
    _check_index("block_table", block_table, (q.shape[0], -1), q.device)
    _check_index("num_pages", num_pages, (q.shape[0],), q.device)
    max_pages = block_table.shape[1]
    _check_heads_scale_out(q, k_min.shape[0], scale, out, max_pages)
    if q.device.type == "cpu":
        if num_pages.numel() and (int(num_pages.min()) < 0 or int(num_pages.max()) > max_pages):
            raise ValueError(f"num_pages must lie in 0 .. max_pages = {max_pages}, got "
                             f"{num_pages.tolist()}")
        _check_slots(block_table, num_pages, k_min.shape[1])


def _check_partial(q, channels, k_partial, block_table, seq_lens, scale, out) -> None:
    _check_q(q)
    if not isinstance(k_partial, torch.Tensor) or k_partial.dim() != 4 \
            or k_partial.dtype not in _DTYPES:
        raise ValueError(f"k_partial must be a [num_kv_heads, num_slots, page_size, r] tensor "
                         f"of {_DTYPES}, got {_describe(k_partial)}")
    if k_partial.device != q.device:
        raise ValueError(f"k_partial must be on q's device {q.device}, got {k_partial.device}")
    nkv, num_slots, page_size, rank = k_partial.shape
    if rank < 1 or page_size < 1:
        raise ValueError(f"k_partial needs r >= 1 channels and page_size >= 1, got "
                         f"{tuple(k_partial.shape)}")
    _check_index("channels", channels, (nkv, rank), q.device)
    _check_index("block_table", block_table, (q.shape[0], -1), q.device)
    _check_index("seq_lens", seq_lens, (q.shape[0],), q.device)
    max_pages = block_table.shape[1]
    _check_heads_scale_out(q, nkv, scale, out, max_pages)
    if q.device.type == "cpu":
        if channels.numel() and (int(channels.min()) < 0 or int(channels.max()) >= q.shape[2]):
            raise ValueError(f"channels must be ids in 0 .. head_dim-1 = {q.shape[2] - 1}")
        if seq_lens.numel() and (int(seq_lens.min()) < 0
                                 or int(seq_lens.max()) > max_pages * page_size):
            raise ValueError(f"seq_lens must lie in 0 .. max_pages*page_size = "
                             f"{max_pages * page_size}, got {seq_lens.tolist()}")
        _check_slots(block_table, (seq_lens.long() + page_size - 1) // page_size, num_slots)
