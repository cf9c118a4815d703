"""Where a decode step and a prefill layer spend their time, piece by piece (``offload bench``).

A ``PieceClock`` wraps the engine's pieces for the length of one profiled pass: the runner's
embedding, q/k/v projections (with their norm and RoPE), o_proj, MLP and LM head, the page
writes, the read sets, the attention kernels and the merge around them. Each wrapper times
its call (on CUDA after a synchronize on both sides, so a piece's queued kernels count where
they were queued); a piece that calls another wrapped one is charged only its own time, and
what no piece claims is the engine's Python between pieces (``other``). The wrappers live on
the instances (``runner.qkv = timed``) and are removed when the pass ends, so the timed rows of
the bench never run through them; on the CPU a wrapper costs a few microseconds per call.

The roofline beside the breakdown is the step's bytes (weights read once, K/V read as the
counters saw) over a memory-read probe of the same run: the fraction says how far the step
is from being bound by memory alone.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from offload.model.matvec import weight_matrices
from offload.tuning.profile_probes import device_sync, median_seconds

__all__ = ["PieceClock", "timed_pieces", "decode_breakdown", "prefill_breakdown", "memory_read_gbps", "matvec_rates",
           "step_breakdown", "format_breakdown", "OTHER"]

OTHER = "other (Python between pieces)"

# (owner attribute path, method, piece name); owners missing on an engine are skipped.
_RUNNER_PIECES = (("embed", "embed"), ("qkv", "norm + q/k/v projections + RoPE"), ("attn_out", "o_proj + residual"),
                  ("mlp", "MLP (norm, gate/up, down)"), ("logits", "final norm + LM head"))
_ATTENTION_KERNELS = (("_numba_pages", "attention kernel: pages in RAM (Numba)"),
                      ("_numba_arena", "attention kernel: staged DISK chunk (Numba)"),
                      ("_packed_pages", "attention kernel: 4-bit pages"),
                      ("_group_partial", "attention kernel: gathered groups"),
                      ("_triton_pages", "attention kernel: DEVICE pages (Triton)"))
_ENGINE_PIECES = (("step_reads", "read sets and selection"), ("_reads_with_query", "read sets and selection"),
                  ("_speculated_reads", "read sets and selection"))


class PieceClock:
    """Exclusive wall time per named piece, over the calls made while it is installed."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._inner: list[float] = []  # time claimed by wrapped calls inside each open call

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            self.sync()
            t0 = time.perf_counter()
            self._inner.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                dt = time.perf_counter() - t0
                inner = self._inner.pop()
                self.seconds[name] += dt - inner
                self.calls[name] += 1
                if self._inner:
                    self._inner[-1] += dt
        return timed

    def take(self) -> dict[str, float]:
        """The seconds per piece so far, and a fresh start."""
        out = dict(self.seconds)
        self.seconds.clear()
        self.calls.clear()
        return out


class _TimedCall:
    """A callable object (the attention modules) timed as one piece; its attributes pass through."""

    def __init__(self, clock: PieceClock, name: str, target: Any) -> None:
        self._target = target
        self._call = clock.wrap(name, target.__call__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._call(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


@contextlib.contextmanager
def timed_pieces(engine: Any) -> Iterator[PieceClock]:
    """Install a ``PieceClock`` on ``engine``'s pieces for the ``with`` block; removed after."""
    clock = PieceClock(device_sync(engine.device))
    patched: list[tuple[Any, str]] = []

    def patch(owner: Any, attr: str, name: str) -> None:
        if hasattr(owner, attr) and attr not in vars(owner):
            setattr(owner, attr, clock.wrap(name, getattr(owner, attr)))
            patched.append((owner, attr))

    for attr, name in _RUNNER_PIECES:
        patch(engine.runner, attr, name)
    for attr, name in _ATTENTION_KERNELS:
        patch(engine.decode_attention, attr, name)
    for attr, name in _ENGINE_PIECES:
        patch(engine, attr, name)
    patch(engine.kv, "append", "page writes (K/V, key bounds)")
    patch(engine.kv, "prepare_decode", "page moves before the step")
    patch(engine.kv.reader, "groups", "gather / unpack of pieces")
    objects = {"decode_attention": "attention: merge and glue", "prefill_attention": "attention (prefill)"}
    saved = {attr: getattr(engine, attr) for attr in objects}
    try:
        for attr, name in objects.items():
            setattr(engine, attr, _TimedCall(clock, name, saved[attr]))
        yield clock
    finally:
        for attr, obj in saved.items():
            setattr(engine, attr, obj)
        for owner, attr in patched:
            delattr(owner, attr)


def _split(pieces: dict[str, float], total: float) -> dict[str, float]:
    """Pieces plus ``OTHER`` (what the total leaves, never below 0), in seconds."""
    out = dict(pieces)
    out[OTHER] = max(0.0, total - sum(pieces.values()))
    return out


def decode_breakdown(engine: Any, seq: Any, token: int, steps: int = 8) -> dict[str, Any]:
    """Decode ``steps`` tokens on a fork of ``seq`` (released after) under the clock: the
    median step and, per piece, the median of its seconds per step (their sum can differ from
    the median step by the spread between steps)."""
    fork = engine.fork(seq)
    per_step: list[dict[str, float]] = []
    totals: list[float] = []
    try:
        with timed_pieces(engine) as clock:
            engine.decode_step(fork, token)  # the fork's first step copies its tail pages: untimed
            clock.take()
            for i in range(steps):
                engine.sync()
                t0 = time.perf_counter()
                logits = engine.decode_step(fork, token)
                engine.sync()
                totals.append(time.perf_counter() - t0)
                per_step.append(_split(clock.take(), totals[-1]))
                token = int(torch.argmax(logits[-1]))
    finally:
        engine.release(fork)
    names = list(dict.fromkeys(n for d in per_step for n in d))
    pieces = {n: statistics.median(d.get(n, 0.0) for d in per_step) for n in names}
    return {"step_s": statistics.median(totals), "steps": steps, "pieces_s": pieces,
            "layers": engine.model_config.num_layers}


def prefill_breakdown(engine: Any, ids: list[int]) -> dict[str, Any]:
    """One prefill of ``ids`` on a fresh sequence (released after) under the clock: the whole
    prefill and, per piece, its seconds per layer."""
    seq = engine.new_sequence()
    layers = engine.model_config.num_layers
    try:
        with timed_pieces(engine) as clock:
            engine.sync()
            t0 = time.perf_counter()
            engine.prefill(seq, ids)
            engine.sync()
            total = time.perf_counter() - t0
            pieces = _split(clock.take(), total)
    finally:
        engine.release(seq)
    return {"prefill_s": total, "tokens": len(ids), "layers": layers,
            "layer_pieces_s": {n: s / layers for n, s in pieces.items()}}


def memory_read_gbps(device: torch.device, *, mib: int = 256, repeats: int = 5) -> float:
    """Read bandwidth of a reduction over ``mib`` MiB of fp32 on ``device`` (torch's threads on
    the CPU, the same the decode's matrix-vector products use): median of ``repeats``."""
    x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    return x.numel() * 4 / median_seconds(x.sum, repeats, sync=device_sync(device)) / 1e9


def matvec_rates(runner: Any, *, repeats: int = 3) -> dict[str, float | None]:
    """Weight bytes/s of one token through every matrix of ``runner`` (its layers and LM head),
    with the runner's linear function and with torch's ``F.linear``, alternated: medians of
    ``repeats``. ``linear_gbps`` is None when the runner's function is ``F.linear`` itself."""
    matrices = weight_matrices(runner)
    inputs = {w.shape[1]: torch.randn(1, w.shape[1], dtype=w.dtype, device=w.device) for w in matrices}
    nbytes = sum(w.numel() * w.element_size() for w in matrices)
    sync = device_sync(runner.device)
    ours = None if runner.linear is F.linear else runner.linear
    times: dict[str, list[float]] = {"linear": [], "torch": []}
    for rep in range(repeats + 1):  # the first pass of each is a warm-up
        for name, fn in (("linear", ours), ("torch", F.linear)):
            if fn is None:
                continue
            t0 = time.perf_counter()
            for w in matrices:
                fn(inputs[w.shape[1]], w)
            sync()
            if rep:
                times[name].append(time.perf_counter() - t0)
    return {f"{name}_gbps": (nbytes / statistics.median(ts) / 1e9 if ts else None) for name, ts in times.items()}


def step_breakdown(engine: Any, seq: Any, token: int, ids: list[int], kv_bytes_per_step: int, *,
                   steps: int = 8) -> dict[str, Any]:
    """The bench's breakdown: ``decode_breakdown`` on ``seq`` (a prefilled prompt) and
    ``prefill_breakdown`` of ``ids``, with the memory-read roofline of the decode step: the
    weights (read once per step) plus ``kv_bytes_per_step`` (what the counters saw a step read)
    over ``memory_read_gbps`` of this run."""
    decode = decode_breakdown(engine, seq, token, steps)
    prefill = prefill_breakdown(engine, ids)
    gbps = memory_read_gbps(engine.device)
    weights = int(engine.runner.weights_bytes)
    roofline_s = (weights + kv_bytes_per_step) / gbps / 1e9
    return {"decode": decode, "prefill": prefill, "memory_read_gbps": gbps, "weights_bytes": weights,
            "matvec": matvec_rates(engine.runner),
            "kv_bytes_per_step": kv_bytes_per_step, "roofline_s": roofline_s,
            "roofline_fraction": roofline_s / decode["step_s"], "prefill_chunk_tokens": engine.prefill_chunk}


def _pieces_line(pieces: dict[str, float]) -> str:
    return " | ".join(f"{n} {s * 1e3:.1f}" for n, s in sorted(pieces.items(), key=lambda kv: -kv[1]))


def _matvec_line(m: dict[str, float | None], probe_gbps: float) -> str:
    torch_part = f"torch's F.linear {m['torch_gbps']:.1f} GB/s"
    if m["linear_gbps"] is None:
        return f"  one token through every weight matrix: {torch_part} (the engine's choice; probe {probe_gbps:.1f})"
    return (f"  one token through every weight matrix: the engine's row kernel {m['linear_gbps']:.1f} GB/s, "
            f"{torch_part} (medians of 3, alternated; read probe {probe_gbps:.1f})")


def format_breakdown(b: dict[str, Any]) -> list[str]:
    """The lines ``offload bench`` prints for ``step_breakdown``'s result."""
    d, p = b["decode"], b["prefill"]
    other = d["pieces_s"].get(OTHER, 0.0)
    return [
        f"where the time goes (all-DEVICE, one more pass with a clock around each piece; ms; decode: medians of "
        f"{d['steps']} steps):",
        f"  decode step {d['step_s'] * 1e3:.1f} ms: {_pieces_line(d['pieces_s'])} "
        f"(other = {other / d['layers'] * 1e3:.2f} ms per layer)",
        f"  memory-read roofline: weights {b['weights_bytes'] / 1e6:.0f} MB + K/V read "
        f"{b['kv_bytes_per_step'] / 1e6:.0f} MB per step / read probe {b['memory_read_gbps']:.1f} GB/s = "
        f"{b['roofline_s'] * 1e3:.1f} ms; the step runs at {b['roofline_fraction']:.0%} of it",
        _matvec_line(b["matvec"], b["memory_read_gbps"]),
        f"  prefill layer {p['prefill_s'] / p['layers'] * 1e3:.0f} ms ({p['tokens']} tokens, chunks of "
        f"{b['prefill_chunk_tokens']}): {_pieces_line(p['layer_pieces_s'])}",
    ]
