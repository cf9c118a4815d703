"""Partial attention ``(out, lse)`` on the CPU through torch's fused flash-attention kernel.

torch's CPU flash attention (the kernel behind ``scaled_dot_product_attention`` on CPU)
already computes the log-sum-exp it needs for its own tiling; its ATen entry point returns
it, so one fused, tiled pass gives a mergeable partial without materialising the score
matrix. Semantics are those of ``gpu_kernels.reference.attention_partial_ref`` (tests compare
the two); the Numba kernels of the Kernels issue join this module's role for HOST pages.
"""
from __future__ import annotations

import torch

__all__ = ["attention_partial_flash", "is_available"]

_OP = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def is_available(device: torch.device) -> bool:
    """True where the fused op exists and the tensors live on the CPU."""
    return _OP is not None and device.type == "cpu"


def attention_partial_flash(
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
        q: [num_kv_heads, group, T, head_dim] CPU tensor; query head ``h*group + j`` uses KV head ``h``.
        k, v: [num_kv_heads, L, head_dim], same dtype as q; the last dim must be contiguous.
        scale: softmax scale.
        q_pos, k_pos: optional [T] and [L] int64 positions for a causal mask (key j visible
            to query t iff ``k_pos[j] <= q_pos[t]``).
        window: with positions, also hide keys with ``k_pos[j] <= q_pos[t] - window`` (sliding window).

    Returns:
        out [num_kv_heads, group, T, head_dim] float32 (zeros where no key is visible) and
        lse [num_kv_heads, group, T] float32 (-inf where no key is visible).
    """
    if _OP is None:
        raise RuntimeError("this torch build lacks the fused CPU flash-attention op")
    nkv, group, t, hd = q.shape
    if k.shape[1] == 0:  # the fused op crashes (SIGFPE) on an empty key range
        return (torch.zeros(q.shape, dtype=torch.float32),
                torch.full(q.shape[:-1], float("-inf"), dtype=torch.float32))
    mask, causal = None, False
    if q_pos is not None and k_pos is not None and window is None and t == k.shape[1] and t > 1 \
            and torch.equal(q_pos, k_pos):
        # Queries and keys at the same positions (a prefill chunk over its own keys): the op's
        # causal flag, with no mask built, skips the blocks above the diagonal.
        causal = True
    elif q_pos is not None and k_pos is not None:
        visible = k_pos.view(1, -1) <= q_pos.view(-1, 1)  # [T, L]
        if window is not None:
            visible &= k_pos.view(1, -1) > q_pos.view(-1, 1) - window
        zero = torch.zeros((), dtype=q.dtype)
        mask = torch.where(visible, zero, torch.full((), float("-inf"), dtype=q.dtype))
    out, lse = _OP(q.reshape(1, nkv * group, t, hd), k.unsqueeze(0), v.unsqueeze(0), 0.0, causal,
                   attn_mask=mask, scale=scale)
    out = out.view(nkv, group, t, hd).float()
    lse = lse.view(nkv, group, t).float()
    if mask is not None:
        # The op reports lse 0 for a row that sees no key; the merge needs -inf there.
        empty = ~visible.any(dim=1)  # [T]
        if bool(empty.any()):
            lse = lse.masked_fill(empty.view(1, 1, t), float("-inf"))
            out = out.masked_fill(empty.view(1, 1, t, 1), 0.0)
    return out, lse
