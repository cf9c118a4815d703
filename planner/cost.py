"""Cost model: predicted decode step and prefill time of a problem under a placement.

The shape follows FlexGen (Sheng et al. 2023): per layer, a compute time and one time per
I/O leg, each linear in the placement; the layer takes the time of its slowest chain of legs
that cannot overlap; a step is the sum over layers. Because every leg is linear and the layer
time is a max of sums of legs, the LP in ``planner.lp`` minimises exactly this model.

Legs of one decode layer (``s`` = sparse budget, ``K`` = K/V bytes of the layer over the
batch, fractions of the layer's pages: ``dev``/``host``/``disk``, of which ``deleg`` HOST
pages attended on the CPU and ``recomp`` HOST pages kept as activations)::

    compute      weights: max(weight bytes / weight-stream GB/s, 2 * params * batch / device FLOP/s)
                 + s * K * (1 - deleg) / device attention GB/s
                 (4-bit pages: K is their stored bytes and the rate the 4-bit kernel's, which
                 pays for dequantization: ``HardwareProfile.attention_4bit_gbps``)
                 + s * recomp * tokens * 2 * hidden * (2 * kv_heads * head_dim) / device FLOP/s
    cpu attn     s * K * deleg / CPU attention GB/s      (only q and (out, lse) move: neglected)
    host->device f * s * K * (host - deleg - recomp + recomp * act/kv) / pinned GB/s
                 + f * s * K * disk / pageable GB/s      (DISK pages pass a pageable staging buffer)
    disk->host   f * s * K * disk / disk read GB/s at the extent size
                 (f = sparse_fetch: pages moved per page attended, > 1 when a sparse selector
                 reads its candidate pool ahead; 1 for exact)
    writes       the step's new K/V (batch tokens) as they reach HOST and DISK
    overhead     fixed per layer (the profile's layer_overhead_s), plus piece_overhead_s for
                 each extra attention piece: the HOST pages (two pieces when only a share of
                 them is delegated) and every staged DISK chunk (extent) — in the LP the chunks
                 count linearly (f * s * disk pages / pages per extent: a sparse step's scattered
                 pages share chunks) and the HOST piece not at all
                 (an indicator is not linear); whole-page plans are priced with both exactly
    read loss    f * s * K * disk * the profile's read_interference_s_per_gb: on a CPU-only machine
                 reads and compute share cores and memory bus, and running them together takes
                 longer than the max of the two by about this much per GB read (0 on a GPU
                 machine, where the device computes); added to every path

On a CPU-only machine (``profile.device_is_host``) nothing crosses a link: HOST pages are
attended in place and DISK pages in their staging buffers, so the host->device leg is 0.

Recompute ships activations (``hidden`` bytes per token) instead of K/V
(``2 * kv_heads * head_dim`` per token): it moves fewer bytes only when
``num_heads / num_kv_heads < 2``.

Which legs overlap is ``OverlapModel``: legs the engine pipelines combine by max, legs it
serialises add up. When the problem names the engine's staging buffers (``staging_buffers``),
whole-page plans are priced by ``staged_step_s``, which lets DISK reads run ahead across
layers as far as the staging area allows (FlexGen's per-layer max, which the LP optimises,
charges a layer whose reads exceed its compute even when earlier layers left the disk idle). A prefill layer has the compute leg (matmuls and causal attention over the
prompt), the writes of its pages to HOST and DISK and the overhead, combined the same way.
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Sequence

from planner.problem import PlanProblem
from planner.profile import HardwareProfile

__all__ = ["Leg", "LayerSplit", "OverlapModel", "CostModel", "StepBreakdown"]

logger = logging.getLogger(__name__)

_TOL = 1e-9


class Leg(enum.Enum):
    COMPUTE = "device compute"
    CPU_ATTENTION = "cpu attention"
    HOST_TO_DEVICE = "host->device"
    DISK_READ = "disk->host"
    WRITE = "writes"
    OVERHEAD = "overhead"
    READ_LOSS = "read interference"


@dataclasses.dataclass(frozen=True, slots=True)
class LayerSplit:
    """Fractions of one layer's pages: ``device + host + disk = 1``; ``delegated`` and
    ``recomputed`` are shares of all pages taken from the HOST ones
    (``delegated + recomputed <= host``)."""

    device: float
    host: float
    disk: float
    delegated: float = 0.0
    recomputed: float = 0.0

    def __post_init__(self) -> None:
        for f in ("device", "host", "disk", "delegated", "recomputed"):
            if not -_TOL <= getattr(self, f) <= 1 + _TOL:
                raise ValueError(f"LayerSplit.{f} must be a fraction in [0, 1], got {getattr(self, f)!r}")
        if abs(self.device + self.host + self.disk - 1) > 1e-6:
            raise ValueError(f"LayerSplit fractions must add up to 1, got device {self.device} + host "
                             f"{self.host} + disk {self.disk}")
        if self.delegated + self.recomputed > self.host + 1e-6:
            raise ValueError(f"LayerSplit.delegated ({self.delegated}) + recomputed ({self.recomputed}) must "
                             f"be <= host ({self.host}): both are shares of the HOST pages")

    @classmethod
    def from_pages(cls, device: int, host: int, disk: int, delegated: int = 0, recomputed: int = 0) -> LayerSplit:
        total = device + host + disk
        if total < 1:
            raise ValueError(f"a layer needs at least one page, got {device}+{host}+{disk}")
        return cls(device / total, host / total, disk / total, delegated / total, recomputed / total)

    def as_tuple(self) -> tuple[float, float, float, float, float]:
        return (self.device, self.host, self.disk, self.delegated, self.recomputed)


Path = frozenset[Leg]


@dataclasses.dataclass(frozen=True, slots=True)
class OverlapModel:
    """Which legs of a layer run at the same time (max) and which one after another (sum).

    Attributes:
        io_with_compute: the fetches of a layer overlap compute (prefetch of layer l+1 during
            layer l; FlexGen's idealised pipeline). False: fetch, then compute.
        disk_with_host_link: DISK reads overlap the host->device copies. False (FlexGen): the
            disk leg is added to the host->device leg (a page is read, then copied).
        cpu_with_device: CPU-delegated attention runs beside device compute. False on a
            CPU-only machine, where both use the same cores.
        writes_with_reads: write-back runs beside the reads (PCIe is full duplex, the disk
            writer is its own thread). False: writes add to the read legs.
    """

    io_with_compute: bool = True
    disk_with_host_link: bool = False
    cpu_with_device: bool = True
    writes_with_reads: bool = True

    @classmethod
    def for_profile(cls, profile: HardwareProfile) -> OverlapModel:
        """The pipelined model, with CPU attention serial to compute on a CPU-only machine."""
        return cls(cpu_with_device=not profile.device_is_host)

    @classmethod
    def serial(cls) -> OverlapModel:
        """Every leg after the other (an engine without any overlap)."""
        return cls(False, False, False, False)

    def paths(self) -> tuple[Path, ...]:
        """The chains of legs whose sums the layer time is the max of (overhead and read
        interference in each)."""
        io = _combine([frozenset({Leg.HOST_TO_DEVICE})], [frozenset({Leg.DISK_READ})], self.disk_with_host_link)
        io = _combine(io, [frozenset({Leg.WRITE})], self.writes_with_reads)
        dev = _combine([frozenset({Leg.COMPUTE})], [frozenset({Leg.CPU_ATTENTION})], self.cpu_with_device)
        layer = _combine(dev, io, self.io_with_compute)
        return tuple(dict.fromkeys(p | {Leg.OVERHEAD, Leg.READ_LOSS} for p in layer))


def staged_step_s(model: CostModel, per_layer: list[dict[Leg, float]], chunks: list[int], buffers: int,
                  tails: Sequence[float] | None = None) -> float:
    """A decode step with DISK reads running ahead through ``buffers`` staging buffers, as the
    engine's read-ahead does (instead of each layer's reads overlapping only that layer).

    Layers run in order; layer l takes its time without DISK reads (``layer_s`` of its legs
    with the disk and read-interference legs zeroed), cannot end before its last chunk is
    read plus ``tails[l]`` (what must follow the last chunk: ``CostModel.decode_tail_s``; 0
    when not given), and then loses its read interference (what reads beside compute cost beyond the
    max of the two, measured by the profile: serial even in a layer that waits for the
    disk, since the compute also slows the readers). One reader serves
    the chunks in step order at the profile's bandwidth (layer l's disk leg split evenly over
    its ``chunks[l]`` chunks); a chunk is attended, freeing its buffer, once it is read and its
    layer has begun; chunk j may start once chunk j - buffers is freed; reads start with the
    step."""
    freed: list[float] = []  # when each chunk's buffer came back
    reader = 0.0  # when the reader is free
    t = 0.0  # when the current layer begins
    tails = [0.0] * len(per_layer) if tails is None else tails
    for legs, n, tail in zip(per_layer, chunks, tails):
        no_disk = model.layer_s({**legs, Leg.DISK_READ: 0.0, Leg.READ_LOSS: 0.0})
        last = 0.0
        for _ in range(n):
            j = len(freed)
            start = max(reader, freed[j - buffers] if j >= buffers else 0.0)
            reader = last = start + legs[Leg.DISK_READ] / n
            freed.append(max(last, t))
        t = max(t + no_disk, last + tail if n else 0.0) + legs[Leg.READ_LOSS]
    return t


def _combine(a: list[Path], b: list[Path], parallel: bool) -> list[Path]:
    """max(A, B) -> the paths of both; A + B -> every path of A joined with every path of B."""
    return a + b if parallel else [x | y for x in a for y in b]


@dataclasses.dataclass(frozen=True, slots=True)
class StepBreakdown:
    """Seconds per leg summed over layers, the step time, the slowest layer's critical path and
    its largest leg (the bottleneck)."""

    step_s: float
    leg_s: dict[Leg, float]
    critical_path: tuple[Leg, ...]
    bottleneck: Leg


class CostModel:
    """Predicted times of one problem on one profile.

    Args:
        problem: the workload.
        profile: the hardware constants.
        overlap: which legs overlap; None = ``OverlapModel.for_profile(profile)``.
    """

    def __init__(self, problem: PlanProblem, profile: HardwareProfile, overlap: OverlapModel | None = None) -> None:
        self.problem = problem
        self.profile = profile
        self.overlap = overlap or OverlapModel.for_profile(profile)
        self.paths = self.overlap.paths()

    # ----- decode -------------------------------------------------------------------------
    def decode_legs(self, split: LayerSplit) -> dict[Leg, float]:
        """Seconds of each leg of one decode layer, the attention pieces counted exactly."""
        legs = self.decode_legs_raw(*split.as_tuple())
        p, hw = self.problem, self.profile
        if hw.piece_overhead_s:
            disk_pages = self._disk_pages_read(split.disk)
            host_pieces = int(split.host - split.recomputed > 1e-12)
            if hw.device_is_host is False and 1e-12 < split.delegated < split.host - split.recomputed - 1e-12:
                host_pieces += 1  # delegated and fetched HOST pages are attended apart
            exact = host_pieces + math.ceil(disk_pages / p.pages_per_extent - 1e-9)
            linear = disk_pages / p.pages_per_extent
            legs[Leg.OVERHEAD] += hw.piece_overhead_s * (exact - linear)
        return legs

    def decode_legs_raw(self, device: float, host: float, disk: float, delegated: float,
                        recomputed: float) -> dict[Leg, float]:
        """The affine part of ``decode_legs``, without validation (the LP reads its coefficients
        from it): DISK chunks counted linearly, no HOST piece."""
        p, hw = self.problem, self.profile
        del device  # DEVICE pages cost only their attention, counted with every non-delegated page
        read = p.sparse_budget * p.kv_layer_bytes  # K/V bytes a step reads from the layer
        moved = read * p.sparse_fetch  # ... and brings from HOST or DISK per byte attended there
        tokens = p.pages_per_layer * p.page_size
        flops_s = hw.device_matmul_tflops * 1e12
        weights_s = self._decode_weights_s()
        recompute_flops = p.sparse_budget * recomputed * tokens * p.kv_recompute_flops
        act_ratio = p.activation_page_bytes / p.page_bytes
        shipped_host = host - delegated - recomputed + recomputed * act_ratio
        new_kv = p.batch_size * 2 * p.num_kv_heads * p.head_dim * p.kv_dtype_bytes  # this step's tokens
        return {
            Leg.COMPUTE: weights_s + read * (1 - delegated) / (self._attention_gbps(device=True) * 1e9)
            + recompute_flops / flops_s,
            Leg.CPU_ATTENTION: read * delegated / (self._attention_gbps(device=False) * 1e9),
            Leg.HOST_TO_DEVICE: 0.0 if hw.device_is_host else (
                moved * shipped_host / (hw.host_to_device_pinned_gbps * 1e9)
                + moved * disk / (hw.host_to_device_pageable_gbps * 1e9)),
            Leg.DISK_READ: moved * disk / (hw.disk_read_gbps(p.disk_extent_bytes) * 1e9),
            Leg.WRITE: new_kv * (host / (hw.host_to_device_pinned_gbps * 1e9)
                                 + disk / (hw.host_to_device_pageable_gbps * 1e9)
                                 + disk / (hw.disk_write_gbps * 1e9)),
            Leg.OVERHEAD: hw.layer_overhead_s + hw.piece_overhead_s * self._disk_pages_read(disk) / p.pages_per_extent,
            Leg.READ_LOSS: moved * disk * hw.read_interference_s_per_gb / 1e9,
        }

    def _disk_pages_read(self, disk: float) -> float:
        """DISK pages a step reads of a layer with this share of its pages on DISK: the sparse
        share of them (with the pool read ahead), one staging chunk per ``pages_per_extent``
        (a layer's scattered pages share chunks)."""
        p = self.problem
        return disk * p.pages_per_layer * p.sparse_budget * p.sparse_fetch

    def _decode_weights_s(self) -> float:
        """A decode layer's matrix-vector work: its share of the weights streamed, or its
        flops for the batch, whichever takes longer."""
        p, hw = self.problem, self.profile
        return max(p.weight_bytes / p.num_layers / (hw.weight_stream_gbps * 1e9),
                   2 * p.params_per_layer * p.batch_size / (hw.device_matmul_tflops * 1e12))

    def decode_tail_s(self, split: LayerSplit, chunks: int) -> float:
        """Seconds of a decode layer that cannot start before its last DISK chunk is read:
        attention over that chunk, over the pages the engine attends after the DISK ones
        (DEVICE and HOST pages, attended in place after the staged chunks), and the weights
        after attention (o projection and MLP: their share of the layer's parameters)."""
        if chunks < 1:
            return 0.0
        p = self.problem
        read = p.sparse_budget * p.kv_layer_bytes
        weights_s = self._decode_weights_s()
        post = (p.hidden_size * p.num_heads * p.head_dim + 3 * p.hidden_size * p.intermediate_size) / p.params_per_layer
        attended_after = read * ((1.0 - split.disk) + split.disk / chunks)
        return weights_s * post + attended_after / (self._attention_gbps(device=True) * 1e9)

    def _attention_gbps(self, *, device: bool) -> float:
        """Stored bytes per second that decode attention reads on the device or the CPU: the
        exact kernel's rate, or the 4-bit kernel's (dequantization included) for packed pages."""
        p, hw = self.problem, self.profile
        if p.packed_page_bytes:
            return hw.attention_4bit_gbps(device=device, stored_ratio=p.page_bytes / p.exact_page_bytes)
        return hw.device_attention_gbps if device else hw.cpu_attention_gbps

    def layer_s(self, legs: dict[Leg, float]) -> float:
        """A layer's time: the max over the overlap model's paths of the sum of their legs."""
        return max(sum(legs[leg] for leg in path) for path in self.paths)

    def decode_step_s(self, splits: Sequence[LayerSplit]) -> float:
        """Predicted seconds of one decode step (one token for each sequence of the batch).

        Args:
            splits: one per layer (``problem.num_layers`` of them).
        """
        return self.decode_breakdown(splits).step_s

    def decode_breakdown(self, splits: Sequence[LayerSplit]) -> StepBreakdown:
        self._check_layers(splits)
        per_layer = [self.decode_legs(s) for s in splits]
        out = self._breakdown(per_layer)
        if self.problem.staging_buffers and self.overlap.io_with_compute and out.leg_s[Leg.DISK_READ] > 0:
            chunks = [math.ceil(s.disk * self.problem.pages_per_layer / self.problem.pages_per_extent - 1e-9)
                      for s in splits]
            tails = [self.decode_tail_s(s, n) for s, n in zip(splits, chunks)]
            step = staged_step_s(self, per_layer, chunks, self.problem.staging_buffers, tails)
            out = dataclasses.replace(out, step_s=step)
        return out

    # ----- prefill ------------------------------------------------------------------------
    def prefill_legs(self, split: LayerSplit) -> dict[Leg, float]:
        """Seconds of each leg of one prefill layer over the whole prompt (all sequences)."""
        p, hw = self.problem, self.profile
        flops_s = hw.device_matmul_tflops * 1e12
        tokens = p.batch_size * p.context_tokens
        # Causal attention: QK^T and PV over half of the T x T scores, per query head.
        attn_flops = p.batch_size * 2 * p.context_tokens**2 * p.num_heads * p.head_dim
        compute = max(p.weight_bytes / p.num_layers / (hw.weight_stream_gbps * 1e9),
                      2 * p.params_per_layer * tokens / flops_s) + attn_flops / flops_s
        act_ratio = p.activation_page_bytes / p.page_bytes
        to_host = p.kv_layer_bytes * (split.host - split.recomputed + split.recomputed * act_ratio)
        to_disk = p.kv_layer_bytes * split.disk
        writes = (to_host / (hw.host_to_device_pinned_gbps * 1e9) + to_disk / (hw.host_to_device_pageable_gbps * 1e9)
                  + to_disk / (hw.disk_write_gbps * 1e9))
        legs = dict.fromkeys(Leg, 0.0)
        legs.update({Leg.COMPUTE: compute, Leg.WRITE: writes, Leg.OVERHEAD: hw.layer_overhead_s})  # no reads
        return legs

    def prefill_s(self, splits: Sequence[LayerSplit]) -> float:
        """Predicted seconds of the prefill of the whole context under the placement."""
        self._check_layers(splits)
        return sum(self.layer_s(self.prefill_legs(s)) for s in splits)

    # ----- helpers ------------------------------------------------------------------------
    def _check_layers(self, splits: Sequence[LayerSplit]) -> None:
        if len(splits) != self.problem.num_layers:
            raise ValueError(f"splits must hold one LayerSplit per layer ({self.problem.num_layers}), "
                             f"got {len(splits)}")

    def _breakdown(self, per_layer: list[dict[Leg, float]]) -> StepBreakdown:
        totals = dict.fromkeys(Leg, 0.0)
        for legs in per_layer:
            for leg, t in legs.items():
                totals[leg] += t
        times = [self.layer_s(legs) for legs in per_layer]
        slowest = per_layer[max(range(len(times)), key=times.__getitem__)]
        path = max(self.paths, key=lambda pa: sum(slowest[leg] for leg in pa))
        candidates = [leg for leg in Leg if leg in path and leg not in (Leg.OVERHEAD, Leg.READ_LOSS)]
        bottleneck = max(candidates, key=lambda leg: slowest[leg])
        # Legs of zero time are left out of the path (an unused tier's leg explains nothing).
        ordered = tuple(leg for leg in Leg if leg in path and slowest[leg] > 0) or (bottleneck,)
        return StepBreakdown(sum(times), totals, ordered, bottleneck)
