"""The baseline: fill DEVICE, then HOST, then DISK, layer by layer, priced by the cost model.

The greedy rule (``greedy_plan``) places the pages in the order prefill produces them: layer 0's
pages take the DEVICE room first, then layer 1's, ...; when DEVICE is full the next pages go to
HOST, then to DISK::

    for layer 0, 1, ...:  device = min(P, device pages left);  host = min(P - device, host pages left)
                          disk = P - device - host             (must fit the DISK pages left)

So the first layers live close and the last ones far, the way a naive offloader spills whole
layers. No delegation, no recompute. The LP (``planner.lp``) is measured against this rule.

``fill_order_pages`` is the even variant (each tier's room divided evenly over the layers, the
same split in every layer); the LP keeps both as rounding candidates.
"""
from __future__ import annotations

import logging
import math

from planner.cost import CostModel, OverlapModel
from planner.plan import LayerPages, Plan, make_plan
from planner.problem import Capacity, PlanInfeasibleError, PlanProblem, Tier, check_feasible
from planner.profile import HardwareProfile

__all__ = ["greedy_plan", "fill_order_pages", "layer_fill_pages"]

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


def layer_fill_pages(problem: PlanProblem, cap: Capacity) -> list[LayerPages] | None:
    """The greedy rule's pages, layer by layer (see the module docstring), or None when the
    DISK room cannot take what DEVICE and HOST leave (whole pages)."""
    left = {t: max(0, math.floor(r / problem.page_bytes + 1e-9)) for t, r in cap.room_bytes.items()}
    total = problem.pages_per_layer
    out: list[LayerPages] = []
    for _ in range(problem.num_layers):
        device = min(total, left[Tier.DEVICE])
        host = min(total - device, left[Tier.HOST])
        disk = total - device - host
        if disk > left[Tier.DISK]:
            return None
        left[Tier.DEVICE] -= device
        left[Tier.HOST] -= host
        left[Tier.DISK] -= disk
        out.append((device, host, disk, 0, 0))
    return out


def greedy_plan(problem: PlanProblem, profile: HardwareProfile, *, overlap: OverlapModel | None = None) -> Plan:
    """The greedy (layer-by-layer fill) placement of ``problem`` with its predicted times.

    Args:
        problem: the workload.
        profile: the hardware constants.
        overlap: which legs overlap; None = ``OverlapModel.for_profile(profile)``.

    Raises:
        PlanInfeasibleError: no placement fits (in whole pages).
    """
    cap = check_feasible(problem, profile)
    pages = layer_fill_pages(problem, cap)
    if pages is None:
        raise PlanInfeasibleError([
            f"greedy rule: {problem.num_layers} layers x {problem.pages_per_layer} pages do not fit the rooms "
            f"in whole pages (device {cap.room_bytes[Tier.DEVICE] / 2**30:.2f} GiB, host "
            f"{cap.room_bytes[Tier.HOST] / 2**30:.2f} GiB, disk {cap.room_bytes[Tier.DISK] / 2**30:.2f} GiB)"])
    model = CostModel(problem, profile, overlap)
    return make_plan(problem, model, cap, pages, method="greedy")
