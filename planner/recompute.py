"""The planner's recompute choice and why it was made (``offload plan --recompute``).

KVPR (Jiang et al. 2024, "KVPR: Efficient LLM Inference with I/O-Aware KV Cache Partial
Recomputation") keeps some HOST pages as the layer's input activations and recomputes their K
and V on the device while the other pages cross the host link. Per token and layer it ships
``hidden_size`` values instead of ``2 * num_kv_heads * head_dim``: fewer bytes only when the
activations are smaller than the K/V, i.e. (``hidden_size = num_heads * head_dim``) fewer than
2 query heads per KV head: MHA models. The test is the bytes, not the group size: Gemma 3 12B
has 2 query heads per KV head but ``hidden_size`` 3840 < 2 x 8 x 256, so KVPR ships 6% fewer
bytes there; 4-bit pages are compared as stored. The LP prices it when
``PlanProblem.allow_recompute`` (a share of a layer's HOST pages kept as activations,
``planner.cost``); this module says what it chose and why, the first row that holds::

    share > 0                the share, the bytes kept off the host link per decode step (on a
                             CPU-only profile: the HOST room saved), the compute added, the step
                             without recompute (or that nothing fits without it)
    --recompute lowrank      share 0: low-rank keys (ShadowKV) are not priced yet
    --recompute none         share 0, pinned (the bytes KVPR would ship, for comparison)
    activations >= K/V       share 0: KVPR would ship more bytes, not fewer (GQA)
    no HOST pages            share 0: KVPR recomputes from HOST pages only
    CPU-only profile         share 0: nothing crosses a link
    every HOST page on CPU   share 0: delegated pages never cross the link
    otherwise                share 0: rebuilding K/V costs more than the link time it saves

The engine executes KVPR with ``RuntimeConfig(recompute="kvpr" | "auto")`` (``offload.kv.kvpr``:
Llama-family models, each activation page held in a HOST K/V slot).
"""
from __future__ import annotations

import dataclasses
import enum
import logging
from typing import Any

from planner.cost import CostModel, Leg
from planner.lp import plan as solve
from planner.plan import Plan
from planner.problem import PlanInfeasibleError, PlanProblem
from planner.profile import HardwareProfile

__all__ = ["RecomputeMode", "RecomputeChoice", "recompute_choice", "ENGINE_NOTE"]

logger = logging.getLogger(__name__)

GiB = 2**30
ENGINE_NOTE = "(the engine runs it with --recompute kvpr or auto, Llama-family models)"


class RecomputeMode(enum.Enum):
    """What ``offload plan --recompute`` lets the planner choose."""

    NONE = "none"  # recompute pinned to zero
    KVPR = "kvpr"  # the LP chooses a KVPR share
    LOWRANK = "lowrank"  # low-rank keys: accepted, not priced yet (share 0)
    AUTO = "auto"  # the best priced form: KVPR (the only one priced)

    @property
    def allows_kvpr(self) -> bool:
        """The LP may keep HOST pages as activations (``PlanProblem.allow_recompute``)."""
        return self in (RecomputeMode.KVPR, RecomputeMode.AUTO)


@dataclasses.dataclass(frozen=True, slots=True)
class RecomputeChoice:
    """The recompute share of a plan and the reason for it.

    Attributes:
        mode: what the planner was allowed.
        share: pages kept as activations / all pages.
        reason: one sentence: why this share (numbers included).
        activation_token_bytes: bytes KVPR ships per token and layer (``hidden_size`` values).
        kv_token_bytes: K/V bytes per token and layer as stored (what crosses without KVPR).
        saved_bytes_per_step: bytes the share keeps off the host link in one decode step (0 on
            a CPU-only profile, where nothing crosses a link).
        added_compute_s: device seconds per decode step spent rebuilding K/V.
        step_without_s: the predicted step of the plan without recompute (share > 0 only;
            None also when no placement fits without it).
    """

    mode: RecomputeMode
    share: float
    reason: str
    activation_token_bytes: int
    kv_token_bytes: int
    saved_bytes_per_step: int = 0
    added_compute_s: float = 0.0
    step_without_s: float | None = None

    def line(self) -> str:
        """The plan's recompute line, with the engine note where a share was chosen."""
        note = f" {ENGINE_NOTE}" if self.share > 0 else ""
        return f"Recompute ({self.mode.value}): {self.reason}{note}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; ``executed``: the engine runs this share (with ``--recompute kvpr``)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return d | {"mode": self.mode.value, "executed": self.share > 0}


def recompute_choice(problem: PlanProblem, profile: HardwareProfile, result: Plan,
                     mode: RecomputeMode) -> RecomputeChoice:
    """The recompute share of ``result`` (planned for ``problem`` on ``profile``) and why.

    Args:
        problem: the problem ``result`` was planned for (``allow_recompute`` as ``mode`` says).
        profile: the hardware it was priced on.
        result: the plan.
        mode: what the planner was allowed (``--recompute``).

    Returns:
        The share, a one-sentence reason and the numbers behind it; with a share above 0 the
        plan without recompute is solved too, for its step time.
    """
    act, kv = _token_bytes(problem)
    base = RecomputeChoice(mode, result.recompute_share, "", act, kv)
    if result.recompute_share > 0:
        return _chosen(problem, profile, result, base)
    if mode == RecomputeMode.LOWRANK:
        reason = "low-rank keys are not priced by the planner yet: share 0, the plan is the one without recompute"
    elif mode == RecomputeMode.NONE:
        reason = f"share 0, pinned by --recompute none; {_compare(problem)}"
        if act < kv:
            reason += " (--recompute kvpr lets the planner price it)"
    else:
        reason = f"share 0: {_why_zero(problem, profile, result)}"
    return dataclasses.replace(base, reason=reason)


def _token_bytes(problem: PlanProblem) -> tuple[int, int]:
    """(activation bytes, stored K/V bytes) per token and layer."""
    return (problem.activation_page_bytes // problem.page_size, problem.page_bytes // problem.page_size)


def _compare(problem: PlanProblem) -> str:
    """Activations against K/V per token and layer, with both numbers and the group size."""
    act, kv = _token_bytes(problem)
    if problem.packed_page_bytes:
        kv_text = f"the K/V as stored in 4-bit pages ({kv} bytes per token and layer)"
    else:
        values = 2 * problem.num_kv_heads * problem.head_dim
        kv_text = (f"the K/V bytes (2 x {problem.num_kv_heads} KV heads x {problem.head_dim} head_dim = {values} "
                   f"values, {kv} bytes per token and layer)")
    verb = "are at least" if act >= kv else "are fewer than"
    return (f"the shipped activations (hidden_size {problem.hidden_size} values, {act} bytes per token and layer) "
            f"{verb} {kv_text}; {problem.group_size} query head{'s' if problem.group_size > 1 else ''} per KV head")


def _why_zero(problem: PlanProblem, profile: HardwareProfile, result: Plan) -> str:
    """Why the LP kept no page as activations (KVPR allowed)."""
    act, kv = _token_bytes(problem)
    if act >= kv:
        return f"{_compare(problem)}: KVPR would move more bytes, not fewer"
    host = sum(result.host_pages)
    if host == 0:
        if sum(result.disk_pages):
            return (f"no HOST pages to keep as activations: the pages off DEVICE are on DISK, and KVPR recomputes "
                    f"from HOST pages only (it would ship {act} instead of {kv} bytes per token and layer)")
        return (f"everything fits DEVICE, so no HOST pages exist to keep as activations (KVPR would ship {act} "
                f"instead of {kv} bytes per token and layer)")
    if profile.device_is_host:
        return ("a CPU-only profile moves no bytes over a link (HOST pages are attended in place): recompute "
                "would only add work")
    if sum(result.delegated_pages) >= host:
        return "every HOST page is attended on the CPU (delegated), so no K/V crosses the host link to save"
    return (f"rebuilding K/V on the device ({problem.kv_recompute_flops} flops per token and layer) costs more than the link time its {kv - act} bytes per token and layer "
            f"would save at this placement (bottleneck: {result.bottleneck})")


def _chosen(problem: PlanProblem, profile: HardwareProfile, result: Plan, base: RecomputeChoice) -> RecomputeChoice:
    """The reason of a share above 0: bytes kept off the link, compute added, step without."""
    model = CostModel(problem, profile)
    saved_s = added_s = 0.0
    for split in result.splits():
        x = split.as_tuple()
        with_, without = model.decode_legs_raw(*x), model.decode_legs_raw(*x[:4], 0.0)
        saved_s += without[Leg.HOST_TO_DEVICE] - with_[Leg.HOST_TO_DEVICE]
        added_s += with_[Leg.COMPUTE] - without[Leg.COMPUTE]
    smaller = sum(result.recomputed_pages) * (problem.page_bytes - problem.activation_page_bytes)
    moved = 0.0 if profile.device_is_host else problem.sparse_budget * problem.sparse_fetch
    saved = round(smaller * moved)
    link = (f"{saved / GiB:.2f} GiB less crosses the host link per decode step ({saved_s * 1e3:.1f} ms of link time) "
            f"for {added_s * 1e3:.1f} ms more device compute to rebuild K/V, overlapped"
            if not profile.device_is_host else
            f"{smaller / GiB:.2f} GiB less HOST memory (nothing crosses a link on a CPU-only profile) for "
            f"{added_s * 1e3:.1f} ms more compute to rebuild K/V")
    try:
        step_without: float | None = solve(dataclasses.replace(problem, allow_recompute=False), profile).decode_step_s
        than = f"step {result.decode_step_s * 1e3:.1f} ms against {step_without * 1e3:.1f} ms without recompute"
    except PlanInfeasibleError:
        step_without, than = None, "without recompute no placement fits the budgets"
    pages = result.recomputed_pages
    reason = (f"share {result.recompute_share:.1%} of pages ({min(pages)}-{max(pages)} pages per layer kept as "
              f"activations; {base.activation_token_bytes} instead of {base.kv_token_bytes} bytes per token and "
              f"layer): {link}; {than}")
    return dataclasses.replace(base, reason=reason, saved_bytes_per_step=saved, added_compute_s=added_s,
                               step_without_s=step_without)
