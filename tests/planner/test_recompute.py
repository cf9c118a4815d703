"""The planner's recompute choice (KVPR) and its reason: MHA pays on a PCIe link, GQA never,
the zero-share reasons of an MHA model, and the modes that pin or do not price it."""
from __future__ import annotations

import dataclasses
import json

import pytest

from planner import HardwareProfile, PlanProblem, RecomputeMode, plan, recompute_choice
from planner.recompute import ENGINE_NOTE

GiB = 2**30
RTX = HardwareProfile.preset("rtx4090-pcie4")
# Llama-2-7B: MHA, hidden 4096 = 32 heads x 128; bf16 weights 13.5 GB (12.6 GiB).
LLAMA_2_7B = dict(num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, hidden_size=4096,
                  intermediate_size=11008, weight_bytes=int(6.74e9 * 2))
# GQA shapes (layers, heads, KV heads, head_dim, hidden, intermediate, weight bytes in bf16): the
# named shapes' numbers, and group 2 with hidden = heads x head_dim (activations = K/V bytes).
GQA_SHAPES = {
    "llama-3.1-8b": (32, 32, 8, 128, 4096, 14336, int(8.03e9 * 2)),
    "qwen2.5-7b": (28, 28, 4, 128, 3584, 18944, int(7.62e9 * 2)),
    "smollm2-135m": (30, 9, 3, 64, 576, 1536, int(0.135e9 * 2)),
    "gemma3-270m-global": (3, 4, 1, 256, 640, 2048, int(0.27e9 * 2)),
    "group-2": (32, 32, 16, 128, 4096, 14336, int(8.5e9 * 2)),
}


def _problem(shape: dict | tuple = LLAMA_2_7B, **kw) -> PlanProblem:
    if isinstance(shape, tuple):
        names = ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size",
                 "weight_bytes")
        shape = dict(zip(names, shape))
    return PlanProblem(**shape, **({"context_tokens": 32768, "allow_recompute": True} | kw))


@pytest.mark.parametrize("mode", [RecomputeMode.AUTO, RecomputeMode.KVPR])
def test_mha_on_pcie_keeps_a_share_as_activations(mode):
    """Llama-2-7B at 32K on the RTX 4090 preset: 16 GiB of KV beside 12.6 GiB of weights on a
    22 GiB card, so most pages live on HOST; half the bytes per token cross the link for the
    pages kept as activations, and the step beats the plan without recompute."""
    problem = _problem()
    result = plan(problem, RTX)
    choice = recompute_choice(problem, RTX, result, mode)
    assert sum(result.host_pages) > sum(result.device_pages) and choice.share == result.recompute_share > 0.1
    assert (choice.activation_token_bytes, choice.kv_token_bytes) == (4096 * 2, 2 * 32 * 128 * 2)
    recomputed = sum(result.recomputed_pages)
    assert choice.saved_bytes_per_step == recomputed * 32 * (16384 - 8192)
    # 2 x hidden x (K and V of every KV head) flops per recomputed token, at the preset's 165 TFLOP/s.
    assert choice.added_compute_s == pytest.approx(recomputed * 32 * 2 * 4096 * 8192 / 165e12, rel=1e-9)
    without = plan(dataclasses.replace(problem, allow_recompute=False), RTX)
    assert choice.step_without_s == without.decode_step_s > result.decode_step_s
    assert f"share {choice.share:.1%} of pages" in choice.reason
    assert f"{choice.saved_bytes_per_step / GiB:.2f} GiB less crosses the host link per decode step" in choice.reason
    assert f"against {without.decode_step_s * 1e3:.1f} ms without recompute" in choice.reason
    assert choice.line().startswith(f"Recompute ({mode.value}): share") and choice.line().endswith(ENGINE_NOTE)
    assert json.loads(json.dumps(choice.to_dict()))["executed"] is (choice.share > 0)


def test_none_pins_the_share_and_says_kvpr_would_pay():
    problem = _problem(allow_recompute=False)
    result = plan(problem, RTX)
    choice = recompute_choice(problem, RTX, result, RecomputeMode.NONE)
    assert choice.share == 0 and sum(result.recomputed_pages) == 0
    assert choice.reason.startswith("share 0, pinned by --recompute none")
    assert "8192 bytes per token and layer) are fewer than the K/V bytes (2 x 32 KV heads" in choice.reason
    assert choice.reason.endswith("(--recompute kvpr lets the planner price it)")
    assert ENGINE_NOTE not in choice.line()
    assert any(c.startswith("recompute not allowed") for c in result.binding_constraints)


def test_lowrank_is_not_priced():
    problem = _problem(allow_recompute=False)
    result = plan(problem, RTX)
    choice = recompute_choice(problem, RTX, result, RecomputeMode.LOWRANK)
    assert choice.share == 0 and choice.line() == (
        "Recompute (lowrank): low-rank keys are not priced by the planner yet: share 0, the plan is the one "
        "without recompute")
    assert RecomputeMode.AUTO.allows_kvpr and RecomputeMode.KVPR.allows_kvpr
    assert not RecomputeMode.LOWRANK.allows_kvpr and not RecomputeMode.NONE.allows_kvpr


@pytest.mark.parametrize("name", list(GQA_SHAPES))
def test_gqa_gets_zero_because_activations_are_not_smaller(name):
    """Activations (hidden values per token) >= K/V (2 x KV heads x head_dim): zero, with both
    numbers, although half the KV crosses the link (a slow one, where bytes matter most)."""
    slow = dataclasses.replace(RTX, host_to_device_pinned_gbps=4.0, host_to_device_pageable_gbps=2.0)
    layers, heads, kv_heads, head_dim, hidden, _, weights = GQA_SHAPES[name]
    values = 2 * kv_heads * head_dim
    kv = layers * values * 2 * 131072  # bf16 K/V of 128K tokens
    problem = _problem(GQA_SHAPES[name], context_tokens=131072, device_budget_bytes=int((weights + kv / 2) / 0.8),
                       allow_delegation=False)
    result = plan(problem, slow)
    choice = recompute_choice(problem, slow, result, RecomputeMode.AUTO)
    assert sum(result.host_pages) >= sum(result.device_pages) > 0
    assert choice.share == 0 and sum(result.recomputed_pages) == 0
    assert (choice.activation_token_bytes, choice.kv_token_bytes) == (2 * hidden, 2 * values)
    assert choice.reason == (
        f"share 0: the shipped activations (hidden_size {hidden} values, {2 * hidden} bytes per token and layer) "
        f"are at least the K/V bytes (2 x {kv_heads} KV heads x {head_dim} head_dim = {values} values, "
        f"{2 * values} bytes per token and layer); {heads // kv_heads} query heads per KV head: KVPR would move "
        "more bytes, not fewer")


def test_4bit_pages_are_compared_as_stored():
    """Llama-2-7B's 4-bit page (codes 128 KiB + scales and mins 32 KiB) holds 5120 bytes per
    token: fewer than its activations' 8192, so even MHA gets zero."""
    problem = _problem(packed_page_bytes=163840)
    choice = recompute_choice(problem, RTX, plan(problem, RTX), RecomputeMode.KVPR)
    assert choice.share == 0 and "at least the K/V as stored in 4-bit pages (5120 bytes per token" in choice.reason


@pytest.mark.parametrize("kw,profile,words", [
    (dict(context_tokens=4096, device_budget_bytes=40 * GiB, allow_delegation=False), RTX,
     "everything fits DEVICE, so no HOST pages exist"),
    (dict(host_budget_bytes=0), RTX, "the pages off DEVICE are on DISK, and KVPR recomputes from HOST pages only"),
    (dict(device_budget_bytes=16 * GiB, host_budget_bytes=40 * GiB), HardwareProfile.preset("cpu-2core"),
     "a CPU-only profile moves no bytes over a link"),
    (dict(context_tokens=4096), RTX, "every HOST page is attended on the CPU (delegated)"),
    (dict(context_tokens=8192), RTX, "rebuilding K/V on the device (67108864 flops per token and layer) costs more"),
])
def test_mha_zero_share_says_why(kw, profile, words):
    problem = _problem(**kw)
    result = plan(problem, profile)
    choice = recompute_choice(problem, profile, result, RecomputeMode.AUTO)
    assert choice.share == 0 and sum(result.recomputed_pages) == 0
    assert choice.reason.startswith("share 0: ") and words in choice.reason, choice.reason
    assert choice.saved_bytes_per_step == 0 and choice.step_without_s is None


def test_recompute_that_makes_the_plan_fit():
    """10 GiB of HOST and no DISK cannot hold the 16 GiB beside DEVICE as K/V, only as half-size
    activations: the share is what makes the plan fit, and the reason says so."""
    problem = _problem(host_budget_bytes=10 * GiB, disk_budget_bytes=0)
    result = plan(problem, RTX)
    choice = recompute_choice(problem, RTX, result, RecomputeMode.KVPR)
    assert choice.share > 0 and choice.step_without_s is None
    assert choice.reason.endswith("without recompute no placement fits the budgets")


def test_cpu_only_recompute_saves_room_not_link_bytes():
    """On the 2-core preset nothing crosses a link: a share kept as activations only saves HOST
    room (here what makes 16 GiB fit 20 GiB of DEVICE and 14 GiB of HOST without DISK)."""
    cpu = HardwareProfile.preset("cpu-2core")
    problem = _problem(device_budget_bytes=20 * GiB, host_budget_bytes=14 * GiB, disk_budget_bytes=0)
    result = plan(problem, cpu)
    choice = recompute_choice(problem, cpu, result, RecomputeMode.AUTO)
    assert choice.share > 0 and choice.saved_bytes_per_step == 0 and choice.step_without_s is None
    room = sum(result.recomputed_pages) * 32 * 8192
    assert f"{room / GiB:.2f} GiB less HOST memory (nothing crosses a link on a CPU-only profile)" in choice.reason
