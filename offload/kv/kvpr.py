"""KVPR (Jiang et al., "KVPR: Efficient LLM Inference with I/O-Aware KV Cache Partial
Recomputation", 2025): a share of the HOST pages keeps the layer's normed input activations
instead of the K/V; reading such a page moves ``page_size x hidden_size`` values and the K/V
are recomputed from them on the compute device (the key and value rows of the projection,
then RoPE at the tokens' positions).

    prefill                 after a layer's pages are written, the full HOST pages that the
                            placement marks (``Placement.recomputed``) are overwritten with
                            the layer's input rows (``ActivationPages.store``) and their slots
                            recorded; a HOST slot allocated again is forgotten (``forget``)
    read sets               KVReader.layer_reads puts a layer's activation pages in a piece of
                            their own (PieceKind.RECOMPUTED, token groups on the compute device)
    attention, prefill,     ``groups``: the rows read from the HOST arena, moved to the
    DocCache save           compute device, K/V recomputed (``LlamaRunner.kv_from_input``)

An activation page sits in a K/V slot of the HOST arena (its values fill the slot's K then V
rows: ``hidden_size <= 2 x num_kv_heads x head_dim`` is required): the HOST bytes a step moves
shrink to the activations', the HOST memory held does not. Decode's own pages never become
activation pages (they leave DEVICE as K/V), nor do a DocCache restore's.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from offload.config import KVFormat, Recompute as RecomputeMode, Sparse
from offload.errors import InputError
from offload.kv.page_table import cdiv
from offload.kv.read_sets import PageGroup, Piece
from storage import Tier

if TYPE_CHECKING:
    from offload.engine import Engine
    from offload.kv.paged_kv import KVSequence, PagedKV
    from offload.kv.placement import Placement

__all__ = ["ActivationPages", "Recompute", "activation_pages"]

# (layer, normed input rows [n, hidden] on the compute device, positions [n]) -> k, v [n, nkv, hd]
Recompute = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class ActivationPages:
    """The HOST slots that hold a page's input activations, and the K/V recomputed from them."""

    def __init__(self, kv: "PagedKV", hidden_size: int, recompute: Recompute) -> None:
        arena = kv.host_arena
        assert arena is not None, "activation pages live on HOST"
        self.nkv, self.hd, self.ps = arena.num_kv_heads, arena.head_dim, kv.page_size
        if hidden_size > 2 * self.nkv * self.hd:
            raise ValueError(f"an activation page ({hidden_size} values per token) does not fit a K/V slot "
                             f"({2 * self.nkv * self.hd}): KVPR would move more bytes than the K/V")
        self.kv, self.hidden, self.recompute = kv, hidden_size, recompute
        self.slots: set[int] = set()
        self.page_bytes = kv.page_size * hidden_size * arena.k.element_size()

    def forget(self, slots: list[int]) -> None:
        """HOST slots allocated again: they hold no activations any more."""
        if self.slots:
            self.slots.difference_update(slots)

    def split(self, pids: list[int], slots: list[int]) -> tuple[list[int], list[int]]:
        """HOST page ids (``slots``: the layer's) as (activation pages, K/V pages)."""
        return [p for p in pids if slots[p] in self.slots], [p for p in pids if slots[p] not in self.slots]

    def store(self, seq: "KVSequence", layer: int, start: int, x: torch.Tensor, placement: "Placement") -> int:
        """Overwrite the full HOST pages among tokens [start, start + len(x)) of ``layer`` that
        ``placement`` marks with their rows of ``x`` (the layer's normed input); returns how many."""
        ps, arena = self.ps, self.kv.host_arena
        assert arena is not None
        tiers, slots = seq.table.tiers(layer), seq.table.slots(layer)
        done = 0
        for pid in range(cdiv(start, ps), (start + x.shape[0]) // ps):
            if tiers[pid] != Tier.HOST or not placement.recomputed(pid, layer):
                continue
            k, v = self._as_kv(x[pid * ps - start: (pid + 1) * ps - start])
            arena.write_pages([slots[pid]], k[:, None], v[:, None])
            self.slots.add(slots[pid])
            done += 1
        return done

    def _as_kv(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A page's rows [ps, hidden] as the K and V rows of a slot [nkv, ps, hd] (zero padded)."""
        flat = torch.zeros(self.ps, 2 * self.nkv * self.hd, dtype=rows.dtype, device=rows.device)
        flat[:, : self.hidden] = rows
        k, v = flat.view(self.ps, 2, self.nkv, self.hd).unbind(1)
        return k.transpose(0, 1), v.transpose(0, 1)

    def groups(self, piece: Piece, layer: int, max_pages: int) -> Iterator[PageGroup]:
        """A run of activation pages (consecutive whole pages) as token groups of recomputed
        K/V on the compute device."""
        arena, dev, ps = self.kv.host_arena, self.kv.compute_device, self.ps
        assert arena is not None and piece.tokens == piece.num_pages * ps
        for s in range(0, piece.num_pages, max_pages):
            slots = list(piece.slots[s: s + max_pages])
            k, v = arena.read(slots, len(slots) * ps)  # [nkv, n, hd] each, the slots' rows in order
            flat = torch.stack((k.transpose(0, 1), v.transpose(0, 1)), dim=1)  # [n, 2, nkv, hd]
            x = flat.reshape(len(slots) * ps, -1)[:, : self.hidden].to(dev, non_blocking=True)
            first = piece.page_ids[s] * ps  # a run: consecutive pages
            pos = torch.arange(first, first + len(slots) * ps, device=dev)
            kr, vr = self.recompute(layer, x, pos)
            yield PageGroup(kr.transpose(0, 1).contiguous(), vr.transpose(0, 1).contiguous(), first, Tier.HOST)


def activation_pages(engine: "Engine") -> ActivationPages | None:
    """KVPR's HOST pages of activations when ``RuntimeConfig.recompute`` asks for them and the
    engine can run them; with "kvpr" a reason it cannot is an error, with "auto" it means none.

    Raises:
        InputError: recompute="kvpr" where it cannot run (the message says why)."""
    c, cfg, runner = engine.config, engine.model_config, engine.runner
    if c.recompute not in (RecomputeMode.KVPR, RecomputeMode.AUTO):
        return None
    kv_values = 2 * cfg.num_kv_heads * cfg.head_dim
    why = ("it rebuilds K/V from a layer's input in Llama-family models only" if not hasattr(runner, "kv_from_input")
           else "4-bit pages hold no activations" if c.kv_format != KVFormat.EXACT
           else "lsh mode reads HOST rows in place" if c.sparse == Sparse.LSH
           else "there is no HOST tier (give --host-memory)" if engine.host_arena is None
           else (f"a token's input activations ({cfg.hidden_size} values) outnumber its K/V ({kv_values}): "
                 "KVPR would move more bytes, not fewer") if cfg.hidden_size > kv_values else None)
    if why is None:
        kv_dtype = engine.kv_dtype

        def recompute(layer: int, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = runner.kv_from_input(layer, x.to(runner.dtype), pos)
            return k.to(kv_dtype), v.to(kv_dtype)

        return ActivationPages(engine.kv, cfg.hidden_size, recompute)
    if c.recompute == RecomputeMode.KVPR:
        raise InputError(f"recompute='kvpr' cannot run here: {why}; use recompute='none' or 'auto'")
    return None
