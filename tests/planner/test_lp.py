"""LP planner against brute force and the greedy rule; infeasibility; recompute; big shapes."""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re

import numpy as np
import pytest

from planner import (CostModel, HardwareProfile, LayerSplit, OverlapModel, PlanInfeasibleError, PlanProblem, Tier,
                     greedy_plan, plan)

GiB, MiB = 2**30, 2**20
GRID = 8  # pages per layer in brute-force instances: the 1/8 grid is every whole-page split
BRUTE_SEEDS = list(range(40))
RANDOM_SEEDS = list(range(50))
SLOW_SEEDS = list(range(100, 2100))
SLOW_BRUTE_SEEDS = list(range(1000, 1400))
LLAMA_8B = dict(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, hidden_size=4096,
                intermediate_size=14336, weight_bytes=int(8.03e9 * 2))  # bf16 weights: 15.0 GiB
LLAMA_2_7B_LIKE = dict(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, hidden_size=4096,
                       intermediate_size=11008, weight_bytes=int(6.74e9 * 2))
GQA_SHAPES = [dict(LLAMA_8B), dict(LLAMA_8B, num_kv_heads=16)]  # groups 4 and 2


def random_profile(rng: np.random.Generator) -> HardwareProfile:
    def lu(lo: float, hi: float) -> float:  # log-uniform
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    return HardwareProfile(
        name="random", host_to_device_pinned_gbps=lu(1, 60), host_to_device_pageable_gbps=lu(0.5, 30),
        disk_read_gbps_by_extent=((64 * 2**10, lu(0.2, 3)), (4 * MiB, lu(3, 12))), disk_write_gbps=lu(0.3, 8),
        cpu_attention_gbps=lu(5, 200), device_attention_gbps=lu(20, 3000), device_matmul_tflops=lu(1, 1000),
        cpu_matmul_tflops=lu(0.05, 5), device_free_bytes=GiB, host_free_bytes=GiB, disk_free_bytes=GiB,
        device_is_host=bool(rng.integers(2)), layer_overhead_s=lu(1e-7, 1e-4))


def random_problem(rng: np.random.Generator, *, pages: int, num_layers: int) -> PlanProblem:
    """Budgets give each tier a whole number of pages per layer of room (so the capacities
    sit on the brute-force grid), the three together at least the KV size."""
    kv_heads = int(rng.choice([1, 2, 4, 8]))
    heads = kv_heads * int(rng.choice([1, 1, 2, 4]))
    head_dim = int(rng.choice([64, 128]))
    page_size = int(rng.choice([16, 256, 1024]))
    shape = dict(num_layers=num_layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                 hidden_size=heads * head_dim, intermediate_size=int(rng.integers(1, 5)) * heads * head_dim,
                 context_tokens=pages * page_size, page_size=page_size, weight_bytes=int(rng.integers(1, 10**7)),
                 device_working_bytes=int(rng.integers(0, 10**5)), host_staging_bytes=int(rng.integers(0, 10**5)))
    page_bytes = 2 * kv_heads * page_size * head_dim * 2
    room_pages = rng.integers(0, pages + 1, size=3)
    room_pages[int(rng.integers(3))] = pages  # some tier can hold everything
    fixed = [shape["weight_bytes"] + shape["device_working_bytes"], shape["host_staging_bytes"], 0]
    budgets = [math.ceil((f + num_layers * int(k) * page_bytes) / 0.8) for f, k in zip(fixed, room_pages)]
    return PlanProblem(**shape, device_budget_bytes=budgets[0], host_budget_bytes=budgets[1],
                       disk_budget_bytes=budgets[2], allow_delegation=bool(rng.integers(2)),
                       allow_recompute=bool(rng.integers(2)), sparse_budget=float(rng.choice([1.0, 0.5, 0.25])))


def random_overlap(rng: np.random.Generator) -> OverlapModel:
    return OverlapModel(*(bool(b) for b in rng.integers(2, size=4)))


def rooms(problem: PlanProblem, profile: HardwareProfile) -> list[float]:
    """slack * budget - fixed bytes, per tier (written out here, not taken from the planner)."""
    dev, host, disk = (p if p is not None else free for p, free in (
        (problem.device_budget_bytes, profile.device_free_bytes), (problem.host_budget_bytes, profile.host_free_bytes),
        (problem.disk_budget_bytes, profile.disk_free_bytes)))
    return [0.8 * dev - problem.weight_bytes - problem.device_working_bytes,
            0.8 * host - problem.host_staging_bytes, 0.8 * disk]


def brute_force(problem: PlanProblem, profile: HardwareProfile, overlap: OverlapModel) -> float:
    """Fastest decode step over every whole-page split (the same in every layer) that fits."""
    model, n, total = CostModel(problem, profile, overlap), problem.num_layers, problem.pages_per_layer
    room = rooms(problem, profile)
    act = problem.activation_page_bytes
    best = math.inf
    for d, h in itertools.product(range(total + 1), repeat=2):
        if d + h > total:
            continue
        for y in range(h + 1) if problem.allow_delegation else [0]:
            for r in range(h - y + 1) if problem.allow_recompute else [0]:
                stored = [d * problem.page_bytes, (h - r) * problem.page_bytes + r * act,
                          (total - d - h) * problem.page_bytes]
                if any(n * s > rm + 1e-6 for s, rm in zip(stored, room)):
                    continue
                split = LayerSplit(d / total, h / total, (total - d - h) / total, y / total, r / total)
                best = min(best, model.decode_step_s([split] * n))
    return best


def check_plan_invariants(p, problem: PlanProblem, profile: HardwareProfile) -> None:
    room = rooms(problem, profile)
    for dev, host, disk, deleg, rec in zip(p.device_pages, p.host_pages, p.disk_pages, p.delegated_pages,
                                           p.recomputed_pages):
        assert dev + host + disk == problem.pages_per_layer
        assert min(dev, host, disk, deleg, rec) >= 0 and deleg + rec <= host
    assert sum(p.tier_bytes.values()) == problem.kv_bytes
    for t, rm in zip(Tier, room):
        assert p.stored_bytes[t] <= rm + 1e-6
    if not problem.allow_delegation:
        assert sum(p.delegated_pages) == 0
    if not problem.allow_recompute:
        assert sum(p.recomputed_pages) == 0


@pytest.mark.parametrize("seed", BRUTE_SEEDS)
def test_lp_agrees_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    problem = random_problem(rng, pages=GRID, num_layers=int(rng.integers(1, 4)))
    profile, overlap = random_profile(rng), random_overlap(rng)
    best = brute_force(problem, profile, overlap)
    p = plan(problem, profile, overlap=overlap)
    check_plan_invariants(p, problem, profile)
    assert p.lp_step_s <= best * (1 + 1e-5)  # the LP optimum is at least as good as every grid point
    assert p.decode_step_s >= best * (1 - 1e-9)  # whole pages: a grid point, never better than the best
    assert p.decode_step_s == pytest.approx(CostModel(problem, profile, overlap).decode_step_s(p.splits()))


def _lp_vs_greedy(seed: int) -> bool:
    """LP vs greedy on one random instance; False when the greedy rule cannot place it."""
    rng = np.random.default_rng(seed)
    num_layers = int(rng.integers(1, 9))
    problem = dataclasses.replace(random_problem(rng, pages=int(rng.integers(1, 300)), num_layers=num_layers),
                                  num_layer_groups=int(rng.integers(1, min(num_layers, 3) + 1)))
    profile, overlap = random_profile(rng), random_overlap(rng)
    # Half the instances price whole-page plans as the read-ahead runs them (staging buffers,
    # read interference); the LP still minimises the per-layer model.
    staged = bool(rng.integers(2))
    if staged:
        problem = dataclasses.replace(problem, staging_buffers=int(rng.integers(1, 9)))
        profile = dataclasses.replace(profile, read_interference_s_per_gb=float(rng.uniform(0.0, 0.5)))
    p = plan(problem, profile, overlap=overlap)
    check_plan_invariants(p, problem, profile)
    if not staged:
        assert p.lp_step_s <= p.decode_step_s * (1 + 1e-5)  # rounding never beats the LP optimum
    try:
        g = greedy_plan(problem, profile, overlap=overlap)
    except PlanInfeasibleError:
        return False
    if not staged:
        assert p.lp_step_s <= g.decode_step_s * (1 + 1e-5)
    assert p.decode_step_s <= g.decode_step_s * (1 + 1e-12)  # both priced by the same model
    return True


def test_lp_never_worse_than_greedy():
    compared = sum(_lp_vs_greedy(seed) for seed in RANDOM_SEEDS)
    assert compared >= 0.8 * len(RANDOM_SEEDS)


@pytest.mark.slow
def test_lp_never_worse_than_greedy_many():
    compared = sum(_lp_vs_greedy(seed) for seed in SLOW_SEEDS)
    assert compared >= 0.8 * len(SLOW_SEEDS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SLOW_BRUTE_SEEDS)
def test_lp_agrees_with_brute_force_many(seed):
    test_lp_agrees_with_brute_force(seed)


def llama_problem(**kw) -> PlanProblem:
    return PlanProblem(**{**LLAMA_8B, "context_tokens": 131072, **kw})


def test_llama_8b_128k_on_rtx4090():
    problem = llama_problem(device_budget_bytes=24 * GiB, host_budget_bytes=64 * GiB)
    p = plan(problem, HardwareProfile.preset("rtx4090-pcie4"))
    assert p.tier_bytes[Tier.HOST] > 0 and p.tier_bytes[Tier.DEVICE] > 0
    assert sum(p.tier_bytes.values()) == p.kv_bytes == 16 * GiB
    assert any(c.startswith("device capacity") for c in p.binding_constraints)
    assert p.decode_step_s < greedy_plan(problem, HardwareProfile.preset("rtx4090-pcie4")).decode_step_s
    d = json.loads(json.dumps(p.to_dict()))
    assert sum(d["tier_bytes"].values()) == d["kv_bytes"]
    text = p.explain()
    for word in ("Predicted decode step", "bottleneck", "Binding constraints", "device capacity", "host"):
        assert word in text


def test_llama_8b_with_1gib_budgets_names_weights_on_device():
    problem = llama_problem(device_budget_bytes=GiB, host_budget_bytes=GiB, disk_budget_bytes=GiB)
    with pytest.raises(PlanInfeasibleError, match=r"weights 15\.0 GiB > 0\.8 x 1\.0 GiB device") as info:
        plan(problem, HardwareProfile.preset("rtx4090-pcie4"))
    assert isinstance(info.value, ValueError)
    assert any(v.startswith("KV cache 16.0 GiB") for v in info.value.violations)
    with pytest.raises(PlanInfeasibleError, match="weights"):
        greedy_plan(problem, HardwareProfile.preset("rtx4090-pcie4"))


@pytest.mark.parametrize("budgets,match,tier", [
    (dict(device_budget_bytes=GiB), r"device: weights 15\.0 GiB > 0\.8 x 1\.0 GiB device", "device"),
    (dict(host_budget_bytes=GiB, host_staging_bytes=2 * GiB), r"host: staging buffers 2\.0 GiB > 0\.8 x 1\.0 GiB host",
     "host"),
    (dict(host_budget_bytes=GiB, disk_budget_bytes=GiB), r"KV cache 16\.0 GiB > room for KV .* short by", "disk"),
])
def test_infeasible_names_constraint_and_a_budget_that_works(budgets, match, tier):
    problem = llama_problem(**{"device_budget_bytes": 24 * GiB, "host_budget_bytes": 64 * GiB, **budgets})
    profile = HardwareProfile.preset("rtx4090-pcie4")
    with pytest.raises(PlanInfeasibleError, match=match) as info:
        plan(problem, profile)
    found = re.search(rf"(?:smallest {tier} budget that works: |{tier} )([0-9.]+) GiB", str(info.value))
    assert found, str(info.value)
    smallest = math.ceil(float(found.group(1)) * GiB)
    fixed = dataclasses.replace(problem, **{f"{tier}_budget_bytes": smallest})
    check_plan_invariants(plan(fixed, profile), fixed, profile)
    with pytest.raises(PlanInfeasibleError):  # and it is the smallest, to the printed 0.1 GiB
        plan(dataclasses.replace(problem, **{f"{tier}_budget_bytes": smallest - GiB // 5}), profile)


@pytest.mark.parametrize("shape", GQA_SHAPES, ids=["group4", "group2"])
def test_no_recompute_for_gqa(shape):
    profile = dataclasses.replace(HardwareProfile.preset("rtx4090-pcie4"), host_to_device_pinned_gbps=4.0,
                                  host_to_device_pageable_gbps=2.0)
    problem = PlanProblem(**shape, context_tokens=131072, device_budget_bytes=24 * GiB, host_budget_bytes=64 * GiB,
                          allow_recompute=True, allow_delegation=False)
    p = plan(problem, profile)
    assert p.tier_bytes[Tier.HOST] > 0  # the PCIe link is in use, recompute could have been chosen
    assert sum(p.recomputed_pages) == 0


def test_recompute_pays_for_mha_on_a_slow_link():
    profile = dataclasses.replace(HardwareProfile.preset("rtx4090-pcie4"), host_to_device_pinned_gbps=4.0,
                                  host_to_device_pageable_gbps=2.0)
    problem = PlanProblem(**LLAMA_2_7B_LIKE, context_tokens=32768, device_budget_bytes=24 * GiB,
                          host_budget_bytes=64 * GiB, allow_recompute=True, allow_delegation=False)
    p = plan(problem, profile)
    assert p.tier_bytes[Tier.HOST] > p.tier_bytes[Tier.DEVICE]  # KV mostly on HOST
    assert p.recompute_share > 0
    without = plan(dataclasses.replace(problem, allow_recompute=False), profile)
    assert p.decode_step_s < without.decode_step_s
    assert any(c.startswith("recompute not allowed") for c in without.binding_constraints)


def test_delegation_used_only_when_allowed():
    problem = llama_problem(device_budget_bytes=24 * GiB, host_budget_bytes=64 * GiB)
    profile = HardwareProfile.preset("rtx4090-pcie4")
    assert plan(problem, profile).delegated_share > 0
    off = plan(dataclasses.replace(problem, allow_delegation=False), profile)
    assert sum(off.delegated_pages) == 0


def test_layer_groups_and_sparsity():
    profile = HardwareProfile.preset("rtx4090-pcie4")
    problem = llama_problem(device_budget_bytes=24 * GiB, host_budget_bytes=8 * GiB, disk_budget_bytes=64 * GiB)
    one = plan(problem, profile)
    assert one.tier_bytes[Tier.DISK] > 0
    four = plan(dataclasses.replace(problem, num_layer_groups=4), profile)
    assert four.lp_step_s == pytest.approx(one.lp_step_s, rel=1e-6)  # identical layers: same optimum
    sparse = plan(dataclasses.replace(problem, sparse_budget=0.25), profile)
    assert sparse.decode_step_s < one.decode_step_s


def test_cpu_machine_three_tiers():
    """SmolLM2-135M at 16K on the 2-core preset with budgets that use every tier."""
    problem = PlanProblem(num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576,
                          intermediate_size=1536, context_tokens=16384, weight_bytes=135_000_000 * 4,
                          kv_dtype_bytes=4, device_budget_bytes=800 * MiB, host_budget_bytes=200 * MiB,
                          disk_budget_bytes=4 * GiB)
    profile = HardwareProfile.preset("cpu-2core")
    p = plan(problem, profile)
    check_plan_invariants(p, problem, profile)
    assert all(p.tier_bytes[t] > 0 for t in Tier)
    assert p.decode_step_s <= greedy_plan(problem, profile).decode_step_s


def _pages(p) -> tuple:
    return (tuple(p.device_pages), tuple(p.host_pages), tuple(p.disk_pages), tuple(p.delegated_pages))


def test_min_gain_keeps_greedy_unless_the_gain_is_large():
    """With ``min_gain`` the plan is the greedy split unless the model's best split is
    predicted at least that much faster; then it is that best split."""
    kept = left = 0
    for seed in RANDOM_SEEDS:
        rng = np.random.default_rng(seed)
        problem = random_problem(rng, pages=int(rng.integers(1, 300)), num_layers=int(rng.integers(1, 9)))
        profile, overlap = random_profile(rng), random_overlap(rng)
        try:
            g = greedy_plan(problem, profile, overlap=overlap)
        except PlanInfeasibleError:
            continue
        best = plan(problem, profile, overlap=overlap)
        p = plan(problem, profile, overlap=overlap, min_gain=0.1)
        if best.decode_step_s <= 0.9 * g.decode_step_s:
            assert _pages(p) == _pages(best)
            left += 1
        else:
            assert _pages(p) == _pages(g) and p.decode_step_s == pytest.approx(g.decode_step_s)
            kept += _pages(best) != _pages(g)  # cases where the margin changed the answer
    assert kept > 0 and left > 0  # both branches were exercised
    with pytest.raises(ValueError, match="min_gain"):
        plan(problem, profile, min_gain=1.0)
