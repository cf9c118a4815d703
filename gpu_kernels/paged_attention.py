"""Paged decode attention (dense, sliding-window and page-sparse) with split-KV (Triton).

One decode query per sequence attends to its keys in the page arena (docs/layout.md:
head-major ``[num_kv_heads, num_slots, page_size, head_dim]``, logical page i of sequence b
at slot ``block_table[b, i]``). The kernel follows flash-decoding (Dao et al. 2023): the grid
is (B, num_kv_heads, num_splits); each program reads a contiguous range of one sequence's
pages for one KV head ONCE, scores all the query heads of that KV group against it with
``tl.dot`` (the group padded to 16 rows), keeps an fp32 online softmax and writes a partial
``(out, lse)``; ``gpu_kernels.merge.merge_partials`` then reduces the splits by log-sum-exp.
The sparse variant walks a per-head list of selected pages instead (Quest, Tang et al. 2024;
InfiniGen, Lee et al. 2024) with the same kernel. The dense walk may start at a per-sequence
``first_key`` (a sliding-window ring whose first page holds keys that left the window).

Tiles hold BLOCK_N tokens of consecutive pages of the walk (several pages per tile when
pages are small, part of a page when they are large), each token gathered through the block
table, so slots may be scattered anywhere in the arena.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpu_kernels.dispatch import interpreting, use_triton
from gpu_kernels.merge import merge_partials
from gpu_kernels.reference import paged_decode_attention_ref, sparse_paged_decode_attention_ref

__all__ = ["paged_decode_attention", "sparse_paged_decode_attention"]

# Launch configuration by padded head_dim: (BLOCK_N tokens per tile, num_warps, num_stages).
# A tile of K plus one of V is 32 KiB in bf16 for every entry; two stages keep ~64 KiB per
# program in flight. Chosen by reasoning, not tuned (autotune would go behind a flag).
_CONFIGS = {64: (128, 4, 2), 128: (64, 4, 2), 256: (32, 4, 2)}
# Split-KV sizing. On CUDA aim for ~2 programs per SM (132 SMs, H100 SXM): all resident in one
# wave, so no tail wave, and enough bytes in flight per SM to saturate HBM. The interpreter
# runs programs one after another: few programs, but still several splits to test the merge.
_CUDA_SM_COUNT = 132
_PROGRAMS_PER_SM = 2
_MIN_TOKENS_PER_SPLIT = 256
_INTERPRETER_PROGRAMS = 8
_NO_WINDOW = 2**31 - 1


@triton.jit
def _paged_decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, block_table_ptr, seq_lens_ptr, selected_ptr, num_selected_ptr,
    first_key_ptr, out_ptr, lse_ptr,
    scale, window, group, head_dim,
    stride_q_b, stride_q_h, stride_q_d,
    stride_k_head, stride_k_slot, stride_k_tok, stride_k_d,
    stride_v_head, stride_v_slot, stride_v_tok, stride_v_d,
    stride_bt_b, stride_bt_page, stride_sl_b, stride_fk_b,
    stride_sel_b, stride_sel_h, stride_sel_i, stride_nsel_b, stride_nsel_h,
    stride_out_split, stride_out_b, stride_out_h, stride_out_d,
    stride_lse_split, stride_lse_b, stride_lse_h,
    PAGE_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SPARSE: tl.constexpr, HAS_FIRST_KEY: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)

    # Step 1: the walk of this (sequence, KV head): entries 0..num_entries-1 are pages (dense:
    # consecutive from the page of the first visible key; sparse: the selected list) and
    # positions lo..seq_len-1 are visible (dense: lo is the later of the window's start and
    # first_key, capped at seq_len). Split `split` takes a contiguous range of its tiles.
    seq_len = tl.load(seq_lens_ptr + b * stride_sl_b)
    if SPARSE:
        num_entries = tl.load(num_selected_ptr + b * stride_nsel_b + kv_head * stride_nsel_h)
        first_page = 0
        lo = 0
    else:
        lo = tl.maximum(seq_len - window, 0)
        if HAS_FIRST_KEY:
            first_key = tl.load(first_key_ptr + b * stride_fk_b)
            lo = tl.minimum(tl.maximum(lo, first_key), seq_len)
        first_page = lo // PAGE_SIZE
        num_entries = tl.cdiv(seq_len, PAGE_SIZE) - first_page
    num_tiles = tl.cdiv(num_entries * PAGE_SIZE, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    # Step 2: the group's query rows [BLOCK_G, BLOCK_D] (padding rows and channels are 0).
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kv_head * group + g
    g_ok = g < group
    d_ok = d < head_dim
    q = tl.load(q_ptr + b.to(tl.int64) * stride_q_b + heads[:, None] * stride_q_h
                + d[None, :] * stride_q_d, mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:  # the interpreter's tl.dot is wrong on raw bf16
        q = q.to(tl.float32)
    k_head_ptr = k_ptr + kv_head.to(tl.int64) * stride_k_head
    v_head_ptr = v_ptr + kv_head.to(tl.int64) * stride_v_head
    bt_row_ptr = block_table_ptr + b.to(tl.int64) * stride_bt_b
    sel_row_ptr = selected_ptr + b.to(tl.int64) * stride_sel_b + kv_head * stride_sel_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(tile_lo, tile_hi):
        # Step 3: gather the tile's tokens: walk index -> page -> slot -> K/V rows.
        walk = tile * BLOCK_N + n
        entry = walk // PAGE_SIZE
        row = walk % PAGE_SIZE
        entry_ok = entry < num_entries
        if SPARSE:
            page = tl.load(sel_row_ptr + entry * stride_sel_i, mask=entry_ok, other=0)
        else:
            page = first_page + entry
        pos = page * PAGE_SIZE + row
        tok_ok = entry_ok & (pos >= lo) & (pos < seq_len)
        slot = tl.load(bt_row_ptr + page * stride_bt_page, mask=tok_ok, other=0).to(tl.int64)
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_head_ptr + slot[:, None] * stride_k_slot + row[:, None] * stride_k_tok
                    + d[None, :] * stride_k_d, mask=kv_mask, other=0.0)
        v = tl.load(v_head_ptr + slot[:, None] * stride_v_slot + row[:, None] * stride_v_tok
                    + d[None, :] * stride_v_d, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)

        # Step 4: scores [BLOCK_G, BLOCK_N] in fp32 and the online-softmax update. A tile with
        # no visible token keeps m at -inf; 0 stands in for it so exp() never sees -inf - -inf.
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        s = tl.where(tok_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # The weights enter the second product in the cache dtype (native 16-bit MMA); the
        # interpreter path rounds them the same way before upcasting.
        p_in = p.to(v_ptr.dtype.element_ty)
        if UPCAST:
            p_in = p_in.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision="ieee")
        m_i = m_new

    # Step 5: this split's partial; no visible key gives out 0 and lse -inf.
    safe = tl.where(l_i > 0, l_i, 1.0)
    lse = tl.where(l_i > 0, m_i + tl.log(safe), float("-inf"))
    out_row_ptr = out_ptr + split.to(tl.int64) * stride_out_split + b.to(tl.int64) * stride_out_b
    tl.store(out_row_ptr + heads[:, None] * stride_out_h + d[None, :] * stride_out_d,
             acc / safe[:, None], mask=g_ok[:, None] & d_ok[None, :])
    lse_row_ptr = lse_ptr + split.to(tl.int64) * stride_lse_split + b.to(tl.int64) * stride_lse_b
    tl.store(lse_row_ptr + heads * stride_lse_h, lse, mask=g_ok)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scale: float,
    window: int | None = None,
    first_key: torch.Tensor | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of one query per sequence over its paged KV, returning ``(out, lse)``.

    Args:
        q: [B, num_heads, head_dim <= 256] float32/float16/bfloat16 (any strides); the query
            sits after all of its sequence's keys. Query head ``h*group + j`` uses KV head h.
        k_cache, v_cache: [num_kv_heads, num_slots, page_size, head_dim] page arena, q's dtype
            and device (any strides).
        block_table: [B, max_pages] int32, same device: the slot of each logical page.
        seq_lens: [B] int32, same device: keys per sequence, 0 .. max_pages*page_size.
        scale: softmax scale applied to q·k (e.g. head_dim**-0.5; Gemma 3:
            query_pre_attn_scalar**-0.5).
        window: when given (>= 1), only the last ``window`` keys of each sequence are visible
            (sliding-window layers).
        first_key: optional [B] int32, same device: keys of sequence b at positions below
            ``first_key[b]`` (0 .. seq_lens[b]) are not visible, e.g. those of a sliding-window
            ring's first page that fell out of the window. With ``window`` the visible
            positions are ``max(seq_lens[b] - window, first_key[b]) .. seq_lens[b] - 1``;
            ``first_key[b] == seq_lens[b]`` leaves none. None: no cut (and no cost).
        num_splits: key splits per (sequence, KV head); default chosen from the page count.
        out: optional [B, num_heads, head_dim] float32 destination.
        lse: optional [B, num_heads] float32 destination.

    Returns:
        out [B, num_heads, head_dim] float32 and lse [B, num_heads] float32 (natural log);
        a sequence with no visible key gives zeros and -inf.

    Raises:
        ValueError: a shape, dtype, device or value is off (the message names the argument).
            Slot and length ranges are checked only for CPU tensors (no device sync).

    Runs the Triton kernel where ``use_triton(q)``; elsewhere ``paged_decode_attention_ref``.
    """
    _check_dense(q, k_cache, v_cache, block_table, seq_lens, scale=scale, window=window,
                first_key=first_key, num_splits=num_splits, out=out, lse=lse)
    if not use_triton(q):
        return paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens, scale=scale,
                                          window=window, first_key=first_key, out=out, lse=lse)
    page_size = k_cache.shape[2]
    max_entries = block_table.shape[1]
    if window is not None:  # a window spans at most window // page_size + 2 pages
        max_entries = min(max_entries, window // page_size + 2)
    dummy = block_table  # stands in for the sparse-only pointers
    return _launch(q, k_cache, v_cache, block_table, seq_lens, dummy, dummy, scale=scale,
                   window=_NO_WINDOW if window is None else window, max_entries=max_entries,
                   num_splits=num_splits, out=out, lse=lse, first_key=first_key)


def sparse_paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    selected: torch.Tensor,
    num_selected: torch.Tensor,
    *,
    scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over selected pages only (Quest / InfiniGen page selection).

    Args: as ``paged_decode_attention`` (no window, no num_splits), plus
        selected: [B, num_kv_heads, max_selected] int32, same device. KV head h of sequence b
            (with all its query heads) attends only to the logical pages
            ``selected[b, h, :num_selected[b, h]]``. Contract: each id lies in
            ``0 .. ceil(seq_lens[b] / page_size) - 1``, no id repeats, any order. A selected
            partial last page contributes only its first ``seq_lens[b] % page_size`` tokens.
            Checked only for CPU tensors; on the device an id outside the range contributes
            nothing and a repeated id counts its page twice.
        num_selected: [B, num_kv_heads] int32 in 0 .. max_selected, same device; 0 gives zeros
            and -inf for that head group.

    Returns:
        out [B, num_heads, head_dim] float32 and lse [B, num_heads] float32.

    Raises:
        ValueError: as ``paged_decode_attention``, and for a bad selection (CPU tensors).
    """
    _check_sparse(q, k_cache, v_cache, block_table, seq_lens, selected, num_selected, scale=scale,
                 out=out, lse=lse)
    if not use_triton(q):
        return sparse_paged_decode_attention_ref(q, k_cache, v_cache, block_table, seq_lens,
                                                 selected, num_selected, scale=scale, out=out,
                                                 lse=lse)
    return _launch(q, k_cache, v_cache, block_table, seq_lens, selected, num_selected,
                   scale=scale, window=_NO_WINDOW, max_entries=selected.shape[2],
                   num_splits=None, out=out, lse=lse, sparse=True)


def _choose_num_splits(batch: int, num_kv_heads: int, max_tokens: int, block_n: int) -> int:
    """Splits per (sequence, KV head) so that the grid has about the target program count,
    with at least one tile (device: _MIN_TOKENS_PER_SPLIT tokens) per split."""
    if interpreting():
        target, min_tokens = _INTERPRETER_PROGRAMS, block_n
    else:
        target, min_tokens = _PROGRAMS_PER_SM * _CUDA_SM_COUNT, max(block_n, _MIN_TOKENS_PER_SPLIT)
    wanted = triton.cdiv(target, max(1, batch * num_kv_heads))
    return max(1, min(wanted, triton.cdiv(max_tokens, min_tokens)))


def _launch(q, k_cache, v_cache, block_table, seq_lens, selected, num_selected, *, scale: float,
            window: int, max_entries: int, num_splits: int | None, out, lse,
            sparse: bool = False,
            first_key: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate, size the grid, run the kernel and reduce the splits (inputs already checked).

    ``first_key`` None passes seq_lens as a stand-in pointer, never read (HAS_FIRST_KEY=False).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_cache.shape
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n, num_warps, num_stages = _CONFIGS[max(64, block_d)]
    if num_splits is None:
        num_splits = _choose_num_splits(batch, num_kv_heads, max_entries * page_size, block_n)
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=torch.float32, device=q.device)
    if lse is None:
        lse = torch.empty((batch, num_heads), dtype=torch.float32, device=q.device)
    if batch == 0:
        return out, lse
    if num_splits == 1:  # the kernel writes the final result directly
        part_out, part_lse = out.unsqueeze(0), lse.unsqueeze(0)
    else:  # [num_splits, B, num_heads, head_dim] and [num_splits, B, num_heads]
        part_out = torch.empty((num_splits, batch, num_heads, head_dim), dtype=torch.float32,
                               device=q.device)
        part_lse = torch.empty((num_splits, batch, num_heads), dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    has_first_key = first_key is not None
    first_key_arg = first_key if has_first_key else seq_lens
    _paged_decode_attention_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, selected, num_selected, first_key_arg,
        part_out, part_lse,
        float(scale), window, group, head_dim, *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), seq_lens.stride(0), first_key_arg.stride(0),
        *_sparse_strides(selected, num_selected, sparse),
        *part_out.stride(), *part_lse.stride(),
        PAGE_SIZE=page_size, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, SPARSE=sparse, HAS_FIRST_KEY=has_first_key,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        merge_partials(part_out, part_lse, out=out, lse=lse)
    return out, lse


def _sparse_strides(selected: torch.Tensor, num_selected: torch.Tensor,
                    sparse: bool) -> tuple[int, ...]:
    """stride_sel_b, stride_sel_h, stride_sel_i, stride_nsel_b, stride_nsel_h (0 when dense)."""
    if not sparse:
        return (0,) * 5
    return (*selected.stride(), *num_selected.stride())


# ---------------------------------------------------------------------------------------------
# Input checks (ValueError naming the argument and the fix). Value ranges need the data, so
# they run only for CPU tensors: on the device they would cost a synchronization per call.

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 256  # the largest entry of _CONFIGS


def _check_dense(q, k_cache, v_cache, block_table, seq_lens, *, scale, window, first_key,
                 num_splits, out, lse) -> None:
    _check_common(q, k_cache, v_cache, block_table, seq_lens, scale, out, lse)
    if first_key is not None:
        _check_index("first_key", first_key, 1, q.device)
        if tuple(first_key.shape) != (q.shape[0],):
            raise ValueError(f"first_key must be [B={q.shape[0]}], got {tuple(first_key.shape)}")
        if q.device.type == "cpu":
            _check_first_key(first_key, seq_lens)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window must be None or an int >= 1, got {window!r}")
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or num_splits < 1):
        raise ValueError(f"num_splits must be None or an int >= 1, got {num_splits!r}")


def _check_sparse(q, k_cache, v_cache, block_table, seq_lens, selected, num_selected, *, scale,
                  out, lse) -> None:
    _check_common(q, k_cache, v_cache, block_table, seq_lens, scale, out, lse)
    batch, num_kv_heads = q.shape[0], k_cache.shape[0]
    _check_index("selected", selected, 3, q.device)
    _check_index("num_selected", num_selected, 2, q.device)
    if tuple(selected.shape[:2]) != (batch, num_kv_heads):
        raise ValueError(f"selected must be [B={batch}, num_kv_heads={num_kv_heads}, "
                         f"max_selected], got {tuple(selected.shape)}")
    if tuple(num_selected.shape) != (batch, num_kv_heads):
        raise ValueError(f"num_selected must be [B={batch}, num_kv_heads={num_kv_heads}], got "
                         f"{tuple(num_selected.shape)}")
    if q.device.type == "cpu":
        _check_selection(selected, num_selected, seq_lens, k_cache.shape[2])


def _check_common(q, k_cache, v_cache, block_table, seq_lens, scale, out, lse) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or k_cache.dim() != 4 or tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"q must be [B, num_heads, head_dim] and k_cache, v_cache the same "
                         f"[num_kv_heads, num_slots, page_size, head_dim]; got q "
                         f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache "
                         f"{tuple(v_cache.shape)}")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache must share one dtype of {_DTYPES}, got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, cache_dim = k_cache.shape
    if cache_dim != head_dim or num_kv_heads < 1 or num_heads % num_kv_heads or page_size < 1:
        raise ValueError(f"q [B, num_heads={num_heads}, head_dim={head_dim}] does not fit the "
                         f"cache [num_kv_heads={num_kv_heads}, *, page_size={page_size}, "
                         f"head_dim={cache_dim}]: head_dims must match and num_heads be a "
                         f"multiple of num_kv_heads")
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {_MAX_HEAD_DIM}, got {head_dim}")
    if k_cache.device != q.device or v_cache.device != q.device:
        raise ValueError(f"k_cache and v_cache must be on q's device {q.device}, got "
                         f"{k_cache.device} and {v_cache.device}")
    _check_index("block_table", block_table, 2, q.device)
    _check_index("seq_lens", seq_lens, 1, q.device)
    if block_table.shape[0] != batch or tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"block_table must be [B={batch}, max_pages] and seq_lens [B={batch}], "
                         f"got {tuple(block_table.shape)} and {tuple(seq_lens.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) \
            or not abs(scale) < float("inf"):
        raise ValueError(f"scale must be a finite float, got {scale!r}")
    _check_dest("out", out, (batch, num_heads, head_dim), q.device)
    _check_dest("lse", lse, (batch, num_heads), q.device)
    if q.device.type == "cpu":
        _check_pages(block_table, seq_lens, page_size, k_cache.shape[1])


def _check_index(name: str, t, ndim: int, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be an int32 tensor with {ndim} dims, got {got} "
                         f"(convert with .to(torch.int32))")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


def _check_dest(name: str, t, shape: tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != shape \
            or t.device != device:
        raise ValueError(f"{name} must be a float32 tensor of shape {shape} on {device}")


def _check_pages(block_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
                 num_slots: int) -> None:
    """Lengths fit the block table and every page in use names a slot of the arena."""
    max_pages = block_table.shape[1]
    if seq_lens.numel() and (int(seq_lens.min()) < 0
                             or int(seq_lens.max()) > max_pages * page_size):
        raise ValueError(f"seq_lens must lie in 0 .. max_pages*page_size = {max_pages * page_size}"
                         f", got {seq_lens.tolist()}: widen block_table")
    pages_used = (seq_lens.long() + page_size - 1) // page_size  # [B]
    in_use = torch.arange(max_pages)[None, :] < pages_used[:, None]
    used = block_table[in_use]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_slots):
        raise ValueError(f"block_table entries in use must be slots 0 .. {num_slots - 1}, got "
                         f"values in {int(used.min())} .. {int(used.max())}")


def _check_first_key(first_key: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Every sequence's first visible key lies in 0 .. seq_lens[b]."""
    bad = (first_key < 0) | (first_key > seq_lens)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(f"first_key must lie in 0 .. seq_lens[b] for every sequence b, got "
                         f"first_key[{b}] = {int(first_key[b])} with seq_lens[{b}] = "
                         f"{int(seq_lens[b])}")


def _check_selection(selected: torch.Tensor, num_selected: torch.Tensor, seq_lens: torch.Tensor,
                     page_size: int) -> None:
    """Counts fit, ids name existing pages of their sequence, and no id repeats."""
    max_selected = selected.shape[2]
    if num_selected.numel() and (int(num_selected.min()) < 0
                                 or int(num_selected.max()) > max_selected):
        raise ValueError(f"num_selected must lie in 0 .. max_selected = {max_selected}, got "
                         f"{num_selected.tolist()}")
    in_use = torch.arange(max_selected)[None, None, :] < num_selected[:, :, None].long()
    num_pages = ((seq_lens.long() + page_size - 1) // page_size)[:, None, None]
    bad = in_use & ((selected < 0) | (selected.long() >= num_pages))
    if bool(bad.any()):
        raise ValueError("selected ids in use must be logical pages 0 .. ceil(seq_lens[b] / "
                         f"page_size) - 1 of their sequence; {int(bad.sum())} are not")
    # Unused entries get distinct negative stand-ins, so equal neighbours after a sort are
    # repeated ids in use.
    stand_in = -1 - torch.arange(max_selected).expand_as(selected)
    ids = torch.where(in_use, selected.long(), stand_in).sort(dim=-1).values
    if bool((ids[..., 1:] == ids[..., :-1]).any()):
        raise ValueError("selected must not repeat a page id within one (sequence, KV head)")
