"""The planning problem (frozen inputs), tier capacities and the infeasibility diagnosis.

Everything here is plain numbers: the model shape is given as ints (the planner never
imports the runtime's ``ModelConfig``), so ``offload`` maps its config onto a ``PlanProblem``.

Capacities, with ``slack`` (0.8) of every budget usable::

    DEVICE: weights + working buffers + rings of all layers + KV on DEVICE <= slack * device budget
    HOST:   staging buffers + KV on HOST (activations for recomputed pages) <= slack * host budget
    DISK:   KV on DISK                                                       <= slack * disk budget
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math

from planner.profile import HardwareProfile

__all__ = ["Tier", "PlanProblem", "PlanInfeasibleError", "Capacity", "capacity", "check_feasible", "layer_params"]

logger = logging.getLogger(__name__)

GiB = 2**30


class Tier(enum.Enum):
    """Where a KV page lives (same names and values as ``storage.Tier``)."""

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class PlanInfeasibleError(ValueError):
    """No placement fits the budgets. The message names every violated constraint with its
    shortfall and the smallest budget that would work; ``violations`` lists them."""

    def __init__(self, violations: list[str]) -> None:
        self.violations = tuple(violations)
        super().__init__("no placement fits the budgets: " + "; ".join(violations))


@dataclasses.dataclass(frozen=True, slots=True)
class PlanProblem:
    """One decode workload to place.

    Attributes:
        num_layers, num_heads, num_kv_heads, head_dim, hidden_size, intermediate_size: the
            model shape (query heads ``h * group + j`` share KV head ``h``).
        context_tokens: tokens of context per sequence.
        weight_bytes: bytes of the model weights (all on DEVICE).
        batch_size: sequences decoded together.
        page_size: tokens per KV page.
        kv_dtype_bytes: bytes per K/V element (also used for shipped activations).
        device_budget_bytes / host_budget_bytes / disk_budget_bytes: budgets per tier; None
            takes the profile's free bytes; 0 means no such tier.
        slack: usable share of every budget.
        device_working_bytes: DEVICE bytes for activations, the question's scratch pages,
            fetched-page buffers and tails.
        host_staging_bytes: HOST bytes for DISK read staging and write buffers.
        ring_bytes_per_layer: fixed DEVICE bytes per layer (sliding-window rings).
        disk_extent_bytes: size of one DISK read (picks the disk bandwidth).
        num_layer_groups: the LP gives each group of consecutive layers its own split.
        allow_delegation: HOST pages may be attended on the CPU (FlexGen's CPU delegation).
        allow_recompute: HOST may keep activations instead of K/V for some pages; K/V are
            recomputed on the device from the shipped activations.
        activations_in_kv_slots: an activation page takes a whole K/V page of HOST memory (the
            engine's layout, ``offload.kv.kvpr``): only the bytes moved shrink, not the HOST held.
        sparse_budget: share of the pages a step reads (1.0 = exact attention).
        sparse_fetch: pages brought from HOST or DISK per page a sparse step attends there
            (> 1 when a selector reads a candidate pool ahead and attends part of it: Quest's
            pool, ``offload.attention.quest.pool_fetch_ratio``); 1 for exact attention.
        metadata_bytes_per_layer: DEVICE bytes per layer of page metadata a sparse step scores
            (key bounds), held on DEVICE whatever the pages' tiers.
        staging_buffers: DISK read staging buffers of one extent each (the engine's read-ahead
            depth); 0 = price each layer's reads against that layer only (FlexGen's model).
        packed_page_bytes: bytes of one page as stored when the placed pages are 4-bit
            (codes, scales and mins); None prices exact pages of ``kv_dtype_bytes``.
    """

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    context_tokens: int
    weight_bytes: int
    batch_size: int = 1
    page_size: int = 32
    kv_dtype_bytes: int = 2
    device_budget_bytes: int | None = None
    host_budget_bytes: int | None = None
    disk_budget_bytes: int | None = None
    slack: float = 0.8
    device_working_bytes: int = 0
    host_staging_bytes: int = 0
    ring_bytes_per_layer: int = 0
    disk_extent_bytes: int = 2 * 2**20
    num_layer_groups: int = 1
    allow_delegation: bool = True
    allow_recompute: bool = False
    activations_in_kv_slots: bool = False
    sparse_budget: float = 1.0
    staging_buffers: int = 0
    sparse_fetch: float = 1.0
    metadata_bytes_per_layer: int = 0
    packed_page_bytes: int | None = None

    def __post_init__(self) -> None:
        for f in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size", "intermediate_size",
                  "context_tokens", "batch_size", "page_size", "kv_dtype_bytes", "disk_extent_bytes",
                  "num_layer_groups"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                raise ValueError(f"PlanProblem.{f} must be an int >= 1, got {getattr(self, f)!r}")
        if not isinstance(self.staging_buffers, int) or self.staging_buffers < 0:
            raise ValueError(f"PlanProblem.staging_buffers must be an int >= 0, got {self.staging_buffers!r}")
        for f in ("weight_bytes", "device_working_bytes", "host_staging_bytes", "ring_bytes_per_layer",
                  "metadata_bytes_per_layer", "device_budget_bytes", "host_budget_bytes", "disk_budget_bytes",
                  "packed_page_bytes"):
            value = getattr(self, f)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"PlanProblem.{f} must be an int >= 0{' or None' if 'budget' in f else ''}, "
                                 f"got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"PlanProblem.num_heads ({self.num_heads}) must be a multiple of "
                             f"num_kv_heads ({self.num_kv_heads})")
        if not 0 < self.slack <= 1:
            raise ValueError(f"PlanProblem.slack must be in (0, 1], got {self.slack!r}")
        if not 0 < self.sparse_budget <= 1:
            raise ValueError(f"PlanProblem.sparse_budget must be in (0, 1], got {self.sparse_budget!r}")
        if not 1 <= self.sparse_fetch <= 1 / self.sparse_budget:
            raise ValueError(f"PlanProblem.sparse_fetch must be in [1, 1 / sparse_budget], got {self.sparse_fetch!r}")
        if self.num_layer_groups > self.num_layers:
            raise ValueError(f"PlanProblem.num_layer_groups ({self.num_layer_groups}) must be <= "
                             f"num_layers ({self.num_layers})")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def pages_per_layer(self) -> int:
        """KV pages of one layer over the batch (a partial last page counts as a page)."""
        return self.batch_size * -(-self.context_tokens // self.page_size)

    @property
    def page_bytes(self) -> int:
        """Bytes of one page as stored: K and V, all KV heads (4-bit pages: ``packed_page_bytes``)."""
        return self.packed_page_bytes or self.exact_page_bytes

    @property
    def exact_page_bytes(self) -> int:
        """Bytes of one full-precision page (``kv_dtype_bytes`` per K/V element)."""
        return 2 * self.num_kv_heads * self.page_size * self.head_dim * self.kv_dtype_bytes

    @property
    def pages_per_extent(self) -> int:
        """Pages one DISK read (and one staged chunk) holds."""
        return max(1, self.disk_extent_bytes // self.page_bytes)

    @property
    def activation_page_bytes(self) -> int:
        """Bytes of the layer inputs of one page's tokens (what recompute keeps instead)."""
        return self.page_size * self.hidden_size * self.kv_dtype_bytes

    @property
    def activation_stored_bytes(self) -> int:
        """HOST bytes one recomputed page holds (``activations_in_kv_slots``: a K/V page's)."""
        return self.page_bytes if self.activations_in_kv_slots else self.activation_page_bytes

    @property
    def kv_layer_bytes(self) -> int:
        return self.pages_per_layer * self.page_bytes

    @property
    def kv_bytes(self) -> int:
        """KV size: pages * page bytes over all layers."""
        return self.num_layers * self.kv_layer_bytes

    @property
    def params_per_layer(self) -> int:
        """Matmul parameters of one layer (``layer_params``)."""
        return layer_params(self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim, self.intermediate_size)

    @property
    def kv_recompute_flops(self) -> int:
        """FLOPs that rebuild one token's K and V of a layer from its input (KVPR)."""
        return 2 * self.hidden_size * 2 * self.num_kv_heads * self.head_dim

    @property
    def device_fixed_bytes(self) -> int:
        return (self.weight_bytes + self.device_working_bytes
                + (self.ring_bytes_per_layer + self.metadata_bytes_per_layer) * self.num_layers)

    def layer_groups(self) -> list[range]:
        """Consecutive layer ranges, as even as possible."""
        edges = [round(i * self.num_layers / self.num_layer_groups) for i in range(self.num_layer_groups + 1)]
        return [range(a, b) for a, b in zip(edges, edges[1:])]


@dataclasses.dataclass(frozen=True, slots=True)
class Capacity:
    """Budgets resolved against a profile, and the bytes left for KV on each tier (may be
    negative when the fixed reservations alone do not fit)."""

    budget_bytes: dict[Tier, int]
    room_bytes: dict[Tier, float]


def capacity(problem: PlanProblem, profile: HardwareProfile) -> Capacity:
    """The budgets (problem's, else the profile's free bytes) and the KV room per tier."""
    budgets = {
        Tier.DEVICE: _or(problem.device_budget_bytes, profile.device_free_bytes),
        Tier.HOST: _or(problem.host_budget_bytes, profile.host_free_bytes),
        Tier.DISK: _or(problem.disk_budget_bytes, profile.disk_free_bytes),
    }
    fixed = {Tier.DEVICE: problem.device_fixed_bytes, Tier.HOST: problem.host_staging_bytes, Tier.DISK: 0}
    return Capacity(budgets, {t: problem.slack * budgets[t] - fixed[t] for t in Tier})


def layer_params(hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, intermediate_size: int) -> int:
    """Matmul parameters of one layer: q, o, k, v projections and a gated MLP."""
    attn = 2 * hidden_size * num_heads * head_dim
    kv = 2 * hidden_size * num_kv_heads * head_dim
    return attn + kv + 3 * hidden_size * intermediate_size


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def host_bytes_per_kv_byte(problem: PlanProblem) -> float:
    """Least HOST bytes needed per byte of K/V (activations when recompute stores less)."""
    ratio = problem.activation_stored_bytes / problem.page_bytes
    return min(1.0, ratio) if problem.allow_recompute else 1.0


def check_feasible(problem: PlanProblem, profile: HardwareProfile) -> Capacity:
    """The capacity, after checking that some placement can fit.

    Raises:
        PlanInfeasibleError: naming each violated constraint, its shortfall and the smallest
            budget that works with the other budgets as given.
    """
    cap = capacity(problem, profile)
    found = (_fixed_violation(problem, cap, Tier.DEVICE), _fixed_violation(problem, cap, Tier.HOST),
             _kv_violation(problem, cap))
    violations = [v for v in found if v]
    if violations:
        raise PlanInfeasibleError(violations)
    return cap


def _fixed_violation(problem: PlanProblem, cap: Capacity, tier: Tier) -> str | None:
    """The message of a tier whose fixed reservations alone exceed slack * budget."""
    if cap.room_bytes[tier] >= 0:
        return None
    if tier == Tier.DEVICE:
        parts = [f"weights {_gib(problem.weight_bytes)}"]
        if problem.device_working_bytes:
            parts.append(f"working buffers {_gib(problem.device_working_bytes)}")
        if problem.ring_bytes_per_layer:
            parts.append(f"rings {_gib(problem.ring_bytes_per_layer * problem.num_layers)}")
        if problem.metadata_bytes_per_layer:
            parts.append(f"key bounds {_gib(problem.metadata_bytes_per_layer * problem.num_layers)}")
    else:
        parts = [f"staging buffers {_gib(problem.host_staging_bytes)}"]
    need = _smallest_budgets(problem, cap).get(tier)
    fix = (f"smallest {tier.value} budget that works: {_gib_up(need)}" if need is not None
           else f"raising the {tier.value} budget alone is not enough")
    return (f"{tier.value}: {' + '.join(parts)} > {problem.slack:g} x {_gib(cap.budget_bytes[tier])} "
            f"{tier.value} (short by {_gib(-cap.room_bytes[tier])}); {fix}")


def _kv_violation(problem: PlanProblem, cap: Capacity) -> str | None:
    """The message when the tiers' rooms together cannot hold the KV cache."""
    room = {t: max(0.0, r) for t, r in cap.room_bytes.items()}
    storable = room[Tier.DEVICE] + room[Tier.HOST] / host_bytes_per_kv_byte(problem) + room[Tier.DISK]
    if problem.kv_bytes <= storable:
        return None
    smallest = _smallest_budgets(problem, cap)
    fix = (" or ".join(f"{t.value} {_gib_up(b)}" for t, b in smallest.items()) if smallest
           else "none alone (several tiers are short)")
    return (f"KV cache {_gib(problem.kv_bytes)} > room for KV {_gib(room[Tier.DEVICE])} device + "
            f"{_gib(room[Tier.HOST])} host + {_gib(room[Tier.DISK])} disk (after {problem.slack:g} slack; "
            f"short by {_gib(problem.kv_bytes - storable)}); smallest budget that works with the others "
            f"as given: {fix}")


def _smallest_budgets(problem: PlanProblem, cap: Capacity) -> dict[Tier, int]:
    """For each tier whose budget alone can make every constraint hold (the others unchanged),
    the smallest such budget in bytes."""
    host_ratio = host_bytes_per_kv_byte(problem)
    room = {t: max(0.0, r) for t, r in cap.room_bytes.items()}
    fixed = {Tier.DEVICE: problem.device_fixed_bytes, Tier.HOST: problem.host_staging_bytes, Tier.DISK: 0}
    out: dict[Tier, int] = {}
    for tier in Tier:
        if any(cap.room_bytes[t] < 0 for t in Tier if t != tier):
            continue
        kv_elsewhere = sum(room[t] / (host_ratio if t == Tier.HOST else 1.0) for t in Tier if t != tier)
        missing_kv = max(0.0, problem.kv_bytes - kv_elsewhere)
        if missing_kv:  # one more page per layer absorbs the rounding to whole pages
            missing_kv += problem.num_layers * problem.page_bytes
        need = fixed[tier] + missing_kv * (host_ratio if tier == Tier.HOST else 1.0)
        out[tier] = math.ceil(need / problem.slack)
    return out


def _gib(num_bytes: float) -> str:
    """'15.0 GiB' (MiB below 1 GiB)."""
    if abs(num_bytes) < GiB:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / GiB:.1f} GiB"


def _gib_up(num_bytes: float) -> str:
    """Like ``_gib``, rounded up to the printed digit so the printed budget is enough."""
    unit, name = (GiB, "GiB") if num_bytes >= GiB else (2**20, "MiB")
    return f"{math.ceil(num_bytes / unit * 10 - 1e-9) / 10:.1f} {name}"
