"""Cost model, overlap paths, hardware profiles and problem validation (planner/)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner import CostModel, HardwareProfile, LayerSplit, Leg, OverlapModel, PRESET_NAMES, PlanProblem
from planner.cost import staged_step_s
from planner.profile import PROFILE_FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]
GiB, MiB = 2**30, 2**20
OVERLAPS = [OverlapModel(*flags) for flags in itertools.product([False, True], repeat=4)]
BAD_SPLITS = [
    ((0.5, 0.5, 0.5), "add up to 1"),
    ((1.2, -0.2, 0.0), r"must be a fraction"),
    ((0.5, 0.25, 0.25, 0.2, 0.1), r"delegated .* must be <= host"),
]
BAD_PROBLEM_FIELDS = [
    ("num_layers", 0, "num_layers must be an int >= 1"),
    ("num_kv_heads", 3, "must be a multiple of num_kv_heads"),
    ("slack", 1.5, r"slack must be in \(0, 1\]"),
    ("sparse_budget", 0.0, r"sparse_budget must be in \(0, 1\]"),
    ("sparse_fetch", 0.5, r"sparse_fetch must be in \[1, 1 / sparse_budget\]"),
    ("metadata_bytes_per_layer", -1, "metadata_bytes_per_layer must be an int >= 0"),
    ("host_budget_bytes", -1, "host_budget_bytes must be an int >= 0 or None"),
    ("num_layer_groups", 9, "num_layer_groups .* must be <= num_layers"),
]


def tiny_problem(**kw) -> PlanProblem:
    """2 layers, 4 query / 2 KV heads of 8, hidden 32: page = 2*2*16*8*2 = 1024 bytes, 4 pages
    (64 tokens) per layer, K = 4096 bytes per layer; params/layer = 2048 + 1024 + 6144 = 9216."""
    d = dict(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32, intermediate_size=64,
             context_tokens=64, weight_bytes=2_000_000, page_size=16, kv_dtype_bytes=2)
    d.update(kw)
    return PlanProblem(**d)


def round_profile(**kw) -> HardwareProfile:
    """Round numbers: 1 GB/s pinned, 0.5 pageable, disk 0.25 read / 0.125 write, CPU attention
    2 GB/s, device 100 GB/s and 1 GFLOP/s."""
    d = dict(name="round", host_to_device_pinned_gbps=1.0, host_to_device_pageable_gbps=0.5,
             disk_read_gbps_by_extent=((MiB, 0.25),), disk_write_gbps=0.125, cpu_attention_gbps=2.0,
             device_attention_gbps=100.0, device_matmul_tflops=1e-3, cpu_matmul_tflops=1e-3,
             device_free_bytes=GiB, host_free_bytes=GiB, disk_free_bytes=GiB, layer_overhead_s=1e-6)
    d.update(kw)
    return HardwareProfile(**d)


def test_decode_legs_by_hand():
    split = LayerSplit(0.25, 0.5, 0.25, delegated=0.125, recomputed=0.25)
    legs = CostModel(tiny_problem(), round_profile()).decode_legs(split)
    weights = 2 * 9216 / 1e9  # flop-bound: 1e6 bytes / 100 GB/s = 1e-5 s < 1.8432e-5 s
    attention = 4096 * 0.875 / 100e9  # every page but the delegated ones
    recompute = 0.25 * 64 * 2 * 32 * (2 * 2 * 8) / 1e9  # 16 tokens x 2048 flops
    assert legs[Leg.COMPUTE] == pytest.approx(weights + attention + recompute, rel=1e-12)
    assert legs[Leg.CPU_ATTENTION] == pytest.approx(512 / 2e9, rel=1e-12)
    # HOST: 0.125 fetched as K/V (512 B) + 0.25 as activations (1024 B * (32 / 32)) over the
    # pinned link; DISK: 1024 B through the pageable staging buffer.
    assert legs[Leg.HOST_TO_DEVICE] == pytest.approx(1536 / 1e9 + 1024 / 0.5e9, rel=1e-12)
    assert legs[Leg.DISK_READ] == pytest.approx(1024 / 0.25e9, rel=1e-12)
    new_kv = 2 * 2 * 8 * 2  # one token's K/V per layer
    assert legs[Leg.WRITE] == pytest.approx(new_kv * (0.5 / 1e9 + 0.25 / 0.5e9 + 0.25 / 0.125e9), rel=1e-12)
    assert legs[Leg.OVERHEAD] == 1e-6


def test_flexgen_default_adds_disk_to_host_link():
    model = CostModel(tiny_problem(weight_bytes=1000), round_profile(device_matmul_tflops=1.0))
    legs = model.decode_legs(LayerSplit(0.0, 0.5, 0.5))
    io = legs[Leg.HOST_TO_DEVICE] + legs[Leg.DISK_READ]
    assert io > legs[Leg.COMPUTE]
    assert model.layer_s(legs) == pytest.approx(io + legs[Leg.OVERHEAD], rel=1e-12)
    assert model.decode_step_s([LayerSplit(0.0, 0.5, 0.5)] * 2) == pytest.approx(2 * model.layer_s(legs))
    serial = CostModel(model.problem, model.profile, OverlapModel.serial())
    assert serial.layer_s(legs) == pytest.approx(sum(legs.values()), rel=1e-12)


@pytest.mark.parametrize("overlap", OVERLAPS, ids=str)
def test_paths_match_nested_max_and_sum(overlap):
    """The path expansion equals the nested max/sum expression it stands for."""
    legs = {Leg.COMPUTE: 3.0, Leg.CPU_ATTENTION: 5.0, Leg.HOST_TO_DEVICE: 7.0, Leg.DISK_READ: 11.0,
            Leg.WRITE: 13.0, Leg.OVERHEAD: 0.5, Leg.READ_LOSS: 0.25}

    def op(parallel: bool, a: float, b: float) -> float:
        return max(a, b) if parallel else a + b

    io = op(overlap.disk_with_host_link, legs[Leg.HOST_TO_DEVICE], legs[Leg.DISK_READ])
    io = op(overlap.writes_with_reads, io, legs[Leg.WRITE])
    dev = op(overlap.cpu_with_device, legs[Leg.COMPUTE], legs[Leg.CPU_ATTENTION])
    expected = op(overlap.io_with_compute, dev, io) + legs[Leg.OVERHEAD] + legs[Leg.READ_LOSS]
    model = CostModel(tiny_problem(), round_profile(), overlap)
    assert model.layer_s(legs) == expected


def test_cpu_only_profile_serialises_cpu_attention():
    cpu = HardwareProfile.preset("cpu-2core")
    assert OverlapModel.for_profile(cpu).cpu_with_device is False
    assert OverlapModel.for_profile(HardwareProfile.preset("rtx4090-pcie4")).cpu_with_device is True
    model = CostModel(tiny_problem(), cpu)
    legs = model.decode_legs(LayerSplit(0.0, 1.0, 0.0, delegated=1.0))
    assert model.layer_s(legs) >= legs[Leg.COMPUTE] + legs[Leg.CPU_ATTENTION]
    # Nothing crosses a link on a CPU-only machine: HOST and staged DISK pages are read in place.
    assert model.decode_legs(LayerSplit(0.0, 0.5, 0.5))[Leg.HOST_TO_DEVICE] == 0.0


@pytest.mark.parametrize("num_heads,num_kv_heads", [(8, 8), (8, 4), (8, 2)])
def test_recompute_ships_group_size_over_two_of_the_bytes(num_heads, num_kv_heads):
    """Activations are hidden = heads * head_dim per token, K/V 2 * kv_heads * head_dim."""
    p = tiny_problem(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=num_heads * 8)
    model = CostModel(p, round_profile())
    fetched = model.decode_legs(LayerSplit(0.0, 1.0, 0.0))
    recomputed = model.decode_legs(LayerSplit(0.0, 1.0, 0.0, recomputed=1.0))
    ratio = recomputed[Leg.HOST_TO_DEVICE] / fetched[Leg.HOST_TO_DEVICE]
    assert ratio == pytest.approx((num_heads // num_kv_heads) / 2, rel=1e-12)
    assert recomputed[Leg.COMPUTE] > fetched[Leg.COMPUTE]


def test_sparse_budget_scales_reads():
    split = LayerSplit(0.2, 0.4, 0.4, delegated=0.2)
    dense = CostModel(tiny_problem(), round_profile()).decode_legs(split)
    sparse = CostModel(tiny_problem(sparse_budget=0.25), round_profile()).decode_legs(split)
    for leg in (Leg.CPU_ATTENTION, Leg.HOST_TO_DEVICE, Leg.DISK_READ):
        assert sparse[leg] == pytest.approx(dense[leg] / 4, rel=1e-12)


def test_a_pool_read_ahead_moves_more_than_it_attends():
    """sparse_fetch scales what crosses from HOST and DISK (and the DISK chunks), not the
    attention; key bounds are held on DEVICE beside the weights."""
    split = LayerSplit(0.2, 0.4, 0.4, delegated=0.2)
    attended = CostModel(tiny_problem(sparse_budget=0.25), round_profile()).decode_legs(split)
    pooled = CostModel(tiny_problem(sparse_budget=0.25, sparse_fetch=1.5), round_profile()).decode_legs(split)
    for leg in (Leg.HOST_TO_DEVICE, Leg.DISK_READ):
        assert pooled[leg] == pytest.approx(attended[leg] * 1.5, rel=1e-12)
    for leg in (Leg.COMPUTE, Leg.CPU_ATTENTION):
        assert pooled[leg] == attended[leg]
    p = tiny_problem(sparse_budget=0.25, metadata_bytes_per_layer=64)
    assert p.device_fixed_bytes == tiny_problem().device_fixed_bytes + 2 * 64


def test_prefill_by_hand():
    p = tiny_problem(context_tokens=64)
    legs = CostModel(p, round_profile()).prefill_legs(LayerSplit(0.5, 0.25, 0.25))
    matmul = 2 * 9216 * 64 / 1e9
    attention = 2 * 64 * 64 * 4 * 8 / 1e9  # causal QK^T + PV for 4 heads of 8
    assert legs[Leg.COMPUTE] == pytest.approx(matmul + attention, rel=1e-12)
    assert legs[Leg.WRITE] == pytest.approx(1024 / 1e9 + 1024 / 0.5e9 + 1024 / 0.125e9, rel=1e-12)
    assert legs[Leg.HOST_TO_DEVICE] == legs[Leg.DISK_READ] == 0.0


def test_breakdown_names_the_largest_leg_of_the_critical_path():
    model = CostModel(tiny_problem(), round_profile())
    b = model.decode_breakdown([LayerSplit(0.0, 0.0, 1.0)] * 2)
    assert b.bottleneck == Leg.DISK_READ
    assert b.critical_path == (Leg.HOST_TO_DEVICE, Leg.DISK_READ, Leg.OVERHEAD)
    assert b.leg_s[Leg.DISK_READ] == pytest.approx(2 * 4096 / 0.25e9)


def _legs(compute: float = 0.0, disk: float = 0.0, loss: float = 0.0) -> dict:
    legs = dict.fromkeys(Leg, 0.0)
    legs.update({Leg.COMPUTE: compute, Leg.DISK_READ: disk, Leg.READ_LOSS: loss})
    return legs


@pytest.mark.parametrize("buffers, expected", [(1, 4.0), (2, 3.0), (3, 3.0)])
def test_staged_step_by_hand(buffers, expected):
    """Layers 0 and 1 compute 1 s each; layer 2 computes 1 s over 3 DISK chunks of 1 s.
    Chunks are read from the step's start, in order, and free their buffer once read and
    their layer has begun (t = 2). buffers=1: chunk 0 read 0-1, freed at 2; chunk 1 read 2-3;
    chunk 2 read 3-4: layer 2 ends at 4. buffers=2: chunks 0, 1 read 0-2; chunk 2 waits for
    chunk 0's buffer (freed at 2), read 2-3; layer 2 ends at max(2 + 1, 3) = 3. FlexGen's
    per-layer max charges 1 + 1 + max(1, 3) = 5."""
    model = CostModel(tiny_problem(), round_profile())
    per_layer = [_legs(1.0), _legs(1.0), _legs(1.0, 3.0)]
    assert staged_step_s(model, per_layer, [0, 0, 3], buffers) == pytest.approx(expected)
    assert sum(model.layer_s(legs) for legs in per_layer) == pytest.approx(5.0)


def test_staged_step_adds_read_interference_after_the_wait():
    """The read loss is serial even in a layer that waits for the disk: 3 s + 0.5 s."""
    model = CostModel(tiny_problem(), round_profile())
    per_layer = [_legs(1.0), _legs(1.0), _legs(1.0, 3.0, 0.5)]
    assert staged_step_s(model, per_layer, [0, 0, 3], 2) == pytest.approx(3.5)
    per_layer[0][Leg.READ_LOSS] = 0.25  # and in a compute-bound layer: 1.25 s, shifting the rest
    assert staged_step_s(model, per_layer, [0, 0, 3], 2) == pytest.approx(3.75)


def test_staged_step_waits_for_the_tail_after_the_last_chunk():
    """What follows the last chunk (its attention, the in-place pages, the MLP) cannot overlap
    the reads: layer 2 ends at max(2 + 1, 3 + 0.5) = 3.5 with two buffers; a layer without
    DISK chunks ignores its tail."""
    model = CostModel(tiny_problem(), round_profile())
    per_layer = [_legs(1.0), _legs(1.0), _legs(1.0, 3.0)]
    assert staged_step_s(model, per_layer, [0, 0, 3], 2, [0.0, 0.0, 0.5]) == pytest.approx(3.5)
    assert staged_step_s(model, per_layer, [0, 0, 3], 2, [5.0, 5.0, 0.0]) == pytest.approx(3.0)


def test_decode_tail_by_hand():
    """tiny_problem: post-attention weights o (32 x 32) + MLP (3 x 32 x 64) of 9216 params;
    the layer's weights take 2 * 9216 flops / 1 GFLOP/s (flop-bound); attended after the last
    chunk: the 3/4 of K on DEVICE and HOST plus one of two chunks' quarter-of-K on DISK."""
    model = CostModel(tiny_problem(), round_profile())
    weights = 2 * 9216 / 1e9 * (32 * 32 + 3 * 32 * 64) / 9216
    split = LayerSplit(0.5, 0.25, 0.25)
    assert model.decode_tail_s(split, 2) == pytest.approx(weights + 4096 * (0.75 + 0.125) / 100e9, rel=1e-12)
    assert model.decode_tail_s(LayerSplit(1.0, 0.0, 0.0), 0) == 0.0


def test_read_loss_leg_by_hand_and_in_the_step():
    """K = 4096 bytes per layer, a quarter on DISK: 1024 bytes read, 0.5 s per GB lost."""
    hw = round_profile(read_interference_s_per_gb=0.5)
    legs = CostModel(tiny_problem(), hw).decode_legs(LayerSplit(0.5, 0.25, 0.25))
    assert legs[Leg.READ_LOSS] == pytest.approx(1024 * 0.5 / 1e9, rel=1e-12)
    assert CostModel(tiny_problem(), hw).decode_legs(LayerSplit(0.5, 0.5, 0.0))[Leg.READ_LOSS] == 0.0
    splits = [LayerSplit(0.0, 0.0, 1.0)] * 2
    without = CostModel(tiny_problem(), round_profile()).decode_step_s(splits)
    assert CostModel(tiny_problem(), hw).decode_step_s(splits) == pytest.approx(without + 2 * 4096 * 0.5 / 1e9)


def test_staging_buffers_price_whole_page_plans_with_the_read_ahead():
    """With staging buffers the step is ``staged_step_s`` of the per-layer legs (DISK chunks =
    ceil(disk pages / pages per extent)); without, the sum of per-layer maxima."""
    hw = round_profile(read_interference_s_per_gb=0.5)
    splits = [LayerSplit(1.0, 0.0, 0.0), LayerSplit(0.0, 0.0, 1.0)]
    flat = CostModel(tiny_problem(disk_extent_bytes=2048), hw)
    staged = CostModel(tiny_problem(disk_extent_bytes=2048, staging_buffers=1), hw)
    per_layer = [flat.decode_legs(s) for s in splits]
    assert flat.decode_step_s(splits) == pytest.approx(sum(flat.layer_s(legs) for legs in per_layer))
    tails = [flat.decode_tail_s(s, n) for s, n in zip(splits, [0, 2])]
    assert staged.decode_step_s(splits) == pytest.approx(staged_step_s(flat, per_layer, [0, 2], 1, tails))
    assert staged.decode_step_s(splits) < flat.decode_step_s(splits)  # layer 1's reads start during layer 0


@pytest.mark.parametrize("fractions,match", BAD_SPLITS)
def test_bad_split_rejected(fractions, match):
    with pytest.raises(ValueError, match=match):
        LayerSplit(*fractions)


def test_wrong_number_of_splits_rejected():
    with pytest.raises(ValueError, match="one LayerSplit per layer"):
        CostModel(tiny_problem(), round_profile()).decode_step_s([LayerSplit(1.0, 0.0, 0.0)])


@pytest.mark.parametrize("field,value,match", BAD_PROBLEM_FIELDS)
def test_bad_problem_rejected(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_problem(**{field: value, **({"num_layers": 2} if field == "num_layer_groups" else {})})


def test_llama_8b_kv_size():
    p = PlanProblem(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096,
                    intermediate_size=14336, context_tokens=131072, weight_bytes=0)
    assert p.page_bytes == 2 * 8 * 32 * 128 * 2
    assert p.kv_bytes == 16 * GiB
    assert p.group_size == 4


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_json_round_trip(name):
    profile = HardwareProfile.preset(name)
    text = profile.to_json()
    assert json.loads(text)["format_version"] == PROFILE_FORMAT_VERSION
    assert HardwareProfile.from_json(text) == profile


@pytest.mark.parametrize("name", [n for n in PRESET_NAMES if n != "cpu-2core"])
def test_gpu_presets_document_their_sources(name):
    from planner import profile as mod

    doc = " ".join(getattr(mod, "_" + name.replace("-", "_")).__doc__.split())
    assert "typical published figures" in doc
    assert "GB/s" in doc


def test_4bit_pages_cost_their_bytes_at_the_4bit_kernels_rate():
    """A 4-bit page of the tiny problem: 320 stored bytes for 1024 exact. Unmeasured, its
    attention takes the exact page's time (dequantization priced as the exact kernel); measured,
    its stored bytes over the 4-bit rate; reads move the stored bytes either way."""
    split = LayerSplit(0.5, 0.25, 0.25, delegated=0.25)
    exact = CostModel(tiny_problem(), round_profile()).decode_legs(split)
    packed_problem = tiny_problem(packed_page_bytes=320)
    assert packed_problem.exact_page_bytes == 1024 and packed_problem.page_bytes == 320
    unmeasured = CostModel(packed_problem, round_profile()).decode_legs(split)
    assert unmeasured[Leg.COMPUTE] == pytest.approx(exact[Leg.COMPUTE], rel=1e-12)
    assert unmeasured[Leg.CPU_ATTENTION] == pytest.approx(exact[Leg.CPU_ATTENTION], rel=1e-12)
    assert unmeasured[Leg.DISK_READ] == pytest.approx(exact[Leg.DISK_READ] * 320 / 1024, rel=1e-12)
    measured = CostModel(packed_problem, round_profile(device_attention_4bit_gbps=10.0,
                                                       cpu_attention_4bit_gbps=0.5)).decode_legs(split)
    weights = 2 * 9216 / 1e9
    stored = 4 * 320  # the layer's four pages as stored
    assert measured[Leg.COMPUTE] == pytest.approx(weights + stored * 0.75 / 10e9, rel=1e-12)
    assert measured[Leg.CPU_ATTENTION] == pytest.approx(stored * 0.25 / 0.5e9, rel=1e-12)
    with pytest.raises(ValueError, match="cpu_attention_4bit_gbps must be a finite number > 0 or None"):
        round_profile(cpu_attention_4bit_gbps=0.0)


def test_a_profile_saved_before_the_4bit_rates_loads_without_them():
    d = HardwareProfile.preset("cpu-2core").to_dict()
    for key in ("cpu_attention_4bit_gbps", "device_attention_4bit_gbps"):
        del d[key]
    old = HardwareProfile.from_dict(d)
    assert old.cpu_attention_4bit_gbps is None and old.attention_4bit_gbps(device=False, stored_ratio=0.25) == (
        old.cpu_attention_gbps * 0.25)


def test_profile_json_errors():
    d = HardwareProfile.preset("cpu-2core").to_dict()
    with pytest.raises(ValueError, match="format_version is 0"):
        HardwareProfile.from_dict({**d, "format_version": 0})
    with pytest.raises(ValueError, match=r"unknown \['bogus'\]"):
        HardwareProfile.from_dict({**d, "bogus": 1})
    with pytest.raises(ValueError, match="not JSON"):
        HardwareProfile.from_json("{")
    with pytest.raises(ValueError, match="unknown hardware preset 'nope'"):
        HardwareProfile.preset("nope")


@pytest.mark.parametrize("change,match", [
    ({"host_to_device_pinned_gbps": 0.0}, "host_to_device_pinned_gbps must be a finite number > 0"),
    ({"disk_read_gbps_by_extent": ((MiB, 1.0), (MiB, 2.0))}, "strictly increasing"),
    ({"disk_read_gbps_by_extent": ()}, "is empty"),
    ({"host_free_bytes": -1}, "host_free_bytes must be an int >= 0"),
])
def test_bad_profile_rejected(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(HardwareProfile.preset("cpu-2core"), **change)


def test_disk_bandwidth_by_extent():
    p = round_profile(disk_read_gbps_by_extent=((64 * 2**10, 1.0), (4 * MiB, 4.0)))
    assert p.disk_read_gbps(4096) == 1.0 and p.disk_read_gbps(64 * MiB) == 4.0
    assert p.disk_read_gbps(512 * 2**10) == pytest.approx(2.5)  # halfway in log2 (16 -> 19 -> 22)
    values = [p.disk_read_gbps(2**k) for k in range(12, 27)]
    assert values == sorted(values)


def test_planner_imports_without_torch_or_runtime():
    code = ("import sys\n"
            "for name in ('torch', 'offload', 'storage', 'gpu_kernels', 'cpu_kernels'): sys.modules[name] = None\n"
            "import planner\n"
            "p = planner.PlanProblem(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, hidden_size=32,\n"
            "    intermediate_size=64, context_tokens=4096, weight_bytes=10**6, device_budget_bytes=4 * 2**20)\n"
            "print(planner.plan(p, planner.HardwareProfile.preset('cpu-2core')).decode_step_s > 0)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
