"""The breakdown by piece (``offload.tuning.pieces``): exclusive times of nested pieces, wrappers
gone after the pass, tokens unchanged under the clock, every piece of a decode step named."""
from __future__ import annotations

import time

import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.kv.placement import Placement
from offload.model.model_source import ModelSource
from offload.tuning import engine_probe
from offload.tuning.pieces import (OTHER, PieceClock, decode_breakdown, format_breakdown, matvec_rates,
                                   memory_read_gbps, prefill_breakdown, step_breakdown, timed_pieces)


def _engine(tmp_path, **kw) -> Engine:
    cfg = engine_probe.tiny_model_config()
    return Engine(ModelSource("tiny-llama", cfg, None, None),
                  RuntimeConfig(device="cpu", kv_dir=str(tmp_path / "kv"), **kw))


def test_clock_charges_a_piece_only_its_own_time():
    clock = PieceClock(lambda: None)
    inner = clock.wrap("inner", lambda: time.sleep(0.02))

    def outer_body() -> None:
        time.sleep(0.01)
        inner()

    outer = clock.wrap("outer", outer_body)
    outer()
    s = clock.take()
    assert 0.019 <= s["inner"] < 0.05
    assert 0.009 <= s["outer"] < 0.02  # the inner 20 ms are not charged to it
    assert clock.take() == {}


def _greedy_fork(engine: Engine, seq, steps: int = 4) -> list[int]:
    """Greedy tokens of a fork of ``seq`` decoded from token 7 (the fork is released)."""
    fork = engine.fork(seq)
    out, tok = [], 7
    for _ in range(steps):
        tok = int(torch.argmax(engine.decode_step(fork, tok)[-1]))
        out.append(tok)
    engine.release(fork)
    return out


def test_pass_leaves_no_wrapper_and_tokens_unchanged(tmp_path):
    engine = _engine(tmp_path)
    seq = engine.new_sequence()
    engine.prefill(seq, [i % 256 for i in range(300)])
    want = _greedy_fork(engine, seq)
    attention = engine.decode_attention
    with timed_pieces(engine):
        assert "qkv" in vars(engine.runner) and engine.decode_attention is not attention
        got = _greedy_fork(engine, seq)
    assert got == want
    assert engine.decode_attention is attention
    for owner in (engine.runner, engine.kv, engine.kv.reader, engine.decode_attention, engine):
        assert not any(getattr(v, "__name__", "") == "timed" for v in vars(owner).values())


def test_decode_breakdown_names_the_pieces_of_a_spilled_step(tmp_path):
    engine = _engine(tmp_path, placement=Placement(device_pages=2, host_pages=3), host_memory_bytes=2**25)
    seq = engine.new_sequence()
    engine.prefill(seq, [i % 256 for i in range(44 * 32 + 8)])
    d = decode_breakdown(engine, seq, 5, steps=3)
    pieces = d["pieces_s"]
    for name in ("norm + q/k/v projections + RoPE", "MLP (norm, gate/up, down)", "o_proj + residual",
                 "final norm + LM head", "page writes (K/V, key bounds)", "read sets and selection",
                 "attention kernel: pages in RAM (Numba)", "attention: merge and glue", OTHER):
        assert name in pieces, name
    assert all(v >= 0 for v in pieces.values())
    # Each step's pieces and OTHER add up to it; medians of pieces over steps need not add up
    # to the median step (a busy machine spreads the steps), but they stay of its size.
    assert 0.3 * d["step_s"] < sum(pieces.values()) < 3.0 * d["step_s"]
    assert d["layers"] == 4 and d["steps"] == 3
    assert seq.num_tokens == 44 * 32 + 8  # the fork was decoded, not the prompt


def test_step_breakdown_prefill_roofline_and_lines(tmp_path):
    engine = _engine(tmp_path)
    seq = engine.new_sequence()
    ids = [i % 256 for i in range(200)]
    engine.prefill(seq, ids)
    b = step_breakdown(engine, seq, 3, ids, kv_bytes_per_step=10_000, steps=2)
    p = b["prefill"]
    assert p["tokens"] == 200 and p["layers"] == 4
    assert "attention (prefill)" in p["layer_pieces_s"]
    assert abs(sum(p["layer_pieces_s"].values()) * 4 - p["prefill_s"]) < 1e-6 + 0.01 * p["prefill_s"]
    assert b["memory_read_gbps"] > 0
    assert b["roofline_s"] == (b["weights_bytes"] + 10_000) / b["memory_read_gbps"] / 1e9
    lines = format_breakdown(b)
    assert b["matvec"]["linear_gbps"] > 0 and b["matvec"]["torch_gbps"] > 0  # fp32 on a CPU: the row kernel
    assert lines[0].startswith("where the time goes") and "roofline" in lines[2]
    assert "row kernel" in lines[3] and "prefill layer" in lines[4]
    assert seq.num_tokens == 200


def test_prefill_breakdown_releases_its_sequence(tmp_path):
    engine = _engine(tmp_path)
    used = engine.kv.arena.num_used
    b = prefill_breakdown(engine, [1, 2, 3, 4, 5] * 20)
    assert b["prefill_s"] > 0
    assert engine.kv.arena.num_used == used


def test_matvec_rates_without_the_row_kernel_name_torch_only(tmp_path):
    engine = _engine(tmp_path, matvec_kernel="torch")
    assert engine.runner.linear is torch.nn.functional.linear
    m = matvec_rates(engine.runner, repeats=2)
    assert m["linear_gbps"] is None and m["torch_gbps"] > 0


def test_memory_read_probe_reports_a_positive_rate():
    assert memory_read_gbps(torch.device("cpu"), mib=8, repeats=3) > 0
