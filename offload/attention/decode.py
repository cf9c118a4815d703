"""Decode attention computed where the pages are, merged by log-sum-exp.

One decode query of a layer attends over the layer's stored pages, tier by tier::

    DEVICE pages  -> one in-place paged kernel over the arena (no gather):
                       CUDA: Triton paged decode attention (split-KV);
                       CPU:  the Numba page kernel (or torch's fused flash op over views)
    HOST pages    -> delegated: the Numba page kernel on the CPU, in place in the HOST arena;
                       only q goes there and (out, lse) comes back (FlexGen's CPU delegation);
                     not delegated: copied to the compute device by groups, attended there
    DISK pages    -> staged chunks, attended on the compute device: CPU (Numba kernel): in
                     place in the staging buffer (``PagedKV.staged_pages``, no unpack copy);
                     CUDA: unpacked and copied (``PagedKV.page_groups``), then the same Triton
                     kernel, a chunk read as one-token pages
    all pieces    -> merged by log-sum-exp

Which HOST pages are attended on the CPU is the placement's decision (a share of each layer's
HOST pages, the first ones in page order). On a CPU-only machine HOST and DEVICE are the same
RAM, so both are attended in place either way.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cpu_kernels import flash_torch
from cpu_kernels.inputs import kernel_pages
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from offload.config import DecodeKernel
from offload.kv.paged_kv import KVSequence, PagedKV
from storage import PageArena, Tier

__all__ = ["DecodeKernel", "DecodeAttention", "group_partial_fn"]

Partial = tuple[torch.Tensor, torch.Tensor]
PartialFn = Callable[..., Partial]

# Largest page group one fused attention partial covers.
FUSED_GROUP_TOKENS = 65536


def group_partial_fn(device: torch.device, *, num_heads: int, num_queries: int,
                     scores_bytes: int) -> tuple[PartialFn, int]:
    """The partial over a group of keys on ``device`` and the most keys one group may hold:
    torch's fused CPU flash op (tiled, no score matrix: groups bounded only by gather copies),
    else the reference, whose [heads, queries, keys] fp32 scores stay within ``scores_bytes``."""
    if flash_torch.is_available(device):
        return flash_torch.attention_partial_flash, FUSED_GROUP_TOKENS
    return attention_partial_ref, max(1, scores_bytes // (4 * num_heads * num_queries))


class DecodeAttention:
    """Attention of one decode query over a layer's stored pages.

    Args:
        kv: the paged KV (arenas, tables, DISK staging).
        num_kv_heads, group_size, head_dim: the model's attention shape.
        scale: softmax scale.
        device: the compute device.
        scores_bytes: bound on the score matrix of one reference partial (groups of pages).
        kernel: the kernel for DEVICE pages.
    """

    def __init__(self, kv: PagedKV, *, num_kv_heads: int, group_size: int, head_dim: int, scale: float,
                 device: torch.device, scores_bytes: int, kernel: DecodeKernel = DecodeKernel.AUTO) -> None:
        self.kv = kv
        self.num_kv_heads, self.group_size, self.head_dim = num_kv_heads, group_size, head_dim
        self.scale = scale
        self.device = device
        if kernel == DecodeKernel.AUTO:
            kernel = DecodeKernel.TRITON if device.type == "cuda" else DecodeKernel.NUMBA
        if kernel == DecodeKernel.NUMBA and device.type != "cpu":
            raise ValueError(f"the Numba decode kernel attends CPU memory; on {device} use the Triton or "
                             f"torch kernel (decode_kernel=AUTO picks Triton on CUDA)")
        self.kernel = kernel
        # On a CPU-only machine with the Numba kernel, HOST pages and staged DISK chunks are
        # attended where they lie (no copy into attention order).
        self._numba_in_ram = device.type == "cpu" and kernel == DecodeKernel.NUMBA
        self._token_table: torch.Tensor | None = None  # [1, n] int32 0..n-1 (one-token pages)
        self._arena_arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # id(arena) -> numpy views of K, V
        self._partial, self._max_group_tokens = group_partial_fn(
            device, num_heads=num_kv_heads * group_size, num_queries=1, scores_bytes=scores_bytes)

    def __call__(self, seq: KVSequence, layer: int, q: torch.Tensor, *, host_share: float = 1.0) -> torch.Tensor:
        """q [1, num_heads, head_dim] on the compute device -> [1, num_heads * head_dim].

        ``host_share``: the share of the layer's HOST pages (the first ones in page order)
        attended on the CPU where they lie; the others are copied to the compute device. On a
        CPU-only machine with the Numba kernel every HOST page is attended in place."""
        ps = self.kv.page_size
        length = seq.lengths[layer]
        segments = list(self.kv.segments(seq, layer))
        delegated = self._delegated_pages(segments, host_share)
        in_place: dict[Tier, tuple[list[int], int]] = {}  # tier -> (slots, tokens)
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        for tier, first, slots in segments:
            if tier == Tier.DEVICE and self.kernel != DecodeKernel.TORCH:
                self._collect(in_place, tier, slots, min(len(slots) * ps, length - first * ps))
                continue
            if tier == Tier.HOST and delegated:
                mine, slots = slots[:delegated], slots[delegated:]
                delegated -= len(mine)
                self._collect(in_place, tier, mine, min(len(mine) * ps, length - first * ps))
                first += len(mine)
            if tier == Tier.DISK and self._numba_in_ram:
                for k, v, tokens in self.kv.staged_pages(seq, layer, first, slots):
                    out, lse = self._numba_arena(q, k, v, list(range(k.shape[1])), tokens)
                    self.kv.io.cpu_attended_bytes[tier.value] += k.shape[1] * self.kv.page_bytes
                    outs.append(out)
                    lses.append(lse)
            elif slots:
                for g in self.kv.page_groups(seq, layer, tier, first, slots, self._max_group_tokens):
                    out, lse = self._group_partial(q, g.k, g.v)
                    outs.append(out)
                    lses.append(lse)
        for tier, (slots, tokens) in in_place.items():
            pool = self.kv.pool(tier)
            if tier == Tier.DEVICE and self.kernel == DecodeKernel.TRITON:
                out, lse = self._triton_pages(q, pool, slots, tokens)
            else:
                out, lse = self._numba_pages(q, pool, slots, tokens)
                self.kv.io.cpu_attended_bytes[tier.value] += len(slots) * self.kv.page_bytes
            self.kv.count_read(layer, tier, len(slots) * self.kv.page_bytes)
            outs.append(out)
            lses.append(lse)
        out = outs[0] if len(outs) == 1 else merge_partials_ref(outs, lses)[0]
        return out.reshape(1, -1).to(q.dtype)

    def _delegated_pages(self, segments: list[tuple[Tier, int, list[int]]], host_share: float) -> int:
        """How many of the layer's HOST pages (the first ones in page order) the CPU attends."""
        if self._numba_in_ram:
            host_share = 1.0
        return round(host_share * sum(len(slots) for tier, _, slots in segments if tier == Tier.HOST))

    def fetch_ahead(self, seq: KVSequence, layer: int, *, host_share: float = 1.0) -> None:
        """On CUDA with a fetcher (``PagedKV.enable_fetch_ahead``): start copying the pieces
        this layer's attention will move to the device (HOST pages not delegated, DISK
        chunks) on the side stream, in the same groups ``__call__`` asks for."""
        if self.kv.fetcher is None:
            return
        delegated = self._delegated_pages(list(self.kv.segments(seq, layer)), host_share)
        self.kv.fetch_ahead(seq, layer, delegated_pages=delegated, max_tokens=self._max_group_tokens)

    @staticmethod
    def _collect(acc: dict[Tier, tuple[list[int], int]], tier: Tier, slots: list[int], tokens: int) -> None:
        # Only a sequence's last page can be partial, and it is always on DEVICE, so the
        # DEVICE segments concatenated in page order keep every full page before it.
        have, n = acc.get(tier, ([], 0))
        acc[tier] = (have + slots, n + tokens)

    def _group_partial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Partial:
        """(out, lse) [num_heads, head_dim] / [num_heads] over a [nkv, n, hd] piece."""
        if self.kernel == DecodeKernel.TRITON:
            return self._triton_tokens(q, k, v)
        qg = q.view(self.num_kv_heads, self.group_size, 1, self.head_dim)
        out, lse = self._partial(qg, k.to(q.dtype), v.to(q.dtype), scale=self.scale)
        return out.reshape(-1, self.head_dim), lse.reshape(-1)

    def _numba_pages(self, q: torch.Tensor, pool: PageArena, slots: list[int], tokens: int) -> Partial:
        """In place over a CPU arena (DEVICE on a CPU machine, or HOST): only q moves."""
        arrays = self._arena_arrays.get(id(pool))
        if arrays is None:  # the arena's numpy views, made once (the arena lives as long as we do)
            arrays = self._arena_arrays[id(pool)] = (kernel_pages(pool.k, "k", 4), kernel_pages(pool.v, "v", 4))
        return self._numba_arrays(q, *arrays, slots, tokens)

    def _numba_arena(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: list[int],
                     tokens: int) -> Partial:
        """The Numba page kernel over pages [nkv, slots, page, hd] of CPU memory (an arena or
        a staging buffer), the first ``tokens`` tokens laid over ``slots`` in order."""
        return self._numba_arrays(q, kernel_pages(k, "k", 4), kernel_pages(v, "v", 4), slots, tokens)

    def _numba_arrays(self, q: torch.Tensor, k: np.ndarray, v: np.ndarray, slots: list[int], tokens: int) -> Partial:
        # The engine built every input, so the kernel's checked entry point (whose checks cost
        # more than the kernel on short page lists) is skipped.
        from cpu_kernels import attention_contiguous_pages_trusted

        q_cpu = np.ascontiguousarray(q.reshape(-1, self.head_dim).float().cpu().numpy())
        out, lse = attention_contiguous_pages_trusted(q_cpu, k, v, np.asarray(slots, dtype=np.int32), tokens,
                                                      self.scale)
        return (torch.from_numpy(out).to(self.device, non_blocking=True),
                torch.from_numpy(lse).to(self.device, non_blocking=True))

    def _triton_tokens(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Partial:
        """A fetched piece [nkv, n, hd] through the same paged kernel, read as n one-token
        pages (a view: no padding copy for a partial last page; the table costs 4 bytes per
        token beside 2 * nkv * hd * dtype bytes of K and V)."""
        from gpu_kernels.paged_attention import paged_decode_attention

        n = k.shape[1]
        if self._token_table is None or self._token_table.shape[1] < n:
            self._token_table = torch.arange(max(n, 4096), dtype=torch.int32, device=self.device).view(1, -1)
        lens = torch.tensor([n], dtype=torch.int32).to(self.device, non_blocking=True)
        # The kernel wants one dtype: the query (a few hundred values) takes the pages' dtype,
        # never the pages the query's (a copy of the piece); it computes in fp32 either way.
        out, lse = paged_decode_attention(q.reshape(1, -1, self.head_dim).to(k.dtype), k.unsqueeze(2),
                                          v.unsqueeze(2), self._token_table[:, :n], lens, scale=self.scale)
        return out[0], lse[0]

    def _triton_pages(self, q: torch.Tensor, pool: PageArena, slots: list[int], tokens: int) -> Partial:
        """In place over the DEVICE arena through a one-row block table."""
        from gpu_kernels.paged_attention import paged_decode_attention

        table = torch.tensor([slots], dtype=torch.int32).to(self.device, non_blocking=True)
        lens = torch.tensor([tokens], dtype=torch.int32).to(self.device, non_blocking=True)
        out, lse = paged_decode_attention(q.reshape(1, -1, self.head_dim).to(pool.k.dtype), pool.k, pool.v, table,
                                          lens, scale=self.scale)  # one dtype: see _triton_tokens
        return out[0], lse[0]
