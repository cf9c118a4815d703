"""The baseline: the engine's fill rule (DEVICE, then HOST, then DISK), priced by the cost model.

Each tier's room is divided evenly over the layers (whole pages), so every layer gets the same
split, the way ``offload.placement.fill_order_placement`` does it::

    per layer:  device = min(P, device room pages // layers)
                host   = min(P - device, host room pages // layers)
                disk   = P - device - host        (must fit the DISK room)

No delegation, no recompute. The LP (``planner.lp``) is measured against this rule.
"""
from __future__ import annotations

import logging
import math

from planner.cost import CostModel, OverlapModel
from planner.plan import LayerPages, Plan, make_plan
from planner.problem import Capacity, PlanInfeasibleError, PlanProblem, Tier, check_feasible
from planner.profile import HardwareProfile

__all__ = ["greedy_plan", "fill_order_pages"]

logger = logging.getLogger(__name__)


def fill_order_pages(problem: PlanProblem, cap: Capacity) -> LayerPages | None:
    """The fill rule's pages of one layer (the same in every layer), or None when the DISK
    room cannot take what DEVICE and HOST leave (an expected miss: the rule wastes up to a
    page per layer of each tier's room, which the LP may still use)."""
    total, layers = problem.pages_per_layer, problem.num_layers
    room_pages = {t: max(0, math.floor(r / problem.page_bytes + 1e-9)) for t, r in cap.room_bytes.items()}
    device = min(total, room_pages[Tier.DEVICE] // layers)
    host = min(total - device, room_pages[Tier.HOST] // layers)
    disk = total - device - host
    if disk * layers > room_pages[Tier.DISK]:
        return None
    return (device, host, disk, 0, 0)


def greedy_plan(problem: PlanProblem, profile: HardwareProfile, *, overlap: OverlapModel | None = None) -> Plan:
    """The fill-order placement of ``problem`` with its predicted times.

    Args:
        problem: the workload.
        profile: the hardware constants.
        overlap: which legs overlap; None = ``OverlapModel.for_profile(profile)``.

    Raises:
        PlanInfeasibleError: no placement fits, or the fill rule's even split does not.
    """
    cap = check_feasible(problem, profile)
    pages = fill_order_pages(problem, cap)
    if pages is None:
        raise PlanInfeasibleError([
            f"fill-order rule: {problem.pages_per_layer} pages per layer do not fit an even split of the rooms "
            f"(device {cap.room_bytes[Tier.DEVICE] / 2**30:.2f} GiB, host {cap.room_bytes[Tier.HOST] / 2**30:.2f} "
            f"GiB, disk {cap.room_bytes[Tier.DISK] / 2**30:.2f} GiB); the LP planner can split layers unevenly"])
    model = CostModel(problem, profile, overlap)
    return make_plan(problem, model, cap, [pages] * problem.num_layers, method="greedy")
