"""Hardware profile: the measured (or preset) constants of the planner's cost model.

A ``HardwareProfile`` is plain data. ``offload profile`` measures one on the running machine
(that code lives in ``offload/``, which needs torch); named presets let a plan for a GPU be
made on a machine without one. Profiles round-trip through JSON with a format version, so a
profile saved by an older layout is refused instead of misread.

Units: bandwidths in GB/s (1e9 bytes per second), matmul rates in TFLOP/s (1e12), sizes in
bytes, times in seconds.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable
from typing import Any

__all__ = ["HardwareProfile", "PROFILE_FORMAT_VERSION", "PRESET_NAMES"]

logger = logging.getLogger(__name__)

PROFILE_FORMAT_VERSION = 2  # 2: read_interference_s_per_gb
GiB = 2**30
KiB = 2**10
MiB = 2**20


@dataclasses.dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Throughputs and free memory of one machine.

    Attributes:
        name: where the numbers come from ('measured on <host>', a preset name).
        host_to_device_pinned_gbps: copy bandwidth between pinned host memory and the device
            (both directions are taken as equal). On a CPU-only machine: memcpy.
        host_to_device_pageable_gbps: the same from pageable (not pinned) host memory, the
            path of DISK staging buffers.
        disk_read_gbps_by_extent: cold (O_DIRECT) sequential read bandwidth by extent size,
            ``((extent_bytes, gbps), ...)`` with strictly increasing extent sizes.
        disk_write_gbps: sustained write bandwidth (with the data reaching the disk).
        cpu_attention_gbps: K/V bytes per second that the CPU attention kernel reads.
        device_attention_gbps: K/V bytes per second that the device attention kernel reads;
            also the rate at which a decode step streams the layer weights.
        device_matmul_tflops / cpu_matmul_tflops: dense matmul throughput.
        device_free_bytes / host_free_bytes / disk_free_bytes: free memory per tier, the
            budgets a problem uses when it names none.
        device_is_host: True on a CPU-only machine (DEVICE is a RAM budget): the "device" and
            the CPU share the same cores, so CPU attention cannot run beside device compute.
        layer_overhead_s: fixed time per layer and step (launches, Python), 0 when unmeasured.
        weights_gbps: the rate at which a decode step streams the layer weights (one token's
            matrix-vector products); None = ``device_attention_gbps``.
        piece_overhead_s: fixed time of each extra tier a layer's pages span in one decode step
            (one more attention call, its merge, a staged chunk's hand-over), 0 when unmeasured.
        read_interference_s_per_gb: seconds a step loses per GB of DISK reads running beside
            compute, beyond the max of the two (a CPU-only machine's readers and compute share
            cores and memory bus); 0 when unmeasured and on GPU machines, whose device computes.
        cpu_attention_4bit_gbps / device_attention_4bit_gbps: stored bytes per second (codes,
            scales and mins) that the fused 4-bit kernels read, dequantization included; None
            when unmeasured: the planner then prices a 4-bit page as the exact kernel over the
            full-precision page it stands for (``attention_4bit_gbps``).
    """

    name: str
    host_to_device_pinned_gbps: float
    host_to_device_pageable_gbps: float
    disk_read_gbps_by_extent: tuple[tuple[int, float], ...]
    disk_write_gbps: float
    cpu_attention_gbps: float
    device_attention_gbps: float
    device_matmul_tflops: float
    cpu_matmul_tflops: float
    device_free_bytes: int
    host_free_bytes: int
    disk_free_bytes: int
    device_is_host: bool = False
    layer_overhead_s: float = 0.0
    weights_gbps: float | None = None
    piece_overhead_s: float = 0.0
    read_interference_s_per_gb: float = 0.0
    cpu_attention_4bit_gbps: float | None = None
    device_attention_4bit_gbps: float | None = None

    def __post_init__(self) -> None:
        for f in ("host_to_device_pinned_gbps", "host_to_device_pageable_gbps", "disk_write_gbps",
                  "cpu_attention_gbps", "device_attention_gbps", "device_matmul_tflops", "cpu_matmul_tflops"):
            value = getattr(self, f)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareProfile.{f} must be a finite number > 0, got {value!r}")
        for f in ("device_free_bytes", "host_free_bytes", "disk_free_bytes"):
            value = getattr(self, f)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"HardwareProfile.{f} must be an int >= 0, got {value!r}")
        for f in ("weights_gbps", "cpu_attention_4bit_gbps", "device_attention_4bit_gbps"):
            value = getattr(self, f)
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareProfile.{f} must be a finite number > 0 or None, got {value!r}")
        for f in ("layer_overhead_s", "piece_overhead_s", "read_interference_s_per_gb"):
            if not (math.isfinite(getattr(self, f)) and getattr(self, f) >= 0):
                raise ValueError(f"HardwareProfile.{f} must be >= 0, got {getattr(self, f)!r}")
        table = self.disk_read_gbps_by_extent
        if not table:
            raise ValueError("HardwareProfile.disk_read_gbps_by_extent is empty; give at least one "
                             "(extent_bytes, gbps) pair")
        for i, (extent, gbps) in enumerate(table):
            if extent < 1 or not (math.isfinite(gbps) and gbps > 0):
                raise ValueError(f"HardwareProfile.disk_read_gbps_by_extent[{i}] = {(extent, gbps)!r}: "
                                 "extent must be >= 1 byte and gbps a finite number > 0")
            if i and extent <= table[i - 1][0]:
                raise ValueError("HardwareProfile.disk_read_gbps_by_extent must have strictly increasing "
                                 f"extent sizes, got {[e for e, _ in table]}")

    @property
    def weight_stream_gbps(self) -> float:
        """``weights_gbps``, or ``device_attention_gbps`` when it was not measured."""
        return self.device_attention_gbps if self.weights_gbps is None else self.weights_gbps

    def attention_4bit_gbps(self, *, device: bool, stored_ratio: float) -> float:
        """Stored bytes per second of the 4-bit kernel (``device``: the device's, else the
        CPU's); when unmeasured, the exact kernel's rate times ``stored_ratio`` (a 4-bit page's
        bytes over the full-precision page's): the same time as attending the exact page."""
        measured = self.device_attention_4bit_gbps if device else self.cpu_attention_4bit_gbps
        if measured is not None:
            return measured
        return (self.device_attention_gbps if device else self.cpu_attention_gbps) * stored_ratio

    def disk_read_gbps(self, extent_bytes: int) -> float:
        """Cold read bandwidth at an extent size: linear in log2(extent) between the measured
        points, clamped to the first and last point outside them."""
        table = self.disk_read_gbps_by_extent
        if extent_bytes <= table[0][0]:
            return table[0][1]
        if extent_bytes >= table[-1][0]:
            return table[-1][1]
        for (e0, g0), (e1, g1) in zip(table, table[1:]):
            if e0 <= extent_bytes <= e1:
                w = (math.log2(extent_bytes) - math.log2(e0)) / (math.log2(e1) - math.log2(e0))
                return g0 + w * (g1 - g0)
        raise AssertionError("unreachable: the table is sorted")

    # ----- JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["disk_read_gbps_by_extent"] = [list(p) for p in self.disk_read_gbps_by_extent]
        return {"format_version": PROFILE_FORMAT_VERSION, **d}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HardwareProfile:
        """Raises:
            ValueError: another format version, missing or unknown keys, or bad values."""
        version = d.get("format_version")
        if version != PROFILE_FORMAT_VERSION:
            raise ValueError(f"hardware profile format_version is {version!r}, this planner reads "
                             f"{PROFILE_FORMAT_VERSION}; measure it again (offload profile --refresh)")
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        keys = set(d) - {"format_version"}
        if keys - names or required - keys:
            raise ValueError(f"hardware profile keys do not match: unknown {sorted(keys - names)}, "
                             f"missing {sorted(required - keys)}")
        fields = {k: d[k] for k in keys}
        fields["disk_read_gbps_by_extent"] = tuple((int(e), float(g)) for e, g in d["disk_read_gbps_by_extent"])
        return cls(**fields)

    @classmethod
    def from_json(cls, text: str) -> HardwareProfile:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"hardware profile is not JSON: {e}") from None
        if not isinstance(d, dict):
            raise ValueError("hardware profile JSON must be an object")
        return cls.from_dict(d)

    @classmethod
    def preset(cls, name: str) -> HardwareProfile:
        """A named preset (``PRESET_NAMES``): typical published figures, documented per preset.

        Raises:
            ValueError: unknown name.
        """
        try:
            return _PRESETS[name]()
        except KeyError:
            raise ValueError(f"unknown hardware preset {name!r}; use one of {', '.join(PRESET_NAMES)} "
                             "or a profile file measured by `offload profile`") from None


def _cpu_2core() -> HardwareProfile:
    """This project's CPU-only machine (2 cores, 24 GiB RAM, virtual disk), from
    MACHINE-NOTES.md: memcpy ~10.5 GB/s (used for both host<->device paths: pinned memory
    does not exist without a GPU); O_DIRECT reads 0.9 GB/s at 64 KiB (13-14K IOPS, 1 thread),
    1.3-1.4 GB/s at 1 MiB, 1.7 GB/s sequential at 4 MiB (2.3 GB/s peak with 4 threads);
    write + fsync 0.4-2.3 GB/s (1.0 taken); Numba page attention ~25 GB/s read on both
    "tiers" (the same cores); fp32 matmul ~0.1 TFLOP/s (2 AVX2 cores). Free bytes: a 6 GiB
    DEVICE RAM budget, 8 GiB HOST, 40 GiB disk (the 24 GiB of RAM hold both RAM tiers and
    the model). Reads beside compute: 0.07-0.14 s lost per GB read (``offload profile``, three
    full runs; 0.1 taken). The fused 4-bit kernel reads 0.6 GB/s of 4-bit pages as stored
    (three probe runs, 256 MiB of fp32 pages quantized: 0.61-0.63), about a third of the exact
    kernel's speed per token. Measured numbers vary 10-35% between runs on these shared machines."""
    return HardwareProfile(
        name="cpu-2core", host_to_device_pinned_gbps=10.0, host_to_device_pageable_gbps=10.0,
        disk_read_gbps_by_extent=((64 * KiB, 0.9), (MiB, 1.35), (4 * MiB, 1.7)),
        disk_write_gbps=1.0, cpu_attention_gbps=25.0, device_attention_gbps=25.0,
        device_matmul_tflops=0.1, cpu_matmul_tflops=0.1, device_free_bytes=6 * GiB,
        host_free_bytes=8 * GiB, disk_free_bytes=40 * GiB, device_is_host=True, read_interference_s_per_gb=0.1,
        cpu_attention_4bit_gbps=0.6, device_attention_4bit_gbps=0.6)


def _rtx4090_pcie4() -> HardwareProfile:
    """A 24 GB consumer GPU on PCIe 4.0 x16 (typical published figures): RTX 4090 GDDR6X
    ~1 TB/s (1008 GB/s peak; 850 GB/s taken as achieved by attention and weight reads),
    ~165 TFLOP/s dense bf16 with fp32 accumulation; PCIe 4.0 x16 32 GB/s raw, ~25 GB/s
    pinned and ~12 GB/s pageable copies; PCIe 4.0 NVMe ~7 GB/s sequential reads at >= 4 MiB
    (~5.5 GB/s at 1 MiB, ~2 GB/s at 64 KiB), ~5 GB/s writes; desktop dual-channel DDR5
    host: CPU attention ~40 GB/s, ~1 TFLOP/s matmul. Free bytes: 22 GiB of the 24 GB card
    after the CUDA context, 64 GiB host, 1 TiB disk (assumptions: pass real budgets)."""
    return HardwareProfile(
        name="rtx4090-pcie4", host_to_device_pinned_gbps=25.0, host_to_device_pageable_gbps=12.0,
        disk_read_gbps_by_extent=((64 * KiB, 2.0), (MiB, 5.5), (4 * MiB, 7.0)),
        disk_write_gbps=5.0, cpu_attention_gbps=40.0, device_attention_gbps=850.0,
        device_matmul_tflops=165.0, cpu_matmul_tflops=1.0, device_free_bytes=22 * GiB,
        host_free_bytes=64 * GiB, disk_free_bytes=1024 * GiB)


def _h100(name: str, hbm_gbps: float, tflops: float) -> HardwareProfile:
    return HardwareProfile(
        name=name, host_to_device_pinned_gbps=50.0, host_to_device_pageable_gbps=20.0,
        disk_read_gbps_by_extent=((64 * KiB, 2.5), (MiB, 6.0), (4 * MiB, 7.0)),
        disk_write_gbps=5.0, cpu_attention_gbps=100.0, device_attention_gbps=hbm_gbps,
        device_matmul_tflops=tflops, cpu_matmul_tflops=3.0, device_free_bytes=78 * GiB,
        host_free_bytes=256 * GiB, disk_free_bytes=2048 * GiB)


def _h100_pcie5() -> HardwareProfile:
    """H100 PCIe card, 80 GB (typical published figures): HBM2e 2.0 TB/s peak (1.7 TB/s taken
    as achieved), ~756 TFLOP/s dense bf16; PCIe 5.0 x16 64 GB/s raw, ~50 GB/s pinned and
    ~20 GB/s pageable copies; data-center PCIe 4.0 NVMe ~7 GB/s reads at >= 4 MiB, ~5 GB/s
    writes; server DDR5 host: CPU attention ~100 GB/s, ~3 TFLOP/s matmul. Free bytes:
    78 GiB device, 256 GiB host, 2 TiB disk (assumptions: pass real budgets)."""
    return _h100("h100-pcie5", hbm_gbps=1700.0, tflops=756.0)


def _h100_sxm() -> HardwareProfile:
    """H100 SXM5, 80 GB (typical published figures): HBM3 3.35 TB/s peak (2.9 TB/s taken as
    achieved), ~989 TFLOP/s dense bf16; host link PCIe 5.0 x16 (~50 GB/s pinned, ~20 GB/s
    pageable); NVMe, host CPU and free bytes as ``h100-pcie5``."""
    return _h100("h100-sxm", hbm_gbps=2900.0, tflops=989.0)


_PRESETS: dict[str, Callable[[], HardwareProfile]] = {
    "cpu-2core": _cpu_2core,
    "rtx4090-pcie4": _rtx4090_pcie4,
    "h100-pcie5": _h100_pcie5,
    "h100-sxm": _h100_sxm,
}
PRESET_NAMES: tuple[str, ...] = tuple(_PRESETS)
