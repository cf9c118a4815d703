"""Plain-torch references for the attention ops (also the CPU fallback).

A partial attention result is ``(out, lse)``: the softmax-weighted sum of values over one
piece of the keys, and the natural-log log-sum-exp of the scaled scores over that piece.
Partials over disjoint pieces merge exactly by log-sum-exp (flash-decoding, FlexGen's CPU
delegation): ``lse = logsumexp_i(lse_i)``, ``out = sum_i exp(lse_i - lse) * out_i``.
"""
from __future__ import annotations

import torch

__all__ = ["attention_partial_ref", "merge_partials_ref"]


def attention_partial_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    q_pos: torch.Tensor | None = None,
    k_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of grouped queries over one piece of keys, returning ``(out, lse)``.

    Args:
        q: [num_kv_heads, group, T, head_dim]; query head ``h*group + j`` uses KV head ``h``.
        k, v: [num_kv_heads, L, head_dim], same dtype as q (may be strided views).
        scale: softmax scale applied to q·k.
        q_pos, k_pos: optional [T] and [L] int64 positions; when given, key j is visible to
            query t only if ``k_pos[j] <= q_pos[t]`` (causal mask).

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
