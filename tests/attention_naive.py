"""An independent float64 attention, the oracle of the kernel tests, plus shared input builders.

Written the obvious way on purpose: every query head gets its KV head repeated explicitly
(query head ``h`` of ``nkv * group`` uses KV head ``h // group``), the score matrix is full,
and the softmax is a plain float64 one. Nothing here calls the code under test.
"""
from __future__ import annotations

import math

import torch

NUM_KV_HEADS = 2
NUM_QUERIES = 4
# Key positions start here so that a query at an earlier position sees no key at all.
K_POS0 = 10


def naive_attention(q, k, v, *, scale, q_pos=None, k_pos=None):
    """(out, lse) in float64: out [nkv, group, T, hd] (0 where no key is visible), lse
    [nkv, group, T] (-inf there)."""
    nkv, group, t, hd = q.shape
    num_heads = nkv * group
    qh = q.double().reshape(num_heads, t, hd)
    kv_head = torch.arange(num_heads) // group
    kh = k.double()[kv_head]  # [H, L, hd]: KV head repeated for each of its query heads
    vh = v.double()[kv_head]
    scores = torch.einsum("htd,hld->htl", qh, kh) * scale
    if q_pos is not None and k_pos is not None:
        visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)  # [T, L]
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.zeros(num_heads, t, hd, dtype=torch.float64)
    lse = torch.full((num_heads, t), float("-inf"), dtype=torch.float64)
    for h in range(num_heads):
        for i in range(t):
            row = scores[h, i]
            if not bool(torch.isfinite(row).any()):
                continue  # no visible key: out 0, lse -inf
            m = row.max()
            w = torch.exp(row - m)
            lse[h, i] = m + torch.log(w.sum())
            out[h, i] = (w / w.sum()) @ vh[h]
    return out.view(nkv, group, t, hd), lse.view(nkv, group, t)


def make_qkv(seq_len, head_dim, group, *, dtype=torch.float32, num_queries=NUM_QUERIES):
    q = torch.randn(NUM_KV_HEADS, group, num_queries, head_dim).to(dtype)
    k = torch.randn(NUM_KV_HEADS, seq_len, head_dim).to(dtype)
    v = torch.randn(NUM_KV_HEADS, seq_len, head_dim).to(dtype)
    return q, k, v


def causal_positions(seq_len, num_queries=NUM_QUERIES):
    """k_pos = K_POS0 .. K_POS0+L-1 and query positions: before every key (sees none), at the
    first key, in the middle, after the last key (sees all)."""
    k_pos = torch.arange(K_POS0, K_POS0 + seq_len, dtype=torch.int64)
    wanted = [K_POS0 - 5, K_POS0, K_POS0 + seq_len // 2, K_POS0 + seq_len + 3]
    q_pos = torch.tensor((wanted * num_queries)[:num_queries], dtype=torch.int64)
    return q_pos, k_pos


def strided_like(x: torch.Tensor) -> torch.Tensor:
    """The same values as a [nkv, L, hd] tensor, as a non-contiguous view: token-major storage
    with every other token a gap (the last dim stays contiguous)."""
    nkv, length, hd = x.shape
    storage = torch.full((2 * length, nkv, hd), float("nan"), dtype=x.dtype)
    storage[::2] = x.transpose(0, 1)
    view = storage[::2].transpose(0, 1)
    assert not view.is_contiguous() and torch.equal(view, x)
    return view


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def positions_or_none(seq_len, causal):
    """causal_positions(seq_len) when causal, else (None, None) (no mask)."""
    return causal_positions(seq_len) if causal else (None, None)


def check_against_naive(out, lse, want_out, want_lse, dtype=torch.float32):
    """A partial ``(out, lse)`` against the float64 oracle, with the dtype's tolerance."""
    from tests.tolerances import LONG_REDUCTION_16BIT, TOL

    atol, rtol = TOL[dtype]
    if dtype == torch.bfloat16:
        # Both kernels form q·k in bf16 (8-bit mantissa) by design, like HF's eager path:
        # unscaled scores of ~30 round by up to 0.06, shifting the softmax weights by ~1% and
        # outputs near zero by ~3e-3 over 33-97 keys, past bf16's 1e-3 atol. The 16-bit
        # reduction entry covers that rounding.
        atol, rtol = LONG_REDUCTION_16BIT
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.double(), want_lse, atol=atol, rtol=rtol)
