"""The LP placement planner: tier fractions per layer group, solved with HiGHS.

The linear program follows FlexGen (Sheng et al. 2023), for the pages of one long request
instead of batch x head slices, with CPU delegation and recompute as extra variables. Per
layer group g (``n_g`` identical layers), with every leg of ``planner.cost`` affine in::

    x_g = (device, host, disk, delegated, recomputed)   fractions of the layer's pages
    t_g                                                  epigraph of the layer time

    minimise   sum_g n_g * (t_g + eps * sum of legs(x_g))       (eps: prefer fewer bytes on ties)
    subject to t_g >= sum of legs on path p, for every path p of the overlap model
               device + host + disk = 1,   delegated + recomputed <= host
               sum_g n_g * device_g * K               <= device room
               sum_g n_g * (host_g - recomputed_g * (1 - act/kv)) * K <= host room
               sum_g n_g * disk_g * K                 <= disk room
               delegated = 0 unless allowed, recomputed = 0 unless allowed

(K = K/V bytes of one layer; rooms = slack * budget - fixed reservations.) The fractions are
then rounded to whole pages: each group takes the fastest feasible split among the whole-page
neighbours of its LP point (or of the mean LP point over all layers); the fill-order split
(``planner.greedy``) is kept instead when it is faster after rounding. Time rows are scaled by
a reference time and capacity rows by the KV size so HiGHS sees numbers of order one.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import math

import numpy as np
from scipy.optimize import OptimizeResult, linprog

from planner.cost import CostModel, LayerSplit, Leg, OverlapModel
from planner.greedy import fill_order_pages, layer_fill_pages
from planner.plan import LayerPages, Plan, make_plan
from planner.problem import Capacity, PlanInfeasibleError, PlanProblem, Tier, check_feasible
from planner.profile import HardwareProfile

__all__ = ["plan"]

logger = logging.getLogger(__name__)

NUM_X = 5  # device, host, disk, delegated, recomputed
VARS = NUM_X + 1  # + t
TIE_EPS = 1e-6  # weight of the total leg time in the objective (ties go to fewer bytes moved)
BINDING_TOL = 1e-7


def plan(problem: PlanProblem, profile: HardwareProfile, *, overlap: OverlapModel | None = None,
         min_gain: float = 0.0) -> Plan:
    """The fastest placement of ``problem`` under the cost model, in whole pages.

    Args:
        problem: the workload and budgets.
        profile: the hardware constants.
        overlap: which legs overlap; None = ``OverlapModel.for_profile(profile)``.
        min_gain: keep the greedy layer-by-layer split unless the best split is predicted
            faster by at least this fraction of its step (0: the model's optimum; the engine
            asks for a gain beyond the model's measured error before leaving the baseline).

    Returns:
        A frozen ``Plan`` with pages per tier per layer and the predicted times.

    Raises:
        PlanInfeasibleError: no placement fits the budgets (the message names each violated
            constraint, its shortfall and the smallest budget that works).
    """
    cap = check_feasible(problem, profile)
    model = CostModel(problem, profile, overlap)
    lp = _build(problem, model, cap)
    res = linprog(lp.c, A_ub=lp.a_ub, b_ub=lp.b_ub, A_eq=lp.a_eq, b_eq=lp.b_eq, bounds=lp.bounds, method="highs")
    if res.status != 0:
        raise PlanInfeasibleError([f"the LP found no placement ({res.message}); the budgets are within "
                                   "rounding of the KV size: add a few pages of room to any tier"])
    groups = problem.layer_groups()
    fractions = [np.clip(res.x[g * VARS: g * VARS + NUM_X], 0.0, 1.0) for g in range(len(groups))]
    lp_step_s = sum(len(layers) * model.layer_s(model.decode_legs_raw(*x)) for layers, x in zip(groups, fractions))
    if not 0.0 <= min_gain < 1.0:
        raise ValueError(f"min_gain must be in [0, 1), got {min_gain}")
    pages = _best_rounding(problem, model, cap, groups, fractions, min_gain)
    result = make_plan(problem, model, cap, pages, method="lp", lp_step_s=lp_step_s,
                       binding=_binding(problem, lp, res))
    logger.debug("plan: %.3f ms per step (LP %.3f ms), bottleneck %s", result.decode_step_s * 1e3,
                 lp_step_s * 1e3, result.bottleneck)
    return result


@dataclasses.dataclass
class _Program:
    """The LP in ``linprog``'s form, plus what the binding report needs."""

    c: np.ndarray
    a_ub: list[np.ndarray]
    b_ub: list[float]
    a_eq: np.ndarray
    b_eq: np.ndarray
    bounds: list[tuple[float, float | None]]
    t_ref: float  # seconds per unit of t
    cap: Capacity
    cap_rows: dict[Tier, int] = dataclasses.field(default_factory=dict)


def _affine_legs(model: CostModel) -> dict[Leg, tuple[float, np.ndarray]]:
    """Each decode leg as (constant, coefficients over x): exact, the legs being affine."""
    zero = model.decode_legs_raw(*([0.0] * NUM_X))
    unit = [model.decode_legs_raw(*np.eye(NUM_X)[i]) for i in range(NUM_X)]
    return {leg: (zero[leg], np.array([u[leg] - zero[leg] for u in unit])) for leg in Leg}


def _build(problem: PlanProblem, model: CostModel, cap: Capacity) -> _Program:
    """Variables ``[x_g (5), t_g]`` per group; objective, split, epigraph and capacity rows."""
    legs = _affine_legs(model)
    t_ref = max(max(sum(legs[leg][0] + np.abs(legs[leg][1]).sum() for leg in p) for p in model.paths), 1e-30)
    groups = problem.layer_groups()
    nv = VARS * len(groups)
    lp = _Program(c=np.zeros(nv), a_ub=[], b_ub=[], a_eq=np.zeros((len(groups), nv)), b_eq=np.ones(len(groups)),
                  bounds=[], t_ref=t_ref, cap=cap)
    for g, layers in enumerate(groups):
        o, n = g * VARS, len(layers)
        lp.c[o + NUM_X] = n
        lp.c[o: o + NUM_X] += n * TIE_EPS * sum(legs[leg][1] for leg in Leg) / t_ref
        lp.a_eq[g, o: o + 3] = 1.0  # device + host + disk = 1
        row = np.zeros(nv)
        row[o + 1], row[o + 3], row[o + 4] = -1.0, 1.0, 1.0  # delegated + recomputed <= host
        lp.a_ub.append(row)
        lp.b_ub.append(0.0)
        for path in model.paths:  # t_g >= sum of the path's legs
            row = np.zeros(nv)
            row[o: o + NUM_X] = sum(legs[leg][1] for leg in path) / t_ref
            row[o + NUM_X] = -1.0
            lp.a_ub.append(row)
            lp.b_ub.append(-sum(legs[leg][0] for leg in path) / t_ref)
        lp.bounds += [(0.0, 1.0)] * 3 + [(0.0, 1.0 if problem.allow_delegation else 0.0),
                                          (0.0, 1.0 if problem.allow_recompute else 0.0), (0.0, None)]
    _add_capacity_rows(problem, lp, groups)
    return lp


def _add_capacity_rows(problem: PlanProblem, lp: _Program, groups: list[range]) -> None:
    """Stored bytes per tier <= room, in units of the KV size."""
    act_ratio = problem.activation_stored_bytes / problem.page_bytes
    for tier, col in ((Tier.DEVICE, 0), (Tier.HOST, 1), (Tier.DISK, 2)):
        row = np.zeros(len(lp.c))
        for g, layers in enumerate(groups):
            row[g * VARS + col] = len(layers) / problem.num_layers
            if tier == Tier.HOST:  # recomputed pages are stored as activations
                row[g * VARS + 4] = -(1 - act_ratio) * len(layers) / problem.num_layers
        lp.cap_rows[tier] = len(lp.a_ub)
        lp.a_ub.append(row)
        lp.b_ub.append(min(lp.cap.room_bytes[tier] / problem.kv_bytes, 2.0))  # >= 1 never binds


def _binding(problem: PlanProblem, lp: _Program, res: OptimizeResult) -> list[str]:
    """Capacity rows at their limit and disabled features the LP would use, with the saving
    the LP's marginals promise."""
    out = []
    for tier, row in lp.cap_rows.items():
        if res.ineqlin.residual[row] <= BINDING_TOL:
            per_gib_s = -res.ineqlin.marginals[row] * lp.t_ref * 2**30 / problem.kv_bytes
            out.append(f"{tier.value} capacity ({lp.cap.room_bytes[tier] / 2**30:.2f} GiB of KV room full; "
                       f"marginal value {per_gib_s * 1e3:.3f} ms per step per GiB more)")
    for name, col, allowed in (("delegation", 3, problem.allow_delegation), ("recompute", 4, problem.allow_recompute)):
        if allowed:
            continue
        gain = -sum(res.upper.marginals[g * VARS + col] for g in range(problem.num_layer_groups)) * lp.t_ref
        if gain > BINDING_TOL * lp.t_ref:
            out.append(f"{name} not allowed (marginal value {gain * 1e-2 * 1e3:.3f} ms per step per 1% of pages)")
    return out


def _best_rounding(problem: PlanProblem, model: CostModel, cap: Capacity, groups: list[range],
                   fractions: list[np.ndarray], min_gain: float = 0.0) -> list[LayerPages]:
    """The fastest of: the groups' LP points rounded, their layer-weighted mean rounded in every
    group (the layers being identical, the mean is optimal too, by convexity, and rounds
    without one group starving the next), the even fill split and the greedy layer-by-layer
    fill (whole pages can make either beat the rounded LP point). Ties go to the split that
    keeps pages closer (fewer HOST, then DISK pages), so equal-cost tiers fill in order. The
    greedy split is kept unless the best is predicted ``min_gain`` faster."""
    mean: np.ndarray = np.sum([len(layers) * x for layers, x in zip(groups, fractions)], axis=0) / problem.num_layers
    options: list[list[LayerPages]] = []
    errors: list[PlanInfeasibleError] = []
    for fr in (fractions, [mean] * len(groups)):
        try:
            options.append(_round(problem, model, cap, fr))
        except PlanInfeasibleError as e:
            errors.append(e)
    fill = fill_order_pages(problem, cap)
    if fill is not None:
        options.append([fill] * problem.num_layers)
    greedy = layer_fill_pages(problem, cap)
    for extra in (greedy, _balanced_pages(problem, cap)):
        if extra is not None:
            options.append(extra)
    if not options:
        raise errors[0]
    best = min(options, key=lambda pages: (_pages_cost(model, pages), _distance(pages)))
    if greedy is not None and _pages_cost(model, best) > (1.0 - min_gain) * _pages_cost(model, greedy):
        return greedy
    return best


def _balanced_pages(problem: PlanProblem, cap: Capacity) -> list[LayerPages] | None:
    """The even fill with the remainders spread too: every whole page of DEVICE and HOST room
    used, layers differing by at most one page per tier (None if DISK cannot take the rest)."""
    total, layers = problem.pages_per_layer, problem.num_layers
    room = {t: max(0, math.floor(r / problem.page_bytes + 1e-9)) for t, r in cap.room_bytes.items()}
    out: list[LayerPages] = []
    left = dict(room)
    for i in range(layers):
        device = min(total, room[Tier.DEVICE] // layers + (i < room[Tier.DEVICE] % layers), left[Tier.DEVICE])
        host = min(total - device, room[Tier.HOST] // layers + (i < room[Tier.HOST] % layers), left[Tier.HOST])
        left[Tier.DEVICE] -= device
        left[Tier.HOST] -= host
        out.append((device, host, total - device - host, 0, 0))
    if sum(p[2] for p in out) > room[Tier.DISK]:
        return None
    return out


def _distance(pages: list[LayerPages]) -> int:
    """How far the pages live: HOST pages count 1, DISK pages 2 (the tie-break)."""
    return sum(p[1] + 2 * p[2] for p in pages)


def _candidates(x: np.ndarray, total: int) -> list[LayerPages]:
    """Whole-page splits next to the fractions ``x`` (floor and ceiling of each share)."""
    def near(v: float, lo: int, hi: int) -> set[int]:
        return {min(max(k, lo), hi) for k in (math.floor(v * total + 1e-9), math.ceil(v * total - 1e-9))}

    out = []
    for d, h in itertools.product(near(x[0], 0, total), near(x[1], 0, total)):
        if d + h > total:
            continue
        for y in near(x[3], 0, h):
            out += [(d, h, total - d - h, y, r) for r in near(x[4], 0, h - y)]
    return out


def _stored(problem: PlanProblem, p: LayerPages) -> dict[Tier, float]:
    act = problem.activation_page_bytes
    return {Tier.DEVICE: p[0] * problem.page_bytes, Tier.HOST: (p[1] - p[4]) * problem.page_bytes + p[4] * act,
            Tier.DISK: p[2] * problem.page_bytes}


def _pages_cost(model: CostModel, pages: list[LayerPages]) -> float:
    if len(pages) == model.problem.num_layers:
        return model.decode_step_s([LayerSplit.from_pages(*p) for p in pages])
    return sum(model.layer_s(model.decode_legs(LayerSplit.from_pages(*p))) for p in pages)


def _round(problem: PlanProblem, model: CostModel, cap: Capacity, fractions: list[np.ndarray]) -> list[LayerPages]:
    """Whole pages per layer: per group the fastest feasible neighbour, the same in every layer
    of the group; layer by layer (falling back to filling the rooms in tier order) when no
    neighbour fits the whole group."""
    room = dict(cap.room_bytes)
    out: list[LayerPages] = []
    groups = problem.layer_groups()
    later = [sum(len(r) for r in groups[g + 1:]) for g in range(len(groups))]
    for g, (layers, x) in enumerate(zip(groups, fractions)):
        cands = sorted(_candidates(x, problem.pages_per_layer), key=lambda p: _pages_cost(model, [p]))
        chosen = _first_fit(problem, room, cands, len(layers), later[g])
        if chosen is not None:
            out += [chosen] * len(layers)
            continue
        for i in range(len(layers)):
            fallback = _fill_layer(problem, room)
            p = _first_fit(problem, room, cands + ([fallback] if fallback else []), 1, later[g] + len(layers) - 1 - i)
            if p is None:
                left = ", ".join(f"{t.value} {r / 2**20:.1f} MiB" for t, r in room.items())
                raise PlanInfeasibleError([
                    f"rounding to whole pages: layer {layers[i]} does not fit the rooms left ({left}); add "
                    f"{problem.num_layers * problem.page_bytes / 2**20:.1f} MiB to any budget"])
            out.append(p)
    return out


def _first_fit(problem: PlanProblem, room: dict[Tier, float], cands: list[LayerPages], n: int,
               layers_after: int) -> LayerPages | None:
    """The first candidate that fits ``n`` times and leaves room for ``layers_after`` more
    layers; its bytes are taken from ``room``. Candidates within an even share of every tier's
    room (room / layers left) go first, so an early group cannot starve the later ones."""
    share = {t: r / (n + layers_after) for t, r in room.items()}
    even = [p for p in cands if all(b <= share[t] + 1e-6 for t, b in _stored(problem, p).items())]
    host_ratio = min(1.0, problem.activation_stored_bytes / problem.page_bytes) if problem.allow_recompute else 1.0
    for p in even + cands:
        stored = _stored(problem, p)
        left = {t: room[t] - n * stored[t] for t in Tier}
        if min(left.values()) < -1e-6:
            continue
        free_pages = (left[Tier.DEVICE] + left[Tier.HOST] / host_ratio + left[Tier.DISK]) / problem.page_bytes
        if free_pages + 1e-6 < layers_after * problem.pages_per_layer:
            continue
        room.update(left)
        return p
    return None


def _fill_layer(problem: PlanProblem, room: dict[Tier, float]) -> LayerPages | None:
    """DEVICE, then HOST, then DISK for one layer within the rooms left (None if it cannot)."""
    total = problem.pages_per_layer
    device = min(total, max(0, int(room[Tier.DEVICE] // problem.page_bytes)))
    host = min(total - device, max(0, int(room[Tier.HOST] // problem.page_bytes)))
    disk = total - device - host
    return (device, host, disk, 0, 0) if disk * problem.page_bytes <= room[Tier.DISK] + 1e-6 else None
