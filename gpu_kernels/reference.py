"""Plain-torch references for the attention ops (also the CPU fallback).

A partial attention result is ``(out, lse)``: the softmax-weighted sum of values over one
piece of the keys, and the natural-log log-sum-exp of the scaled scores over that piece.
Partials over disjoint pieces merge exactly by log-sum-exp (flash-decoding, FlexGen's CPU
delegation): ``lse = logsumexp_i(lse_i)``, ``out = sum_i exp(lse_i - lse) * out_i``.
"""
from __future__ import annotations

import torch

# The references of the scoring and 4-bit ops live in their own module (this one would pass
# 500 lines); they are part of the one reference set and are exported from here too.
from gpu_kernels.reference_sparse import (  # noqa: E402
    Quant4Pages,
    dequantize_pages_4bit_ref,
    page_key_bounds_ref,
    paged_decode_attention_4bit_ref,
    partial_key_page_scores_ref,
    quantize_pages_4bit_ref,
    quest_page_scores_ref,
)

__all__ = [
    "attention_partial_ref",
    "merge_partials_ref",
    "paged_decode_attention_ref",
    "sparse_paged_decode_attention_ref",
    "Quant4Pages",
    "quantize_pages_4bit_ref",
    "dequantize_pages_4bit_ref",
    "paged_decode_attention_4bit_ref",
    "quest_page_scores_ref",
    "partial_key_page_scores_ref",
    "page_key_bounds_ref",
]


def attention_partial_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries over one piece of keys, returning ``(out, lse)``.

    Args:
        q: [num_kv_heads, group, T, head_dim]; query head ``h*group + j`` uses KV head ``h``.
        k, v: [num_kv_heads, L, head_dim], same dtype as q (may be strided views).
        scale: softmax scale applied to q·k.
        q_pos, k_pos: optional [T] and [L] int64 positions; when given, key j is visible to
            query t only if ``k_pos[j] <= q_pos[t]`` (causal mask).
        window: with positions, also hide keys with ``k_pos[j] <= q_pos[t] - window``
            (sliding-window attention: a query sees itself and the ``window - 1`` keys before).

    Returns:
        out: [num_kv_heads, group, T, head_dim] float32 (zeros where no key is visible).
        lse: [num_kv_heads, group, T] float32 (-inf where no key is visible).
    """
    nkv, group, t, hd = q.shape
    if k.shape[1] == 0:
        return _empty_partial(q)
    # Scores in the input dtype (fp32 accumulation inside matmul), softmax in fp32, as the
    # Hugging Face eager path does, so fp32 runs agree to rounding.
    scores = torch.matmul(q.reshape(nkv, group * t, hd), k.transpose(1, 2))
    scores = scores.float().mul_(scale).view(nkv, group, t, -1)
    if q_pos is not None and k_pos is not None:
        hidden = k_pos.view(1, -1) > q_pos.view(-1, 1)  # [T, L]
        if window is not None:
            hidden |= k_pos.view(1, -1) <= q_pos.view(-1, 1) - window
        scores.masked_fill_(hidden, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.to(v.dtype).view(nkv, group * t, -1), v).float().view(nkv, group, t, hd)
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    out = out / safe
    lse = (m + torch.log(denom)).squeeze(-1)  # log(0) = -inf for rows with no visible key
    return out, lse


def _empty_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The partial of a piece with no keys: zeros and -inf."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def merge_partials_ref(
    outs: list[torch.Tensor], lses: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partial results over disjoint key pieces by log-sum-exp.

    Args:
        outs: partial outputs [..., head_dim] float32, all of one shape.
        lses: matching log-sum-exps [...] float32 (-inf for empty pieces).

    Returns:
        ``(out, lse)`` of the union of the pieces; rows empty in every piece give zeros and
        -inf.
    """
    if not outs or len(outs) != len(lses):
        raise ValueError(f"need as many outs as lses (>= 1), got {len(outs)} and {len(lses)}")
    if len(outs) == 1:
        return outs[0], lses[0]
    lse_all = torch.stack(lses)  # [P, ...]
    lse = torch.logsumexp(lse_all, dim=0)
    finite = torch.isfinite(lse)
    ref = torch.where(finite, lse, torch.zeros_like(lse))
    weights = torch.exp(lse_all - ref)  # exp(-inf) = 0 for empty pieces
    out = (weights.unsqueeze(-1) * torch.stack(outs)).sum(dim=0)
    return out, lse


def paged_decode_attention_ref(
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
    """Decode attention of one query per sequence over its paged keys, returning ``(out, lse)``.

    The spec of ``gpu_kernels.paged_attention.paged_decode_attention`` (same arguments; the
    launcher validates them). Sequence b's keys are positions ``0 .. seq_lens[b]-1``; position
    t lives in page ``t // page_size`` at slot ``block_table[b, t // page_size]``, row
    ``t % page_size``. The query comes after all of them.

    Args:
        q: [B, num_heads, head_dim] float32/float16/bfloat16; head ``h*group + j`` uses KV head h.
        k_cache, v_cache: [num_kv_heads, num_slots, page_size, head_dim], q's dtype.
        block_table: [B, max_pages] int32 slots.
        seq_lens: [B] int32 key counts (0 allowed).
        scale: softmax scale applied to q·k.
        window: when given, only the last ``window`` keys of each sequence are visible.
        first_key: optional [B] int32: positions below ``first_key[b]`` are not visible; with
            ``window``, sequence b sees ``max(seq_lens[b] - window, first_key[b]) ..
            seq_lens[b] - 1``.
        num_splits: ignored (the reference does not split the keys).
        out, lse: optional float32 destinations [B, num_heads, head_dim] and [B, num_heads].

    Returns:
        out [B, num_heads, head_dim] float32 (zeros where no key is visible) and lse
        [B, num_heads] float32 (-inf there).
    """
    del num_splits
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_cache.shape
    res_out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    res_lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        lo = 0 if window is None else max(0, n - window)
        if first_key is not None:
            lo = max(lo, int(first_key[b]))
        if n <= lo:
            continue
        # Only the pages holding visible keys are gathered: lo .. n-1 seen from its first page.
        first = lo // page_size
        pages = block_table[b, first : -(-n // page_size)].long()
        base = first * page_size
        # [nkv, L, hd]
        k = k_cache[:, pages].reshape(num_kv_heads, -1, head_dim)[:, lo - base : n - base]
        v = v_cache[:, pages].reshape(num_kv_heads, -1, head_dim)[:, lo - base : n - base]
        res_out[b], res_lse[b] = _grouped_attention(q[b], k, v, scale)
    return _into(res_out, res_lse, out, lse)


def sparse_paged_decode_attention_ref(
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
    """Decode attention over selected pages only (Quest, Tang et al. 2024; InfiniGen, Lee et
    al. 2024): the spec of ``sparse_paged_decode_attention``.

    Args: as ``paged_decode_attention_ref`` (no window), plus
        selected: [B, num_kv_heads, max_selected] int32 logical page ids; KV head h of
            sequence b (with its query heads) sees only the tokens of pages
            ``selected[b, h, :num_selected[b, h]]`` (any order, no duplicates) that lie
            before ``seq_lens[b]``.
        num_selected: [B, num_kv_heads] int32.

    Returns:
        out [B, num_heads, head_dim] float32 and lse [B, num_heads] float32 (zeros and -inf
        for a head group that selected nothing).
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_cache.shape
    group = num_heads // num_kv_heads
    res_out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    res_lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float32, device=q.device)
    rows = torch.arange(page_size, device=q.device)
    for b in range(batch):
        n = int(seq_lens[b])
        for h in range(num_kv_heads):
            pages = selected[b, h, : int(num_selected[b, h])].long()
            if pages.numel() == 0:
                continue
            visible = (pages[:, None] * page_size + rows[None, :]) < n  # [num_sel, page_size]
            slots = block_table[b, pages].long()
            k = k_cache[h, slots][visible]  # [L, hd]
            v = v_cache[h, slots][visible]
            heads = slice(h * group, (h + 1) * group)
            res_out[b, heads], res_lse[b, heads] = _grouped_attention(q[b, heads], k[None],
                                                                      v[None], scale)
    return _into(res_out, res_lse, out, lse)


def _grouped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per head over [nkv, L, hd] keys, all in fp32: q [nkv*group, hd] ->
    out [nkv*group, hd], lse [nkv*group]."""
    num_kv_heads, _, head_dim = k.shape
    qg = q.float().reshape(num_kv_heads, -1, head_dim)  # [nkv, group, hd]
    scores = torch.matmul(qg, k.float().transpose(1, 2)) * scale  # [nkv, group, L]
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float())
    return out.reshape(-1, head_dim), torch.logsumexp(scores, dim=-1).reshape(-1)


def _into(
    res_out: torch.Tensor, res_lse: torch.Tensor, out: torch.Tensor | None, lse: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The results, copied into the caller's destinations where given."""
    if out is not None:
        res_out = out.copy_(res_out)
    if lse is not None:
        res_lse = lse.copy_(res_lse)
    return res_out, res_lse
