"""Restoring a DocCache into the engine's tiers: every page loaded, or (Cake, ``offload.kv.cake``)
a prefix recomputed from its token ids while the rest loads.

Pages are placed by the placement the document's prefill would have used (the planner when
they spill), in pieces of at most ``RESTORE_PIECE_BYTES`` (a sliding layer's ring: whole), so
a long document's restore holds a few pieces of memory, not a few layers.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from offload.kv.cake import SplitLoader, ahead_bytes, disk_share, kv_bytes_per_token, plan_split, restore_split, \
    split_model, split_pieces
from offload.kv.doc_records import CompactRecords, compact_records, packed_flags
from offload.kv.page_table import cdiv
from planner.restore import RestoreModel
from storage import AlignedBuffer
from storage.doc_store import DocCacheCorrupt, DocReader

if TYPE_CHECKING:
    from offload.engine import Engine
    from offload.kv.paged_kv import KVSequence

__all__ = ["RESTORE_PIECE_BYTES", "RestoreReport", "restore_document"]

RESTORE_PIECE_BYTES = 32 * 2**20  # a DocCache is restored in pieces of at most this many bytes


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreReport:
    """How a hit was restored: ``recompute_tokens`` of the document recomputed (0: every page
    loaded), the predicted seconds of the restore (None when no split was priced), why, the
    measured seconds, and the cost model (None when the restore could not be split)."""

    recompute_tokens: int
    predicted_s: float | None
    plan: str
    seconds: float
    model: RestoreModel | None = None

    def predicted_first_token_s(self, prompt_tokens: int) -> float | None:
        """Predicted time to the first token of a ``prompt_tokens``-token question: the
        restore, then the question's prefill over the document."""
        if self.model is None or self.predicted_s is None:
            return None
        return self.predicted_s + self.model.extend_s(prompt_tokens, first=self.recompute_tokens == 0)


def _layers(engine: "Engine", reader: DocReader,
            records: CompactRecords | None) -> tuple[int, list[tuple[int, int]], list[np.ndarray | None]]:
    """(tokens, per layer (first page, pages), per layer its pages' first records (4-bit
    records, ``offload.kv.doc_records``; None: a record is a page)) of a DocCache whose layout
    matches the engine."""
    ps, cfg, meta = engine.config.page_size, engine.model_config, reader.meta
    if (meta.get("page_size") != ps or len(meta.get("layers", [])) != cfg.num_layers
            or meta.get("kv_format", "exact") != engine.config.kv_format.value
            or meta.get("record_bytes") != (None if records is None else records.record_bytes)):
        raise DocCacheCorrupt(f"DocCache {reader.doc_id}: layout does not match this engine")
    tokens = int(meta["num_tokens"])
    layers, offsets = [], []
    for layer, info in enumerate(meta["layers"]):
        first, n_tok = int(info["first_page"]), int(info["tokens"])
        pages = cdiv(n_tok, ps) - first
        offs = None if records is None else records.offsets(packed_flags(engine, layer, first, pages, n_tok))
        stored = reader.num_pages(layer)
        if n_tok != tokens or stored != (pages if offs is None else int(offs[-1])):
            raise DocCacheCorrupt(f"DocCache {reader.doc_id}: layer {layer} holds {stored} records, "
                                  f"its meta says tokens {n_tok} from page {first}")
        layers.append((first, pages))
        offsets.append(offs)
    return tokens, layers, offsets


def restore_document(engine: "Engine", reader: DocReader, ids: list[int],
                     page_bytes: int) -> tuple["KVSequence", RestoreReport]:
    """The document's sequence from its verified DocCache (``ids``: its token ids), split
    between recompute and loading as ``offload.kv.cake`` plans it
    (``RuntimeConfig.restore_recompute``: None = the planner's split, 0 = load every page, a
    share = forced)."""
    t0 = time.perf_counter()
    records = compact_records(engine, page_bytes)
    tokens, layers, offsets = _layers(engine, reader, records)
    seq = engine.new_sequence()
    try:
        engine.check_request(seq, tokens, 1, allow_long_context=True)
        placement = engine.placement_for(seq, tokens, document=True)  # room kept for a question, as at ingest
        model = split_model(engine, tokens, reader.meta, kv_bytes_per_token(engine, page_bytes), RESTORE_PIECE_BYTES,
                            disk_share(engine, placement, tokens))
        split, why = plan_split(model, engine.config.restore_recompute)
        recompute = split.tokens if split is not None else 0
        per_piece = max(1, RESTORE_PIECE_BYTES // page_bytes)
        keys: list[torch.Tensor] = []  # lsh mode: a global layer's restored keys so far

        read = _piece_reader(engine, reader, records, layers, offsets, tokens)

        def place(layer: int, p0: int, count: int, data: torch.Tensor) -> None:
            start = (layers[layer][0] + p0) * engine.config.page_size
            cfg = engine.model_config
            arr = data.view(engine.kv_dtype).view(count, 2, cfg.num_kv_heads, engine.config.page_size, cfg.head_dim)
            engine.kv.writes.restore_pages(seq, layer, start, arr, min(count * engine.config.page_size,
                                                                       tokens - start), placement, length=tokens)
            if seq.lsh is not None and layer in seq.lsh.layers:
                _hash_restored(seq, layer, arr, keys, whole=p0 + count == layers[layer][1], tokens=tokens)

        if recompute:
            pieces = split_pieces(engine, layers, recompute, per_piece)
            loader = SplitLoader(lambda i: read(pieces[i]), [c * reader.page_bytes for _l, _p, c in pieces],
                                 ahead_bytes(pieces, reader.page_bytes, engine.model_config.num_layers))
            try:
                restore_split(engine, seq, ids, recompute, placement, pieces, loader, place)
            finally:
                loader.close()
        else:
            _load_all(engine, layers, per_piece, read, place)
    except BaseException:
        engine.release(seq)
        raise
    return seq, RestoreReport(recompute, split.predicted_s if split is not None else None, why,
                              time.perf_counter() - t0, model if isinstance(model, RestoreModel) else None)


def _piece_reader(engine: "Engine", reader: DocReader, records: CompactRecords | None,
                  layers: list[tuple[int, int]], offsets: list[np.ndarray | None], tokens: int):
    """``read((layer, first page, pages))``: a piece's pages [pages, page bytes] uint8 as the
    DocCache holds them, checked; 4-bit records read and expanded into pages."""
    def read(piece: tuple[int, int, int]) -> torch.Tensor:
        # Into aligned memory: DISK pages can then be written from where they were read.
        layer, p0, count = piece
        offs = offsets[layer]
        r0, r1 = (p0, p0 + count) if offs is None else (int(offs[p0]), int(offs[p0 + count]))
        buf = AlignedBuffer((r1 - r0) * reader.page_bytes)
        reader.read_pages(layer, r0, r1 - r0, into=buf.memoryview())
        data = buf.torch()[: (r1 - r0) * reader.page_bytes]
        if records is None:
            return data
        return records.expand(data, packed_flags(engine, layer, layers[layer][0] + p0, count, tokens))

    return read


def _load_all(engine: "Engine", layers: list[tuple[int, int]], per_piece: int, read, place) -> None:
    """Every page loaded: one piece is read (and checked) ahead on a thread while the previous
    one is placed (the read and the CRCs release the GIL; DISK writes run on the store's threads)."""
    pieces = split_pieces(engine, layers, 0, per_piece)
    ahead = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="doccache-read")
    try:
        pending = ahead.submit(read, pieces[0]) if pieces else None
        for i, (layer, p0, count) in enumerate(pieces):
            assert pending is not None
            data = pending.result()
            pending = ahead.submit(read, pieces[i + 1]) if i + 1 < len(pieces) else None
            place(layer, p0, count, data)
            del data
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)


def _hash_restored(seq: "KVSequence", layer: int, pages: torch.Tensor, keys: list[torch.Tensor], *, whole: bool,
                   tokens: int) -> None:
    """lsh mode: keep the keys of a restored piece of a global layer (``pages`` [n, 2,
    num_kv_heads, page_size, head_dim]); once the layer is ``whole``, hash its ``tokens`` keys
    at once, as its prefill did (the same values: the same tables)."""
    nkv, hd = pages.shape[2], pages.shape[4]
    keys.append(pages[:, 0].permute(0, 2, 1, 3).reshape(-1, nkv, hd).clone())
    if whole:
        assert seq.lsh is not None
        seq.lsh.add(layer, 0, torch.cat(keys)[:tokens])
        keys.clear()
