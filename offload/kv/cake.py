"""A DocCache restore that recomputes a prefix while the rest loads (Cake: Jin et al.,
"Compute Or Load KV Cache? Why Not Both?", 2024). ``planner.restore`` chooses the split.

    loader thread   reads and verifies, in layer order, the pieces of every global layer from
                    page split / page_size on and each sliding layer's stored ring (at most
                    ``ahead_bytes`` read and not yet placed)
    main thread     Engine.prefill(ids[:split]) with the whole document's placement; after
                    layer l, the loaded pieces of layers <= l are placed (a global layer's
                    restore continues at ``split``; a sliding layer is emptied, then its
                    stored ring restored); then the pieces left, as they arrive

The prefix is prefilled in the ingest's own chunks (``split`` is a multiple of the prefill
chunk the DocCache was built with, and of the page size), so its K/V are the DocCache's bit
for bit and a question computes what it computes after a plain restore. Not split: lsh mode
(its tables are hashed from every restored key at once) and 4-bit pages (a prefix's pages
would be packed by the prefix's window, not the document's).
"""
from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from offload.config import KVFormat, Sparse
from offload.kv.page_table import cdiv
from planner.problem import layer_params
from planner.restore import PRESET_PREFILL_EFFICIENCY, RestoreModel, RestoreSplit, choose_split, prefill_flops

if TYPE_CHECKING:
    from offload.engine import Engine
    from offload.kv.paged_kv import KVSequence
    from offload.kv.placement import Placement
    from planner.profile import HardwareProfile

__all__ = ["split_model", "plan_split", "SplitLoader", "restore_split", "model_flops", "disk_share", "preset_split"]

AHEAD_BYTES = 256 * 2**20  # bytes the loader may hold ahead of the prefill (or two layers' worth)


def model_flops(cfg: Any) -> tuple[float, float]:
    """(linear, quadratic) prefill FLOPs of a model config (``planner.restore.prefill_flops``)."""
    per_layer = layer_params(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size)
    return prefill_flops(num_heads=cfg.num_heads, head_dim=cfg.head_dim, params_per_layer=[per_layer] * cfg.num_layers,
                         windows=cfg.layer_windows)


def split_model(engine: "Engine", tokens: int, meta: dict[str, Any], kv_bytes_per_token: float,
                read_bytes: int, disk_share: float) -> RestoreModel | str:
    """The restore's cost model on this engine, or why a restore of this DocCache is not split.

    Recompute rates: fitted to the DocCache's own ingest (its seconds per prefill chunk, on a
    CPU) when recorded, else the FLOP model at the profile's matmul rate times
    ``PRESET_PREFILL_EFFICIENCY``.
    Loading: ``kv_bytes_per_token`` at the slower of the profile's disk reads (extents of
    ``read_bytes``) and its host-to-device copies, plus the writes of the ``disk_share`` of
    the pages that the placement puts on the DISK tier."""
    cfg, ps = engine.model_config, engine.config.page_size
    if engine.config.sparse == Sparse.LSH:
        return "lsh mode hashes every restored key at once: load every page"
    if engine.config.kv_format != KVFormat.EXACT:
        return "4-bit pages are packed by the whole document's window: load every page"
    chunk = int(meta.get("prefill_chunk", 0))
    if chunk != engine.prefill_chunk:
        return (f"the DocCache was prefilled in chunks of {chunk or 'unrecorded'} tokens, this engine uses "
                f"{engine.prefill_chunk}: a recomputed prefix would differ; load every page")
    step = math.lcm(chunk, ps)
    if tokens <= step:
        return f"the document ({tokens} tokens) is one prefill chunk ({chunk} tokens): load every page"
    profile = engine.hardware_profile()
    rates = _measured_rates(meta, tokens, chunk)
    first_s = 0.0
    if rates is not None:
        linear_s, quadratic_s, first_s = rates
        source = (f"this document's ingest ({len(meta['prefill_chunk_s'])} chunks of {chunk} tokens timed; an "
                  f"engine's first prefill {first_s:.2g} s more)")
    else:
        linear_s, quadratic_s, source = _flop_rates(cfg, profile)
    load_s, attend_s = _load_rates(profile, kv_bytes_per_token, read_bytes, disk_share)
    return RestoreModel(tokens, step, linear_s, quadratic_s, load_s, attend_read_s=attend_s, first_prefill_s=first_s,
                        source=source, min_gain=engine.config.plan_min_gain)


def _load_rates(profile: "HardwareProfile", kv_bytes_per_token: float, read_bytes: int,
                disk_share: float) -> tuple[float, float]:
    """(seconds to load a token's KV, seconds a question spends reading it from DISK after)."""
    read = profile.disk_read_gbps(read_bytes)
    gbps = min(read, profile.host_to_device_pageable_gbps)
    load_s = kv_bytes_per_token * (1 / gbps + disk_share / profile.disk_write_gbps) / 1e9
    return load_s, kv_bytes_per_token * disk_share / (read * 1e9)


def preset_split(cfg: Any, profile: "HardwareProfile", *, tokens: int, page_size: int, chunk: int,
                 kv_dtype_bytes: int, disk_share: float, read_bytes: int) -> tuple[RestoreModel, RestoreSplit]:
    """The split ``offload plan`` predicts for a DocCache hit of ``tokens`` tokens on a
    profile (no measured ingest: the FLOP model at ``PRESET_PREFILL_EFFICIENCY`` of its matmul
    rate), its pages placed with ``disk_share`` on DISK."""
    linear_s, quadratic_s, source = _flop_rates(cfg, profile)
    layers = sum(1 for w in cfg.layer_windows if w is None)
    per_token = 2 * cfg.num_kv_heads * cfg.head_dim * kv_dtype_bytes * layers
    load_s, attend_s = _load_rates(profile, per_token, read_bytes, disk_share)
    model = RestoreModel(tokens, math.lcm(chunk, page_size), linear_s, quadratic_s, load_s, attend_read_s=attend_s,
                         source=source)
    return model, choose_split(model)


def _flop_rates(cfg: Any, profile: "HardwareProfile") -> tuple[float, float, str]:
    """Recompute rates from the FLOP model at ``PRESET_PREFILL_EFFICIENCY`` of the profile's
    matmul rate, and that source's words."""
    per_flop = 1.0 / (profile.device_matmul_tflops * 1e12 * PRESET_PREFILL_EFFICIENCY)
    linear, quadratic = model_flops(cfg)
    return linear * per_flop, quadratic * per_flop, f"{profile.name}'s matmul rate at {PRESET_PREFILL_EFFICIENCY:.0%}"


def _measured_rates(meta: dict[str, Any], tokens: int, chunk: int) -> tuple[float, float, float] | None:
    """(seconds per token, seconds per token squared, first-pass seconds) fitted to the
    ingest's seconds per chunk: chunk c of n_c tokens from s_c costs ``a * n_c + b * pairs_c``
    (its causal query-key pairs, ``n_c * s_c + n_c * (n_c + 1) / 2``), fitted on the chunks
    after the first; what the first chunk took beyond that is an engine's first prefill
    (kernels loaded, buffers made: paid once). A prefix of t tokens then costs ``first + a * t
    + (b / 2) * t**2``. None without three timed chunks or when the fit is not positive."""
    times = meta.get("prefill_chunk_s")
    if not isinstance(times, list) or len(times) != cdiv(tokens, chunk) or len(times) < 3:
        return None
    starts = np.arange(len(times), dtype=np.float64) * chunk
    sizes = np.minimum(chunk, tokens - starts)
    pairs = sizes * starts + sizes * (sizes + 1) / 2
    t = np.asarray(times, dtype=np.float64)
    coef, *_ = np.linalg.lstsq(np.stack([sizes[1:], pairs[1:]], axis=1), t[1:], rcond=None)
    a, b = (float(c) for c in coef)
    if b < 0:  # attention too cheap to see: all linear
        a, b = float(np.sum(t[1:]) / np.sum(sizes[1:])), 0.0
    if a <= 0:
        return None
    return a, b / 2, max(0.0, float(t[0] - a * sizes[0] - b * pairs[0]))


def disk_share(engine: "Engine", placement: "Placement", tokens: int) -> float:
    """The share of the document's global-layer pages that ``placement`` puts on DISK."""
    pages = cdiv(tokens, engine.config.page_size)
    if not engine.global_layers or engine.disk is None:
        return 0.0
    on_disk = sum(placement.disk_pages(pages, layer) for layer in engine.global_layers)
    return on_disk / (pages * len(engine.global_layers))


def plan_split(model: RestoreModel | str, forced: float | None) -> tuple[RestoreSplit | None, str]:
    """(split, the line that explains it); split None when the restore is not split."""
    if isinstance(model, str):
        return None, model
    split = choose_split(model, forced)
    return split, f"{split.explain()}; recompute priced from {model.source}"


class SplitLoader:
    """Reads pieces ``(layer, first record, records)`` of a DocCache on a thread, in order,
    holding at most ``ahead_bytes`` that ``take`` has not returned yet."""

    def __init__(self, read: Callable[[int], torch.Tensor], sizes: list[int], ahead_bytes: int) -> None:
        self._read, self._sizes, self._ahead = read, sizes, ahead_bytes
        self._done: dict[int, torch.Tensor] = {}
        self._held = 0
        self._error: BaseException | None = None
        self._stop = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="doccache-split-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for i, size in enumerate(self._sizes):
            with self._cond:
                self._cond.wait_for(lambda: self._stop or not self._held or self._held + size <= self._ahead)
                if self._stop:
                    return
            try:
                data = self._read(i)
            except BaseException as e:  # handed to the caller by take()
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                self._done[i] = data
                self._held += size
                self._cond.notify_all()

    def ready(self, i: int) -> bool:
        with self._cond:
            return i in self._done or self._error is not None

    def take(self, i: int) -> torch.Tensor:
        """Piece ``i`` (waits for it); raises what the read raised."""
        with self._cond:
            self._cond.wait_for(lambda: i in self._done or self._error is not None)
            if i not in self._done:
                assert self._error is not None
                raise self._error
            self._held -= self._sizes[i]
            self._cond.notify_all()
            return self._done.pop(i)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()


def restore_split(engine: "Engine", seq: "KVSequence", ids: list[int], split: int, placement: "Placement",
                  pieces: list[tuple[int, int, int]], loader: SplitLoader,
                  place: Callable[[int, int, int, torch.Tensor], None]) -> None:
    """Prefill ``ids[:split]`` onto the empty ``seq`` while ``loader`` reads ``pieces`` (in
    layer order), placing each with ``place(layer, first record, records, data)`` once the
    prefill has passed its layer."""
    nxt = 0

    def place_ready(layers_done: int, *, wait: bool) -> None:
        nonlocal nxt
        while nxt < len(pieces) and pieces[nxt][0] < layers_done and (wait or loader.ready(nxt)):
            layer, p0, count = pieces[nxt]
            if engine.windows[layer] is not None and p0 == 0:
                engine.kv.writes.clear_ring(seq, layer)  # its stored ring replaces the prefix's
            place(layer, p0, count, loader.take(nxt))
            nxt += 1

    engine.prefill(seq, ids[:split], document=True, placement=placement,
                   on_layer=lambda done, _n: place_ready(done, wait=False))
    seq.prior.clear()  # a plain restore has no prompt prior either (the question's prefill sets it)
    place_ready(engine.model_config.num_layers, wait=True)


def split_pieces(engine: "Engine", layers: list[tuple[int, int]], split: int,
                 per_piece: int) -> list[tuple[int, int, int]]:
    """The pieces to load after recomputing ``split`` tokens: per layer ``(first, pages)`` as
    stored, a global layer's records from page ``split / page_size`` (in pieces of at most
    ``per_piece`` records), a sliding layer's whole ring."""
    ps = engine.config.page_size
    out = []
    for layer, (first, pages) in enumerate(layers):
        if engine.windows[layer] is not None:
            out.append((layer, 0, pages))
            continue
        start = split // ps - first
        out.extend((layer, p0, min(per_piece, pages - p0)) for p0 in range(start, pages, per_piece))
    return out


def ahead_bytes(pieces: list[tuple[int, int, int]], page_bytes: int, num_layers: int) -> int:
    """``AHEAD_BYTES``, or two layers' worth of pieces when a layer's pieces are larger."""
    per_layer = [0] * num_layers
    for layer, _p0, count in pieces:
        per_layer[layer] += count * page_bytes
    return max(AHEAD_BYTES, 2 * max(per_layer, default=0))


def kv_bytes_per_token(engine: "Engine", page_bytes: int) -> float:
    """DocCache bytes a document token costs to load (its global layers' pages)."""
    return page_bytes / engine.config.page_size * len(engine.global_layers)


