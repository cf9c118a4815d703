"""Decode attention computed where the pages are, merged by log-sum-exp.

One decode query of a layer attends over the pieces of the layer's read set
(``offload.kv.reads.LayerReads``), each by its route::

    PAGED_DEVICE  -> one in-place paged kernel over the DEVICE arena (no gather):
                       CUDA: Triton paged decode attention (split-KV);
                       CPU:  the Numba page kernel
    PAGED_CPU     -> the Numba page kernel on the CPU where the pages lie: delegated HOST pages
                     in the HOST arena (FlexGen's CPU delegation: only q goes there and (out, lse)
                     comes back); on a CPU-only machine also staged DISK chunks, in place in the
                     staging buffer (no unpack copy)
    GROUPS        -> runs of tokens on the compute device (gathers, CUDA copies of HOST pages,
                     unpacked DISK chunks), then the same kernel (Triton on CUDA, a chunk read as
                     one-token pages) or torch's fused CPU op
    all pieces    -> merged by log-sum-exp

Which pages, which HOST share is delegated and which route each tier takes are decided once,
when the read set is built (``routes`` gives the builder this attention's rules); this module
only computes. A sliding layer's first page may hold keys out of the window: the piece's
``skip`` cuts them inside the kernels.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cpu_kernels import flash_torch
from cpu_kernels.inputs import kernel_pages
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from offload.config import DecodeKernel
from offload.kv.paged_kv import PagedKV
from offload.kv.reads import LayerReads, Piece, PieceKind, Route, RouteRule
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
        self._arena_arrays: dict[int, object] = {}  # id(arena) -> numpy views (K, V; or a 4-bit arena's rows)
        self._blob_fields: np.ndarray | None = None  # byte offsets of a 4-bit blob's fields
        self._partial, self.max_group_tokens = group_partial_fn(
            device, num_heads=num_kv_heads * group_size, num_queries=1, scores_bytes=scores_bytes)

    @property
    def routes(self) -> RouteRule:
        """The routes a read set takes to this attention (``KVReader.layer_reads``)."""
        return RouteRule(device_paged=self.kernel != DecodeKernel.TORCH, cpu_in_ram=self._numba_in_ram,
                         device_kernel_on_cpu=self.kernel == DecodeKernel.NUMBA, cuda=self.device.type == "cuda")

    def __call__(self, reads: LayerReads, q: torch.Tensor) -> torch.Tensor:
        """q [1, num_heads, head_dim] on the compute device -> [1, num_heads * head_dim]: the
        attention of the query over exactly the pages ``reads`` names."""
        reader = self.kv.reader
        outs: list[torch.Tensor] = []
        lses: list[torch.Tensor] = []
        for piece in reads.pieces:
            if piece.kind == PieceKind.SAMPLED:
                part = self._sampled(q, piece, reads)
            elif piece.kind == PieceKind.PACKED4 and piece.route != Route.GROUPS:
                part = self._packed_pages(q, piece)
            elif piece.route == Route.PAGED_DEVICE:
                pool = self.kv.page_cache.arena if piece.kind == PieceKind.CACHED else self.kv.pool_of(piece.tier)
                if self.kernel == DecodeKernel.TRITON:
                    part = self._triton_pages(q, pool, piece)
                else:
                    part = self._numba_pages(q, pool, list(piece.slots), piece.tokens, piece.skip)
            elif piece.route == Route.PAGED_CPU and piece.tier == Tier.DISK:
                with reader.staged(piece) as (k, v):
                    part = self._numba_arena(q, k, v, piece.chunk_positions(), piece.tokens, piece.skip)
                    if reads.fills_cache and piece.kind == PieceKind.DENSE:
                        self.kv.page_cache.fill(reads.layer, list(piece.slots), k, v, piece.chunk_positions())
            elif piece.route == Route.PAGED_CPU:
                part = self._numba_pages(q, self.kv.pool_of(piece.tier), list(piece.slots), piece.tokens, piece.skip)
            else:
                for g in reader.groups(piece, reads.layer, self.max_group_tokens):
                    out, lse = self._group_partial(q, g.k, g.v)
                    outs.append(out)
                    lses.append(lse)
                continue
            outs.append(part[0])
            lses.append(part[1])
        out = outs[0] if len(outs) == 1 else merge_partials_ref(outs, lses)[0]
        return out.reshape(1, -1).to(q.dtype)

    def _packed_pages(self, q: torch.Tensor, piece: Piece) -> Partial:
        """A piece of 4-bit pages (whole, never skipped: the exact window and tail are not
        packed), attended in place by the fused 4-bit kernel: Triton over the DEVICE arena on
        CUDA, else Numba over the arena or the staged DISK chunk."""
        assert piece.skip == 0 and piece.tokens == piece.num_pages * self.kv.page_size
        packed = self.kv.packed
        assert packed is not None
        if self.kernel == DecodeKernel.TRITON and piece.tier == Tier.DEVICE:
            from gpu_kernels.paged_attention_4bit import paged_decode_attention_4bit

            arena = packed.layout.views(packed.arenas[Tier.DEVICE].data)
            table = torch.tensor([piece.slots], dtype=torch.int32).to(self.device, non_blocking=True)
            lens = torch.tensor([piece.tokens], dtype=torch.int32).to(self.device, non_blocking=True)
            out, lse = paged_decode_attention_4bit(q.reshape(1, -1, self.head_dim), arena, table, lens,
                                                   scale=self.scale)
            return out[0], lse[0]
        if piece.tier == Tier.DISK:
            with self.kv.reader.staged_rows(piece) as rows:
                return self._numba_packed(q, rows, piece.chunk_positions())
        arena = packed.arenas[piece.tier]
        rows = self._arena_arrays.get(id(arena))
        if rows is None:  # the arena's rows, made once (the arena lives as long as we do)
            rows = self._arena_arrays[id(arena)] = arena.data.numpy()
        return self._numba_packed(q, rows, list(piece.slots))

    def _sampled(self, q: torch.Tensor, piece: Piece, reads: LayerReads) -> Partial:
        """The importance-weighted partial of the sample's tokens on this piece's pages (LSH:
        ``cpu_kernels.lsh_attention``), read where they lie: an arena in place, or the staged
        DISK chunk (its pages at ``chunk_positions``)."""
        from cpu_kernels.lsh_attention import sampled_attention_trusted

        sample = reads.sample
        assert sample is not None and self.device.type == "cpu", "sampled pieces are attended on the CPU"
        page_slots = np.full(-(-reads.length // self.kv.page_size), -1, dtype=np.int32)
        q_cpu = np.ascontiguousarray(q.reshape(-1, self.head_dim).float().numpy())

        def run(k: np.ndarray, v: np.ndarray) -> Partial:
            out, lse = sampled_attention_trusted(q_cpu, k, v, page_slots, sample.candidates, sample.mean,
                                                 bits=sample.bits, tables=sample.tables, min_hits=sample.min_hits,
                                                 scale=self.scale)
            return torch.from_numpy(out), torch.from_numpy(lse)

        if piece.tier == Tier.DISK:
            page_slots[list(piece.page_ids)] = piece.chunk_positions()
            with self.kv.reader.staged(piece) as (k, v):
                return run(kernel_pages(k, "k", 4), kernel_pages(v, "v", 4))
        page_slots[list(piece.page_ids)] = piece.slots
        return run(*self._arena_views(self.kv.pool_of(piece.tier)))

    def _numba_packed(self, q: torch.Tensor, rows: np.ndarray, slots: list[int]) -> Partial:
        """The fused Numba 4-bit kernel over blob rows (an arena's slots or a staging buffer's)."""
        from cpu_kernels.attention_4bit import attention_blobs_4bit_trusted

        assert self.kv.packed is not None
        layout = self.kv.packed.layout
        if self._blob_fields is None:
            self._blob_fields = layout.blob_fields()
        q_cpu = np.ascontiguousarray(q.reshape(-1, self.head_dim).float().cpu().numpy())
        out, lse = attention_blobs_4bit_trusted(q_cpu, rows, self._blob_fields,
                                                (layout.num_kv_heads, layout.page_size, layout.head_dim),
                                                np.asarray(slots, dtype=np.int32), self.scale)
        return (torch.from_numpy(out).to(self.device, non_blocking=True),
                torch.from_numpy(lse).to(self.device, non_blocking=True))

    def _group_partial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Partial:
        """(out, lse) [num_heads, head_dim] / [num_heads] over a [nkv, n, hd] piece."""
        if self.kernel == DecodeKernel.TRITON:
            return self._triton_tokens(q, k, v)
        qg = q.view(self.num_kv_heads, self.group_size, 1, self.head_dim)
        out, lse = self._partial(qg, k.to(q.dtype), v.to(q.dtype), scale=self.scale)
        return out.reshape(-1, self.head_dim), lse.reshape(-1)

    def _numba_pages(self, q: torch.Tensor, pool: PageArena, slots: list[int], tokens: int, skip: int) -> Partial:
        """In place over a CPU arena (DEVICE on a CPU machine, or HOST): only q moves."""
        return self._numba_arrays(q, *self._arena_views(pool), slots, tokens, skip)

    def _arena_views(self, pool: PageArena) -> tuple[np.ndarray, np.ndarray]:
        """A CPU arena's K and V as kernel views, made once (the arena lives as long as we do)."""
        arrays = self._arena_arrays.get(id(pool))
        if arrays is None:
            arrays = self._arena_arrays[id(pool)] = (kernel_pages(pool.k, "k", 4), kernel_pages(pool.v, "v", 4))
        return arrays

    def _numba_arena(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: list[int], tokens: int,
                     skip: int) -> Partial:
        """The Numba page kernel over pages [nkv, n, page, hd] of CPU memory (a staging
        buffer) at ``positions``, tokens ``skip .. tokens - 1`` laid over them in order."""
        return self._numba_arrays(q, kernel_pages(k, "k", 4), kernel_pages(v, "v", 4), positions, tokens, skip)

    def _numba_arrays(self, q: torch.Tensor, k: np.ndarray, v: np.ndarray, slots: list[int], tokens: int,
                      skip: int) -> Partial:
        # The engine built every input, so the kernel's checked entry point (whose checks cost
        # more than the kernel on short page lists) is skipped.
        from cpu_kernels import attention_contiguous_pages_trusted

        q_cpu = np.ascontiguousarray(q.reshape(-1, self.head_dim).float().cpu().numpy())
        out, lse = attention_contiguous_pages_trusted(q_cpu, k, v, np.asarray(slots, dtype=np.int32), tokens,
                                                      self.scale, skip=skip)
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

    def _triton_pages(self, q: torch.Tensor, pool: PageArena, piece: Piece) -> Partial:
        """In place over the DEVICE arena through a one-row block table (a sliding window's
        ``skip`` as the kernel's first visible key)."""
        from gpu_kernels.paged_attention import paged_decode_attention

        table = torch.tensor([piece.slots], dtype=torch.int32).to(self.device, non_blocking=True)
        lens = torch.tensor([piece.tokens], dtype=torch.int32).to(self.device, non_blocking=True)
        first = (torch.tensor([piece.skip], dtype=torch.int32).to(self.device, non_blocking=True)
                 if piece.skip else None)
        out, lse = paged_decode_attention(q.reshape(1, -1, self.head_dim).to(pool.k.dtype), pool.k, pool.v, table,
                                          lens, scale=self.scale, first_key=first)  # one dtype: see _triton_tokens
        return out[0], lse[0]
