"""Placement planner: an LP over tier fractions from a hardware profile (FlexGen-style).

Pure Python/numpy/scipy: never imports torch, ``storage`` or ``offload`` (the runtime maps its
config onto a ``PlanProblem`` and a ``Plan`` back onto its placement).

    problem = PlanProblem(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, ...)
    profile = HardwareProfile.preset("rtx4090-pcie4")     # or HardwareProfile.from_json(...)
    p = plan(problem, profile)                            # planner.lp.plan; raises PlanInfeasibleError
    print(p.explain())
    baseline = greedy_plan(problem, profile)              # the engine's fill-order rule, same model
    why = recompute_choice(problem, profile, p, RecomputeMode.AUTO)  # the recompute share and why
"""
from planner.cost import CostModel, LayerSplit, Leg, OverlapModel, StepBreakdown
from planner.greedy import greedy_plan
from planner.lp import plan
from planner.plan import Plan
from planner.problem import PlanInfeasibleError, PlanProblem, Tier, capacity, check_feasible
from planner.profile import PRESET_NAMES, PROFILE_FORMAT_VERSION, HardwareProfile
from planner.recompute import RecomputeChoice, RecomputeMode, recompute_choice

__all__ = [
    "CostModel", "HardwareProfile", "LayerSplit", "Leg", "OverlapModel", "PRESET_NAMES", "PROFILE_FORMAT_VERSION",
    "Plan", "PlanInfeasibleError", "PlanProblem", "RecomputeChoice", "RecomputeMode", "StepBreakdown", "Tier",
    "capacity", "check_feasible", "greedy_plan", "plan", "recompute_choice",
]
