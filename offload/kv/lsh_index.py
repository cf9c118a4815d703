"""A sequence's SimHash tables, one per global layer, for LSH sampling (``sparse="lsh"``).

MagicPIG (Chen et al., ICLR 2025) hashes every key at prefill and retrieves, at decode, the keys
whose codes collide with the query's (``cpu_kernels.lsh``). The index follows the keys as the
sequence grows:

- a layer's first append (a prefill, a DocCache restore) builds its tables from all its keys at
  once (their mean centres every later key), so a fresh ingest and a restore of the same pages
  build the same tables;
- later appends (a question's prompt, decode tokens) join the tables' tail;
- a fork (a question over a document) shares the built tables and copies the tail, so the
  document's index is as it was once the question is released.

The tables live in CPU memory, outside the tiers (``nbytes``, reported in ``RunStats``);
sliding-window layers keep none (their rings are attended whole). The hyperplanes come from
``LshParams.seed`` (``RuntimeConfig.lsh_seed``), never from the sampling seed.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Collection

import numpy as np
import torch

from cpu_kernels.lsh import LshTables, hash_planes

__all__ = ["LshParams", "LshIndex"]


@dataclasses.dataclass(frozen=True, slots=True)
class LshParams:
    """K bits per table, L tables, the hits a candidate needs, and the hyperplanes' seed."""

    bits: int
    tables: int
    min_hits: int
    seed: int

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 16:
            raise ValueError(f"lsh bits must be in 1..16, got {self.bits}")
        if self.tables < 1 or not 1 <= self.min_hits <= self.tables:
            raise ValueError(f"lsh tables must be >= 1 and min_hits in 1..tables, got {self.tables} and "
                             f"{self.min_hits}")

class LshIndex:
    """The SimHash tables of one sequence's global layers.

    Args:
        layers: the global layers (the others are not hashed).
        params: K, L, hits and seed.
    """

    def __init__(self, layers: Collection[int], params: LshParams) -> None:
        self.layers = frozenset(layers)
        self.params = params
        self._tables: dict[int, LshTables] = {}
        self._planes: np.ndarray | None = None  # one seed: every layer hashes with the same planes

    def get(self, layer: int) -> LshTables:
        tables = self._tables.get(layer)
        if tables is None:
            raise RuntimeError(f"layer {layer} has no LSH tables: its keys were never appended in lsh mode")
        return tables

    def add(self, layer: int, start: int, k: torch.Tensor) -> None:
        """Hash keys k [T, num_kv_heads, head_dim] of tokens start .. start + T - 1 of ``layer``
        (a global layer's first call builds its tables; later ones extend them)."""
        if layer not in self.layers or k.shape[0] == 0:
            return
        keys = np.ascontiguousarray(k.detach().to("cpu", torch.float32).permute(1, 0, 2).numpy())
        tables = self._tables.get(layer)
        if tables is None:
            if start != 0:
                raise RuntimeError(f"layer {layer}'s LSH tables must be built from token 0, got keys from {start}")
            p = self.params
            if self._planes is None:
                self._planes = hash_planes(p.seed, keys.shape[0], keys.shape[2], p.bits, p.tables)
            self._tables[layer] = LshTables(keys, bits=p.bits, tables=p.tables, seed=p.seed, planes=self._planes)
            return
        if start != tables.num_tokens:
            if start > tables.num_tokens:
                raise RuntimeError(f"layer {layer}: keys from token {start}, its LSH tables hold {tables.num_tokens}")
            tables.truncate(start)  # tokens written again (a step retried after a refused append)
        tables.extend(keys)

    def fork(self) -> "LshIndex":
        """A copy whose appends leave this index as it is (built tables shared, tails copied)."""
        other = LshIndex(self.layers, self.params)
        other._planes = self._planes
        other._tables = {layer: tables.fork() for layer, tables in self._tables.items()}
        return other

    def nbytes(self) -> int:
        """Bytes held by every layer's tables and the planes they share (tables shared with a
        fork counted in each index)."""
        planes = self._planes.nbytes if self._planes is not None else 0
        return sum(t.nbytes - t.planes.nbytes for t in self._tables.values()) + planes
