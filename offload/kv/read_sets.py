"""The types of a read set (``offload.kv.reads`` builds and executes them): a layer's
``LayerReads`` is its ``Piece``s, each pages of one tier in one form (``PieceKind``) reached by
one ``Route``; ``PageChoice`` is a selector's answer; ``PageGroup`` a run of tokens on the
compute device; ``fetch_keys`` what a CUDA fetch-ahead copies of a set."""
from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import Any

import torch

from offload.kv.page_table import LayerKind, group_pages
from offload.kv.readahead import Chunk
from storage import Tier

__all__ = ["PieceKind", "Route", "Piece", "LayerReads", "PageChoice", "RouteRule", "PageGroup", "Sample",
           "fetch_keys", "GROUPS_ONLY"]


class PieceKind(enum.Enum):
    """What form a piece's bytes take (exact mode: ``DENSE`` only)."""

    DENSE = "dense"  # whole pages as stored: K and V of every token
    PACKED4 = "packed4"  # 4-bit pages (``offload.kv.quant_pages``), attended by the 4-bit kernels
    SAMPLED = "sampled"  # pages holding sampled tokens: only those rows attended, weighted (LSH)
    RECOMPUTED = "recomputed"  # HOST pages holding the layer's input activations: K/V recomputed (KVPR)
    CACHED = "cached"  # DISK pages a sparse step read before, attended in the page cache (``offload.kv.page_cache``)


class Route(enum.Enum):
    """How attention reaches a piece's pages."""

    PAGED_DEVICE = "paged_device"  # the compute device's paged kernel, in place in the DEVICE arena
    PAGED_CPU = "paged_cpu"  # the CPU's Numba paged kernel in place: HOST arena, DISK staging buffer
    GROUPS = "groups"  # runs of tokens on the compute device: views, gathers, copies, unpacked chunks


@dataclasses.dataclass(frozen=True, slots=True)
class RouteRule:
    """Which route each tier takes, fixed by the attention that consumes the set.

    Attributes:
        device_paged: DEVICE pages through the paged kernel in place (else token groups).
        cpu_in_ram: a CPU-only machine with the Numba kernel: HOST pages and staged DISK chunks
            are attended where they lie (PAGED_CPU) whatever the HOST share says.
        device_kernel_on_cpu: the DEVICE paged kernel runs on the CPU (counted as CPU-attended).
        cuda: the compute device is a GPU (HOST and DISK groups cross PCIe).
    """

    device_paged: bool = False
    cpu_in_ram: bool = False
    device_kernel_on_cpu: bool = False
    cuda: bool = False


GROUPS_ONLY = RouteRule()
"""Every piece as token groups on the compute device (prefill's chunked attention)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Sample:
    """A layer's sampled tokens and how to weight them (LSH sampling, ``offload.attention.lsh``):
    attention computes one importance-weighted partial over them, reading their rows from the
    set's ``SAMPLED`` pieces.

    Attributes:
        candidates: ``cpu_kernels.lsh.Candidates`` (token ids per query head, thinned).
        mean: [num_kv_heads, head_dim] float32, the key mean the tables were hashed around.
        bits, tables, min_hits: the tables' K, L and the hits a candidate needed.
        row_bytes: bytes of the distinct rows read per memory tier (a SAMPLED piece's bytes).
    """

    candidates: Any
    mean: Any
    bits: int
    tables: int
    min_hits: int
    row_bytes: dict[Any, int]


@dataclasses.dataclass(frozen=True, slots=True)
class PageChoice:
    """A selector's answer: the page ids to attend (ascending; None = every live page) and
    whether the choice is final before the query exists (read ahead) or must be made again
    with the query (pages then added are read on demand). A sampling selector also names the
    pages holding its sampled tokens (``sampled``, disjoint from ``pages``; DISK ones are read
    whole) and the ``sample`` itself."""

    pages: tuple[int, ...] | None = None
    needs_query: bool = False
    sampled: tuple[int, ...] = ()
    sample: Sample | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """Pages of one layer on one tier that attention takes as one unit.

    Attributes:
        tier, kind, route: where the pages are, in what form, and how attention reaches them.
        page_ids, slots: the pages in page order and their slots on ``tier`` (DISK: page
            positions in the layer's file).
        tokens: tokens held by the listed pages laid end to end (only a sequence's last page
            is partly filled, and it is listed last).
        skip: leading tokens of the first listed page out of a sliding window (not attended).
        chunk: for DISK, the staging chunk that reads the pages (a piece may attend only
            some of a chunk read ahead: ``chunk_positions``).
        ahead: read ahead (known before the query); False: read on demand.
        cpu_attended: a CPU kernel attends it where it lies. copied: it crosses to a GPU.
        nbytes: bytes read when not whole pages (a SAMPLED piece in memory reads rows).
    """

    tier: Tier
    kind: PieceKind
    route: Route
    page_ids: tuple[int, ...]
    slots: tuple[int, ...]
    tokens: int
    skip: int = 0
    chunk: Chunk | None = None
    ahead: bool = True
    cpu_attended: bool = False
    copied: bool = False
    nbytes: int | None = None

    @property
    def num_pages(self) -> int:
        return len(self.page_ids)

    def bytes_read(self, page_bytes: int) -> int:
        """Bytes the piece reads, its pages being ``page_bytes`` each as stored."""
        return self.num_pages * page_bytes if self.nbytes is None else self.nbytes

    def chunk_positions(self) -> list[int]:
        """Where the piece's pages lie in its chunk's staging buffer, in order: every page of
        the chunk, or (a selection that kept only some of a chunk read ahead) a subset."""
        assert self.chunk is not None
        ids = self.chunk.page_ids
        if len(ids) == self.num_pages:
            return list(range(self.num_pages))
        at = {p: i for i, p in enumerate(ids)}
        return [at[p] for p in self.page_ids]

    def runs(self, page_size: int) -> list[Piece]:
        """The piece cut where its page ids jump: runs of consecutive pages, in order (only
        the last run can hold the partly filled last page)."""
        cuts = [i for i in range(1, self.num_pages) if self.page_ids[i] != self.page_ids[i - 1] + 1]
        if not cuts:
            return [self]
        short = self.num_pages * page_size - self.tokens
        bounds = [0, *cuts, self.num_pages]
        return [dataclasses.replace(self, page_ids=self.page_ids[a:b], slots=self.slots[a:b],
                                    tokens=(b - a) * page_size - (short if b == self.num_pages else 0),
                                    skip=self.skip if a == 0 else 0)
                for a, b in zip(bounds, bounds[1:])]


@dataclasses.dataclass(frozen=True, slots=True)
class LayerReads:
    """The read set of one layer in one step: its pieces, in the order attention takes them."""

    layer: int
    kind: LayerKind
    pieces: tuple[Piece, ...]
    length: int  # the layer's tokens the step attends over (a decode step's own token included)
    sample: Sample | None = None  # sampled tokens over the SAMPLED pieces (LSH), else None
    fills_cache: bool = False  # its DISK pages, once attended, go into the page cache

    def pages(self) -> list[int]:
        """Every page id the set names, ascending."""
        return sorted(p for piece in self.pieces for p in piece.page_ids)

    def chunks(self, *, ahead: bool | None = None) -> list[Chunk]:
        """The DISK chunks, in order (only those read ahead, or on demand, when ``ahead`` is given)."""
        return [p.chunk for p in self.pieces
                if p.chunk is not None and (ahead is None or p.ahead == ahead)]

    def bytes_by_tier(self, page_bytes: int) -> dict[Tier, int]:
        out = {t: 0 for t in Tier}
        for p in self.pieces:
            out[p.tier] += p.bytes_read(page_bytes)
        return out


@dataclasses.dataclass(frozen=True, slots=True)
class PageGroup:
    """K/V of consecutive tokens of one layer, for one attention partial.

    k, v: [num_kv_heads, num_tokens, head_dim] on the compute device.
    start_pos: position of the first token (meaningful where the pages are consecutive, as
    in prefill's exact sets). tier: where the pages live.
    """

    k: torch.Tensor
    v: torch.Tensor
    start_pos: int
    tier: Tier


def fetch_keys(reads: LayerReads, max_pages: int, page_size: int) -> list[tuple[Hashable, int]]:
    """What a CUDA fetch-ahead copies for ``reads``, in order: (key, pages) of each HOST group
    and DISK chunk routed through the compute device (the keys attention takes them by)."""
    keys: list[tuple[Hashable, int]] = []
    for piece in reads.pieces:
        if piece.route != Route.GROUPS or piece.tier == Tier.DEVICE or piece.kind != PieceKind.DENSE:
            continue  # (4-bit pages are dequantized where they are read, sampled rows gathered: not fetched ahead)
        if piece.tier == Tier.DISK:
            assert piece.chunk is not None
            keys.append(((Tier.DISK, piece.chunk), piece.chunk.num_pages))  # copied whole
        else:
            for run in piece.runs(page_size):
                for _, group, _ in group_pages(list(run.slots), max_pages):
                    keys.append(((Tier.HOST, reads.layer, tuple(group)), len(group)))
    return keys
