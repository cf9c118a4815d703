"""The greedy rule fills layer by layer; attention pieces (HOST, DISK chunks) cost their fixed
overhead exactly in whole-page plans and linearly in the LP."""
from __future__ import annotations

import dataclasses

import pytest

from planner import CostModel, HardwareProfile, LayerSplit, Leg, PlanProblem, Tier, greedy_plan, plan
from tests.planner.test_cost import round_profile

MiB = 2**20


def cpu_problem(**kw) -> PlanProblem:
    """A SmolLM2-like shape (30 layers, 9/3 heads of 64, fp32 pages of 32 tokens = 48 KiB),
    64 pages per layer, rooms in pages given as budgets (slack 1, no weights on DEVICE)."""
    d = dict(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576, intermediate_size=1536,
             context_tokens=64 * 32, weight_bytes=0, page_size=32, kv_dtype_bytes=4, slack=1.0,
             disk_extent_bytes=16 * 49152, allow_delegation=False)
    d.update(kw)
    return PlanProblem(**d)


def cpu_profile(**kw) -> HardwareProfile:
    d = dict(name="cpu", host_to_device_pinned_gbps=20.0, host_to_device_pageable_gbps=20.0,
             disk_read_gbps_by_extent=((MiB, 2.0),), disk_write_gbps=2.0, cpu_attention_gbps=30.0,
             device_attention_gbps=30.0, device_matmul_tflops=0.2, cpu_matmul_tflops=0.2, device_free_bytes=0,
             host_free_bytes=0, disk_free_bytes=0, device_is_host=True, layer_overhead_s=2e-4,
             weights_gbps=20.0)
    d.update(kw)
    return HardwareProfile(**d)


def _rooms(problem: PlanProblem, device: int, host: int, disk: int) -> PlanProblem:
    b = problem.page_bytes
    return dataclasses.replace(problem, device_budget_bytes=device * b, host_budget_bytes=host * b,
                               disk_budget_bytes=disk * b)


def test_greedy_fills_layer_by_layer():
    problem = _rooms(cpu_problem(), device=64 * 10 + 5, host=64 * 5, disk=10**6)
    g = greedy_plan(problem, cpu_profile())
    assert g.device_pages[:10] == (64,) * 10 and g.device_pages[10] == 5 and sum(g.device_pages[11:]) == 0
    assert g.host_pages[10] == 59 and g.host_pages[15] == 5 and g.disk_pages[15] == 59
    assert g.disk_pages[16:] == (64,) * 14 and g.method == "greedy"


def test_pieces_are_exact_in_whole_page_plans_and_linear_in_the_lp():
    problem = cpu_problem()
    hw = cpu_profile(piece_overhead_s=1e-4)
    model = CostModel(problem, hw)
    extent = problem.pages_per_extent
    assert extent == 16
    split = LayerSplit.from_pages(20, 10, 34)  # HOST: one piece; 34 DISK pages: 3 chunks of <= 16
    assert model.decode_legs(split)[Leg.OVERHEAD] == pytest.approx(2e-4 + 4 * 1e-4)
    assert model.decode_legs_raw(*split.as_tuple())[Leg.OVERHEAD] == pytest.approx(2e-4 + 34 / 16 * 1e-4)
    assert model.decode_legs(LayerSplit.from_pages(64, 0, 0))[Leg.OVERHEAD] == pytest.approx(2e-4)


@pytest.mark.parametrize("piece_s", [0.0, 2e-3])
def test_lp_weighs_pieces_against_overlap(piece_s):
    """DISK reads that fit behind compute are spread by the LP when pieces are free; when each
    piece costs more than a layer's compute, whole-layer concentration (the greedy split) wins."""
    problem = _rooms(cpu_problem(), device=64 * 20, host=0, disk=10**6)
    hw = cpu_profile(piece_overhead_s=piece_s)
    p, g = plan(problem, hw), greedy_plan(problem, hw)
    assert p.decode_step_s <= g.decode_step_s * (1 + 1e-12)
    assert sum(p.disk_pages) == 64 * 10 and p.tier_bytes[Tier.DISK] == g.tier_bytes[Tier.DISK]
    if piece_s == 0:
        assert max(p.disk_pages) - min(p.disk_pages) <= 1 and p.decode_step_s < g.decode_step_s
    else:
        assert sum(1 for d in p.disk_pages if d) <= 10  # DISK pages packed into whole layers


def test_pieces_round_trip_and_validation():
    hw = cpu_profile(piece_overhead_s=1.5e-4)
    assert HardwareProfile.from_json(hw.to_json()) == hw
    with pytest.raises(ValueError, match="piece_overhead_s must be >= 0"):
        cpu_profile(piece_overhead_s=-1.0)
    old = {k: v for k, v in round_profile().to_dict().items() if k != "piece_overhead_s"}
    assert HardwareProfile.from_dict(old).piece_overhead_s == 0.0  # profiles saved before it read as 0


def test_staged_reads_run_ahead_across_layers():
    """Reads that the per-layer model charges to the last layers are hidden behind earlier
    layers when staging buffers let them run ahead; the step never beats the total compute or
    the total read time, and more buffers never make it slower."""
    problem = _rooms(cpu_problem(), device=64 * 24, host=0, disk=10**6)
    hw = cpu_profile()
    g = greedy_plan(problem, hw)  # layers 24..29 all on DISK
    per_layer = CostModel(problem, hw).decode_step_s(g.splits())
    model = CostModel(problem, hw)
    legs = [model.decode_legs(s) for s in g.splits()]
    compute = sum(model.layer_s({**lg, Leg.DISK_READ: 0.0}) for lg in legs)
    disk = sum(lg[Leg.DISK_READ] for lg in legs)
    steps = []
    for buffers in (1, 2, 4, 16, 64):
        staged = CostModel(dataclasses.replace(problem, staging_buffers=buffers), hw).decode_step_s(g.splits())
        assert staged >= max(compute, disk) * (1 - 1e-12)
        steps.append(staged)
    assert all(a >= b - 1e-15 for a, b in zip(steps, steps[1:]))
    assert steps[-1] < per_layer and steps[0] <= per_layer * (1 + 1e-12)
    with pytest.raises(ValueError, match="staging_buffers must be an int >= 0"):
        dataclasses.replace(problem, staging_buffers=-1)
