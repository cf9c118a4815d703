"""Prefill attention: a chunk of queries over a layer's stored pages and the new tokens.

Layer-wise prefill (LayerKV, FlexGen) runs the whole prompt through one layer at a time; a
chunk of its queries attends, as ``(out, lse)`` partials merged by log-sum-exp:

    stored pages   the layer's tokens from earlier passes (a DocCache, an earlier question),
                   as token groups of an exact read set (``KVReader.layer_groups``); they
                   precede every query, so they need no causal mask
    new tokens     this pass's keys so far (a buffer the engine fills chunk by chunk): those
                   before the first query of the chunk are seen by all of it, the chunk's
                   own need the causal mask

With a sliding ``window`` query i sees keys i - window < j <= i: keys before the first
query's window are cut off, and the mask is applied only to pieces some query must not fully
see. Score matrices stay within ``scores_bytes`` (``group_partial_fn``).
"""
from __future__ import annotations

import torch

from gpu_kernels.reference import merge_partials_ref
from offload.attention.decode import group_partial_fn
from offload.attention.prompt_prior import PageMass
from offload.kv.page_table import KVSequence
from offload.kv.paged_kv import PagedKV

__all__ = ["PrefillAttention"]


class PrefillAttention:
    """Exact attention of a chunk of queries for one layer.

    Args:
        kv: the paged KV (stored pages).
        num_heads, num_kv_heads, group_size, head_dim: the model's attention shape.
        scale: softmax scale.
        scores_bytes: bound on the score matrix of one reference partial.
    """

    def __init__(self, kv: PagedKV, *, num_heads: int, num_kv_heads: int, group_size: int, head_dim: int,
                 scale: float, scores_bytes: int) -> None:
        self.kv = kv
        self.num_heads, self.num_kv_heads, self.group_size, self.head_dim = num_heads, num_kv_heads, group_size, head_dim
        self.scale = scale
        self.scores_bytes = scores_bytes

    def __call__(self, seq: KVSequence, layer: int, q: torch.Tensor, pos: torch.Tensor, k_new: torch.Tensor,
                 v_new: torch.Tensor, new_start: int, *, q_first: int, window: int | None = None,
                 mass: PageMass | None = None) -> torch.Tensor:
        """q [T, num_heads, head_dim] at positions q_first.. (``pos`` on the device) ->
        [T, num_heads * head_dim], over the layer's stored pages and the new tokens' keys
        ``k_new``/``v_new`` [num_kv_heads, N, head_dim] at positions new_start..

        ``mass`` (a global layer's last chunk in a sparse mode) is shown every key piece once:
        the prompt prior (``offload.attention.prompt_prior``), with no second read of the pages."""
        t = q.shape[0]
        qg = q.view(t, self.num_kv_heads, self.group_size, self.head_dim).permute(1, 2, 0, 3)
        partial, max_tokens = group_partial_fn(q.device, num_heads=self.num_heads, num_queries=t,
                                               scores_bytes=self.scores_bytes)
        outs, lses = [], []
        # Keys from `seen` on are in some query's window; from `all_see` on in every one's.
        seen = q_first - window + 1 if window is not None else 0
        all_see = q_first + t - window if window is not None else 0

        def piece(k: torch.Tensor, v: torch.Tensor, k0: int, causal: bool) -> None:
            cut = max(0, seen - k0)
            if cut >= k.shape[1]:
                return
            k, v, k0 = k[:, cut:].to(q.dtype), v[:, cut:].to(q.dtype), k0 + cut
            if mass is not None:
                mass.add(k, k0)
            if causal or k0 < all_see:
                k_pos = torch.arange(k0, k0 + k.shape[1], device=q.device)
                out, lse = partial(qg, k, v, scale=self.scale, q_pos=pos, k_pos=k_pos, window=window)
            else:
                out, lse = partial(qg, k, v, scale=self.scale)
            outs.append(out)
            lses.append(lse)

        for g in self.kv.reader.layer_groups(seq, layer, max_tokens):
            piece(g.k, g.v, g.start_pos, False)
        # New tokens before the first query are visible to every query; the chunk's own keys
        # need the causal mask (without a window, a square at the queries' own positions: the
        # fused op's causal flag, no mask built).
        n = k_new.shape[1]
        split = q_first - new_start
        for lo, hi in ((0, min(split, n)), (min(split, n), n)):
            for a in range(max(lo, seen - new_start), hi, max_tokens):
                b = min(hi, a + max_tokens)
                piece(k_new[:, a:b], v_new[:, a:b], new_start + a, lo == split)
        out, _ = merge_partials_ref(outs, lses)  # [nkv, g, T, hd]
        return out.permute(2, 0, 1, 3).reshape(t, self.num_heads * self.head_dim).to(q.dtype)
