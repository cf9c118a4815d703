"""The planner's output: a frozen ``Plan`` with the predicted times and why.

Invariants of a ``Plan`` (checked when ``make_plan`` builds one):
- every layer's ``device + host + disk`` pages equal ``pages_per_layer``;
- ``delegated + recomputed <= host`` pages in every layer;
- ``tier_bytes`` (pages * page bytes) add up to ``kv_bytes``; ``stored_bytes`` counts the
  HOST pages kept as activations at their activation size;
- stored bytes fit every tier's room (slack * budget minus the fixed reservations).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from planner.cost import CostModel, LayerSplit
from planner.problem import Capacity, PlanProblem, Tier

__all__ = ["Plan", "make_plan", "LayerPages"]

logger = logging.getLogger(__name__)

GiB = 2**30
# Pages of one layer: (device, host, disk, delegated, recomputed).
LayerPages = tuple[int, int, int, int, int]


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """Where each layer's pages live and where their attention runs, with predictions.

    Attributes:
        method: 'lp' or 'greedy' (how the split was chosen).
        num_layers, pages_per_layer, page_bytes, activation_page_bytes, batch_size: sizes.
        device_pages / host_pages / disk_pages: pages per layer on each tier.
        delegated_pages: HOST pages per layer attended on the CPU (not fetched).
        recomputed_pages: HOST pages per layer kept as activations (K/V recomputed on device).
        sparse_budget: share of the pages a step reads.
        sparse_fetch: pages moved from HOST/DISK per page attended there (``PlanProblem``).
        metadata_bytes: DEVICE bytes of page metadata (key bounds) over all layers.
        decode_step_s / prefill_s: predicted times under the plan (whole pages).
        lp_step_s: the LP's optimum before rounding to whole pages (None for greedy).
        leg_s: (leg name, seconds per step summed over layers) pairs.
        critical_path: legs of the slowest layer's slowest chain; bottleneck: its largest.
        binding_constraints: constraints at their limit, with what relaxing them would save.
        budget_bytes / room_bytes: per tier (name, bytes): the budget, and slack * budget
            minus the fixed reservations.
    """

    method: str
    num_layers: int
    pages_per_layer: int
    page_bytes: int
    activation_page_bytes: int
    batch_size: int
    device_pages: tuple[int, ...]
    host_pages: tuple[int, ...]
    disk_pages: tuple[int, ...]
    delegated_pages: tuple[int, ...]
    recomputed_pages: tuple[int, ...]
    sparse_budget: float
    decode_step_s: float
    prefill_s: float
    lp_step_s: float | None
    leg_s: tuple[tuple[str, float], ...]
    critical_path: tuple[str, ...]
    bottleneck: str
    binding_constraints: tuple[str, ...]
    budget_bytes: tuple[tuple[str, int], ...]
    room_bytes: tuple[tuple[str, float], ...]
    sparse_fetch: float = 1.0
    metadata_bytes: int = 0

    @property
    def kv_bytes(self) -> int:
        return self.num_layers * self.pages_per_layer * self.page_bytes

    @property
    def tier_bytes(self) -> dict[Tier, int]:
        """K/V bytes per tier (pages * page bytes); they add up to ``kv_bytes``."""
        return {t: sum(self.pages_of(t)) * self.page_bytes for t in Tier}

    @property
    def stored_bytes(self) -> dict[Tier, int]:
        """Bytes each tier holds: HOST's recomputed pages at their activation size."""
        out = self.tier_bytes
        out[Tier.HOST] -= sum(self.recomputed_pages) * (self.page_bytes - self.activation_page_bytes)
        return out

    @property
    def delegated_share(self) -> float:
        """Delegated pages / HOST pages (0 without HOST pages)."""
        host = sum(self.host_pages)
        return sum(self.delegated_pages) / host if host else 0.0

    @property
    def recompute_share(self) -> float:
        """Recomputed pages / all pages."""
        return sum(self.recomputed_pages) / (self.num_layers * self.pages_per_layer)

    @property
    def tokens_per_s(self) -> float:
        return self.batch_size / self.decode_step_s if self.decode_step_s > 0 else float("inf")

    def pages_of(self, tier: Tier) -> tuple[int, ...]:
        return {Tier.DEVICE: self.device_pages, Tier.HOST: self.host_pages, Tier.DISK: self.disk_pages}[tier]

    def splits(self) -> list[LayerSplit]:
        """The plan as one ``LayerSplit`` per layer (what the cost model takes)."""
        return [LayerSplit.from_pages(*p) for p in zip(self.device_pages, self.host_pages, self.disk_pages,
                                                         self.delegated_pages, self.recomputed_pages)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tier bytes included)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("device_pages", "host_pages", "disk_pages", "delegated_pages", "recomputed_pages",
                    "critical_path", "binding_constraints"):
            d[key] = list(d[key])
        for key in ("leg_s", "budget_bytes", "room_bytes"):
            d[key] = dict(d[key])
        d["kv_bytes"] = self.kv_bytes
        d["tier_bytes"] = {t.value: b for t, b in self.tier_bytes.items()}
        d["stored_bytes"] = {t.value: b for t, b in self.stored_bytes.items()}
        d["delegated_share"] = self.delegated_share
        d["recompute_share"] = self.recompute_share
        d["tokens_per_s"] = self.tokens_per_s
        return d

    def explain(self) -> str:
        """A human-readable summary: placement, predicted times, bottleneck, binding constraints."""
        budgets, rooms = dict(self.budget_bytes), dict(self.room_bytes)
        lines = [f"Plan ({self.method}): {self.num_layers} layers x {self.pages_per_layer} pages of "
                 f"{self.page_bytes / 2**10:.0f} KiB; KV {self.kv_bytes / GiB:.2f} GiB; "
                 f"sparse budget {self.sparse_budget:g}"
                 + (f" (pages moved per page attended off DEVICE: {self.sparse_fetch:.2f}; key bounds "
                    f"{self.metadata_bytes / GiB:.3f} GiB on DEVICE)" if self.sparse_budget < 1 else "")]
        for t in Tier:
            pages = self.pages_of(t)
            share = sum(pages) / (self.num_layers * self.pages_per_layer)
            lines.append(f"  {t.value:<6} {self.stored_bytes[t] / GiB:8.2f} GiB ({share:6.1%} of pages; "
                         f"{min(pages)}-{max(pages)} pages/layer) of {max(rooms[t.value], 0) / GiB:.2f} GiB room "
                         f"in a {budgets[t.value] / GiB:.2f} GiB budget")
        lines.append(f"  HOST pages attended on the CPU: {self.delegated_share:.1%}; "
                     f"kept as activations and recomputed: {self.recompute_share:.1%} of all pages")
        lp = "" if self.lp_step_s is None else f" (LP before rounding {self.lp_step_s * 1e3:.3f} ms)"
        lines.append(f"Predicted decode step {self.decode_step_s * 1e3:.3f} ms{lp}, {self.tokens_per_s:.2f} tok/s; "
                     f"prefill {self.prefill_s:.2f} s")
        lines.append("  per step: " + " | ".join(f"{name} {s * 1e3:.3f} ms" for name, s in self.leg_s))
        lines.append(f"  critical path: {' + '.join(self.critical_path)}; bottleneck: {self.bottleneck}")
        lines.append("Binding constraints: " + ("; ".join(self.binding_constraints) or "none"))
        return "\n".join(lines)


def make_plan(problem: PlanProblem, model: CostModel, cap: Capacity, pages: Sequence[LayerPages], *,
              method: str, lp_step_s: float | None = None, binding: Sequence[str] = ()) -> Plan:
    """Evaluate whole-page splits with the cost model and freeze them into a ``Plan``.

    Args:
        problem: the workload.
        model: the cost model (same problem).
        cap: budgets and rooms.
        pages: one ``(device, host, disk, delegated, recomputed)`` per layer.
        method: 'lp' or 'greedy'.
        lp_step_s: the LP optimum before rounding.
        binding: binding-constraint descriptions.
    """
    assert len(pages) == problem.num_layers
    for p in pages:
        assert min(p) >= 0 and p[0] + p[1] + p[2] == problem.pages_per_layer and p[3] + p[4] <= p[1], p
    splits = [LayerSplit.from_pages(*p) for p in pages]
    breakdown = model.decode_breakdown(splits)
    cols = list(zip(*pages))
    plan = Plan(
        method=method, num_layers=problem.num_layers, pages_per_layer=problem.pages_per_layer,
        page_bytes=problem.page_bytes, activation_page_bytes=problem.activation_page_bytes,
        batch_size=problem.batch_size, device_pages=cols[0], host_pages=cols[1], disk_pages=cols[2],
        delegated_pages=cols[3], recomputed_pages=cols[4], sparse_budget=problem.sparse_budget,
        decode_step_s=breakdown.step_s, prefill_s=model.prefill_s(splits), lp_step_s=lp_step_s,
        leg_s=tuple((leg.value, s) for leg, s in breakdown.leg_s.items()),
        critical_path=tuple(leg.value for leg in breakdown.critical_path), bottleneck=breakdown.bottleneck.value,
        binding_constraints=tuple(binding),
        budget_bytes=tuple((t.value, b) for t, b in cap.budget_bytes.items()),
        room_bytes=tuple((t.value, r) for t, r in cap.room_bytes.items()),
        sparse_fetch=problem.sparse_fetch, metadata_bytes=problem.metadata_bytes_per_layer * problem.num_layers,
    )
    for t, stored in plan.stored_bytes.items():
        assert stored <= cap.room_bytes[t] + 1e-6 * problem.page_bytes, (t, stored, cap.room_bytes[t])
    return plan
