"""`offload profile`: measure the planner's ``HardwareProfile`` on this machine and cache it.

    offload profile                  # measure once (5-10 s on a 2-core CPU), print a table
    offload profile --json           # the saved (or fresh) profile as JSON on stdout
    offload profile --quick          # small sizes, one repeat (a few seconds)
    offload profile --refresh        # measure again even if a saved profile exists

Each constant comes from real work of the kind the cost model (``planner.cost``) charges for:
memory copies, cold disk reads by extent size, page attention, a decode step's matrix-vector
products, dense matmul and the per-layer overhead of the real engine (``offload.tuning.profile_probes``
and ``offload.tuning.engine_probe`` hold the probes). The profile is saved as JSON under
``<cache dir>/profiles/`` in a file named after the machine (``offload.tuning.profile_store``),
written atomically; ``load_or_measure`` reuses it while it parses and fits the request (a
profile measured with ``--quick`` is only reused by quick requests), and measures again
otherwise.

The engine never measures (``Engine.hardware_profile`` only reads a saved profile or takes a
preset): the entry points that build an engine which may spill (``LongDocQA``, the CLI) call
``profile_for`` first, so a missing profile is measured once per machine, announced, before
any engine exists.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from offload.config import RuntimeConfig, parse_dtype
from offload.errors import OffloadError
from offload.model.model_source import default_cache_dir, ensure_cache_dir
from offload.tuning import engine_probe
from offload.tuning import profile_probes as probes
from offload.tuning.profile_store import (QUICK_SUFFIX, is_quick, load_profile, profile_path, resolve_target,
                                          save_profile)
from planner.profile import HardwareProfile

__all__ = ["measure_profile", "load_or_measure", "profile_for", "MEASURE_NOTICE", "format_table", "build_parser",
           "main"]

logger = logging.getLogger(__name__)

KiB, MiB, GiB = 2**10, 2**20, 2**30
MEASURE_NOTICE = ("offload: no hardware profile is saved for this machine; measuring one now (a few seconds, "
                  "once per machine; `offload profile` measures a full one)")
"""The line ``profile_for`` prints on stderr before it measures."""

DISK_EXTENTS = (64 * KiB, MiB, 4 * MiB)
H2D_SIZES = (64 * KiB, MiB, 16 * MiB, 64 * MiB)


@dataclasses.dataclass(frozen=True, slots=True)
class _Sizes:
    """Working sets (bytes) and repeats of one measuring mode."""

    repeats: int
    copy_bytes: int
    disk_file_bytes: int
    disk_read_bytes: int
    cpu_attention_bytes: int
    device_attention_bytes: int
    cpu_weights_bytes: int
    device_weights_bytes: int
    overhead_steps: int


_FULL = _Sizes(repeats=7, copy_bytes=64 * MiB, disk_file_bytes=256 * MiB, disk_read_bytes=128 * MiB,
               cpu_attention_bytes=256 * MiB, device_attention_bytes=GiB, cpu_weights_bytes=256 * MiB,
               device_weights_bytes=GiB, overhead_steps=50)
_QUICK = _Sizes(repeats=1, copy_bytes=64 * MiB, disk_file_bytes=32 * MiB, disk_read_bytes=32 * MiB,
                cpu_attention_bytes=32 * MiB, device_attention_bytes=256 * MiB, cpu_weights_bytes=32 * MiB,
                device_weights_bytes=256 * MiB, overhead_steps=20)


@dataclasses.dataclass
class _Run:
    """One measuring run: its target, sizes and what the steps found so far."""

    device: torch.device
    dtype: torch.dtype
    kv_dir: Path
    sizes: _Sizes
    found: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


# ----- the steps ---------------------------------------------------------------------------------
def _step_copies(run: _Run) -> str:
    s, f = run.sizes, run.found
    if not run.is_cuda:
        f["pinned"] = f["pageable"] = probes.copy_gbps(s.copy_bytes, s.repeats)
        return f"memcpy {f['pinned']:.2f} GB/s ({s.copy_bytes // MiB} MiB)"
    for kind, pinned in (("pinned", True), ("pageable", False)):
        f[f"{kind}_by_size"] = probes.host_to_device_gbps(run.device, H2D_SIZES, s.repeats, pinned=pinned)
        f[kind] = f[f"{kind}_by_size"][H2D_SIZES[-1]]
    return f"pinned {f['pinned']:.1f} GB/s, pageable {f['pageable']:.1f} GB/s at {H2D_SIZES[-1] // MiB} MiB"


def _step_disk(run: _Run) -> str:
    s = run.sizes
    d = probes.disk_probe(run.kv_dir, file_bytes=s.disk_file_bytes, read_bytes=s.disk_read_bytes,
                          extents=DISK_EXTENTS, repeats=s.repeats)
    run.found["disk"] = d
    reads = ", ".join(f"{_size(e)} {g:.2f}" for e, g in d.read_gbps_by_extent)
    return f"write {d.write_gbps:.2f} GB/s; cold reads ({d.cold_read_mode}) {reads} GB/s"


def _step_cpu_attention(run: _Run) -> str:
    gbps = probes.cpu_attention_gbps(run.dtype, run.sizes.cpu_attention_bytes, run.sizes.repeats)
    run.found["cpu_attention"] = gbps
    if not run.is_cuda:
        run.found["device_attention"] = gbps  # the "device" is these same cores
    return f"{gbps:.1f} GB/s of K+V ({run.sizes.cpu_attention_bytes // MiB} MiB, Numba)"


def _step_cpu_attention_4bit(run: _Run) -> str:
    gbps = probes.cpu_attention_4bit_gbps(run.sizes.cpu_attention_bytes, run.sizes.repeats)
    run.found["cpu_attention_4bit"] = gbps
    if not run.is_cuda:
        run.found["device_attention_4bit"] = gbps
    return (f"{gbps:.1f} GB/s of 4-bit pages as stored ({run.sizes.cpu_attention_bytes // MiB} MiB fp32 "
            "quantized, Numba)")


def _step_device_attention_4bit(run: _Run) -> str:
    s = run.sizes
    gbps = probes.device_attention_4bit_gbps(run.device, run.dtype, s.device_attention_bytes, s.repeats)
    run.found["device_attention_4bit"] = gbps
    return f"{gbps:.0f} GB/s of 4-bit pages as stored ({s.device_attention_bytes // MiB} MiB quantized, Triton)"


def _step_device_attention(run: _Run) -> str:
    s = run.sizes
    gbps = probes.device_attention_gbps(run.device, run.dtype, s.device_attention_bytes, s.repeats)
    run.found["device_attention"] = gbps
    return f"{gbps:.0f} GB/s of K+V ({s.device_attention_bytes // MiB} MiB, Triton)"


def _step_weights(run: _Run) -> str:
    s = run.sizes
    nbytes = s.device_weights_bytes if run.is_cuda else s.cpu_weights_bytes
    run.found["weights"] = probes.weights_gbps(run.device, run.dtype, nbytes, s.repeats)
    return f"{run.found['weights']:.1f} GB/s ({nbytes // MiB} MiB of weights)"


def _step_matmul(run: _Run) -> str:
    reps = max(3, run.sizes.repeats)  # cheap: always a median of 3 or more
    if run.is_cuda:
        run.found["device_tflops"] = probes.matmul_tflops(run.device, run.dtype, 4096, reps)
        run.found["cpu_tflops"] = probes.matmul_tflops(torch.device("cpu"), torch.float32, 1024, reps)
    else:
        run.found["device_tflops"] = run.found["cpu_tflops"] = probes.matmul_tflops(run.device, run.dtype, 1024, reps)
    return f"device {run.found['device_tflops']:.3g}, cpu {run.found['cpu_tflops']:.3g} TFLOP/s"


def _step_overhead(run: _Run) -> str:
    run.found["overhead"], run.found["piece"] = engine_probe.engine_overheads(run.device, run.dtype, run.kv_dir,
                                                                              steps=run.sizes.overhead_steps)
    return (f"{run.found['overhead'] * 1e3:.3f} ms per layer and step, "
            f"{run.found['piece'] * 1e3:.3f} ms per extra attention piece")


def _step_interference(run: _Run) -> str:
    s = run.sizes
    run.found["interference"], gbps = probes.read_interference(
        run.kv_dir, run.dtype, weights_bytes=s.cpu_weights_bytes, file_bytes=s.disk_file_bytes,
        repeats=2 * s.repeats + 1)
    return (f"{run.found['interference']:.3f} s lost per GB read beside the weights "
            f"(reads alone {gbps:.2f} GB/s)")


def _step_free(run: _Run) -> str:
    run.found["free"] = dev, host, disk = probes.free_bytes(run.device, run.kv_dir)
    return f"device {dev / GiB:.1f} GiB, host {host / GiB:.1f} GiB, disk {disk / GiB:.1f} GiB"


def _steps(run: _Run) -> list[tuple[str, Callable[[_Run], str]]]:
    steps = [("memory copies", _step_copies), ("disk write + cold reads", _step_disk),
             ("CPU page attention", _step_cpu_attention), ("CPU 4-bit page attention", _step_cpu_attention_4bit)]
    if run.is_cuda:
        steps += [("device page attention", _step_device_attention),
                  ("device 4-bit page attention", _step_device_attention_4bit)]
    steps += [("weights (matrix-vector)", _step_weights), ("matmul", _step_matmul)]
    if not run.is_cuda:  # on a GPU machine the device computes: CPU readers do not slow it
        steps.append(("reads beside compute", _step_interference))
    steps += [("engine overheads", _step_overhead), ("free memory", _step_free)]
    return steps


# ----- measuring -----------------------------------------------------------------------------------
def measure_profile(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    cache_dir: Path | None = None, quick: bool = False, progress: bool = True,
                    details: dict[str, Any] | None = None) -> HardwareProfile:
    """Measures every constant of a ``HardwareProfile`` on this machine (nothing is saved).

    Args:
        device: 'cpu', 'cuda', 'cuda:N' (None: CUDA when present).
        dtype: compute/KV dtype of the attention, weight and matmul probes (None: fp32 on CPU,
            bf16 on CUDA, as ``RuntimeConfig.resolved_dtype``).
        cache_dir: its ``kv`` folder holds the disk probe's scratch file (removed afterwards);
            None = ``default_cache_dir()``.
        quick: small sizes and one repeat (a few seconds); the name ends with ``QUICK_SUFFIX``.
        progress: one line per step on stderr.
        details: if given, filled with what the table shows beyond the profile (per-size
            copy rates, the disk probe's ``DiskResult``, seconds per step).

    Raises:
        ValueError: a bad device or dtype. OSError: the disk probe failed.
        CacheDirError: the cache dir cannot be written.
    """
    dev, dt = resolve_target(device, dtype)
    cache = ensure_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    run = _Run(dev, dt, cache / "kv", _QUICK if quick else _FULL)
    steps = _steps(run)
    say = _say if progress else (lambda _: None)
    say(f"offload profile: measuring {dev} ({str(dt).removeprefix('torch.')}), "
        f"{'quick' if quick else 'full'} run, {len(steps)} steps")
    busy = _busy_note()
    if busy:
        say(f"  note: {busy}")
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()
    for i, (label, step) in enumerate(steps, 1):
        t0 = time.perf_counter()
        summary = step(run)
        seconds[label] = time.perf_counter() - t0
        say(f"  [{i}/{len(steps)}] {label}: {summary} ({seconds[label]:.1f} s)")
    profile = _assemble(run, quick)
    if details is not None:
        details.update(run.found, step_seconds=seconds, seconds=time.perf_counter() - t_all,
                       device=str(dev), dtype=str(dt).removeprefix("torch."), load_note=busy)
    return profile


def _busy_note() -> str:
    """A warning when other processes keep the cores busy (CPU rates would read low): the
    CPU use of the whole machine over a quarter second before measuring, while we are idle."""
    busy = psutil.cpu_percent(interval=0.25)
    if busy <= 50:
        return ""
    return (f"the CPUs were {busy:.0f}% busy before measuring: other processes compete for them, "
            "so CPU rates may read low (measure again when idle: --refresh)")


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _assemble(run: _Run, quick: bool) -> HardwareProfile:
    f = run.found
    dev_free, host_free, disk_free = f["free"]
    return HardwareProfile(
        name=f"measured on {socket.gethostname()}" + (QUICK_SUFFIX if quick else ""),
        host_to_device_pinned_gbps=f["pinned"], host_to_device_pageable_gbps=f["pageable"],
        disk_read_gbps_by_extent=f["disk"].read_gbps_by_extent, disk_write_gbps=f["disk"].write_gbps,
        cpu_attention_gbps=f["cpu_attention"], device_attention_gbps=f["device_attention"],
        device_matmul_tflops=f["device_tflops"], cpu_matmul_tflops=f["cpu_tflops"],
        device_free_bytes=dev_free, host_free_bytes=host_free, disk_free_bytes=disk_free,
        device_is_host=not run.is_cuda, layer_overhead_s=f["overhead"], weights_gbps=f["weights"],
        piece_overhead_s=f["piece"], read_interference_s_per_gb=f.get("interference", 0.0),
        cpu_attention_4bit_gbps=f["cpu_attention_4bit"], device_attention_4bit_gbps=f["device_attention_4bit"])


# ----- the saved profile ------------------------------------------------------------------------
def load_or_measure(*, device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                    cache_dir: Path | None = None, refresh: bool = False, quick: bool = False,
                    progress: bool = True, details: dict[str, Any] | None = None) -> HardwareProfile:
    """The saved profile of this machine, or a fresh measurement (then saved).

    A saved profile is reused unless ``refresh``, unless it does not parse (a warning is
    logged, never an exception), or unless it was measured quick and this request is not.
    Arguments are those of ``measure_profile``; ``details`` is filled only when measuring.
    """
    dev, dt = resolve_target(device, dtype)
    cache = ensure_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    path = profile_path(cache, dev, dtype=dt)
    if not refresh:
        saved = load_profile(path)
        if saved is not None and (quick or not is_quick(saved)):
            logger.info("hardware profile from %s", path)
            return saved
    profile = measure_profile(device=dev, dtype=dt, cache_dir=cache, quick=quick, progress=progress,
                              details=details)
    save_profile(path, profile)
    logger.info("hardware profile saved to %s", path)
    return profile


def _may_plan(config: RuntimeConfig) -> bool:
    """Whether an engine built from ``config`` can ever call the planner (see ``profile_for``)."""
    return config.placement is None and (config.device_memory_bytes is not None or bool(config.disk_space_bytes))


def profile_for(config: RuntimeConfig, *, progress: bool, cache_dir: Path | None = None) -> RuntimeConfig:
    """``config`` with the hardware profile its engine will plan with, measured here (once per
    machine, quick) when none is saved, so that the engine never measures inside ``forward``.

    When it measures: only when ``config.profile`` is None and the engine can call the
    planner. ``Engine.placement_for`` plans only when ``config.placement`` is None and a
    prefill's new pages do not fit the DEVICE arena; ``offload.tiers.build_tiers`` makes a DISK tier
    only when a budget is given. So the rule is: no given profile, no given placement, and
    ``device_memory_bytes`` set or ``disk_space_bytes`` set above 0. Without those budgets the
    DEVICE arena is sized for the whole context (at most half the free memory) and nothing
    spills; should a prefill spill anyway, the engine prices it with a saved profile or a
    preset (``Engine.hardware_profile``), still without measuring.

    Before measuring it prints ``MEASURE_NOTICE`` on stderr, whatever ``progress`` says: a
    pause of seconds with no word is the worse surprise, and it happens once per machine. A
    measurement that fails (e.g. no room for its scratch file) is reported on stderr and
    leaves ``config`` unchanged: the engine then uses a preset, and the run goes on.

    Args:
        config: the runtime options the engine will be built with.
        progress: one line per measuring step on stderr (False: only the notice).
        cache_dir: the cache dir whose ``profiles`` folder holds the saved profile (and whose
            ``kv`` folder the disk probe uses); None = ``default_cache_dir()``.

    Returns:
        ``config`` itself when no profile is needed or one is given, else a copy whose
        ``profile`` is this machine's saved (or just measured and saved) quick-or-better profile.

    Raises:
        CacheDirError: the cache dir cannot be written.
    """
    if config.profile is not None or not _may_plan(config):
        return config
    dev = config.resolved_device()
    dt = config.kv_dtype or config.resolved_dtype(dev)  # the engine's KV dtype: what its pages cost
    cache = ensure_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
    saved = load_profile(profile_path(cache, dev, dtype=dt))  # any saved one serves a quick request
    if saved is not None:
        return dataclasses.replace(config, profile=saved)
    _say(MEASURE_NOTICE)
    try:
        # refresh: the look-up above found nothing usable; measure and save without reading again.
        profile = load_or_measure(device=dev, dtype=dt, cache_dir=cache, refresh=True, quick=True, progress=progress)
    except OSError as e:
        _say(f"offload: measuring the hardware profile under {cache / 'kv'} failed ({e}); planning with the "
             "preset profile instead")
        return config
    return dataclasses.replace(config, profile=profile)


# ----- command line ----------------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def _rate_4bit(gbps: float | None) -> str:
    return "not measured (priced as the exact kernel)" if gbps is None else f"{gbps:.1f} GB/s of 4-bit pages as stored"


def format_table(profile: HardwareProfile, path: Path, details: dict[str, Any] | None = None) -> str:
    """The profile as an aligned text table; ``details`` (from ``measure_profile``) adds the
    per-size copy rates, the queue-depth-1 read and the cold read mode."""
    d = details or {}
    disk = d.get("disk")
    mode = f" ({disk.cold_read_mode}, {disk.num_threads} threads)" if disk else ""
    copy_note = "  (no GPU: memcpy)" if profile.device_is_host else ""
    rows = [("host->device pinned", f"{profile.host_to_device_pinned_gbps:.2f} GB/s{copy_note}"),
            ("host->device pageable", f"{profile.host_to_device_pageable_gbps:.2f} GB/s")]
    for kind in ("pinned", "pageable"):
        if f"{kind}_by_size" in d:
            sizes = ", ".join(f"{_size(n)} {g:.1f}" for n, g in d[f"{kind}_by_size"].items())
            rows.append((f"  {kind} by size", f"{sizes} GB/s"))
    rows += [(f"disk read {_size(e)}", f"{g:.2f} GB/s{mode}") for e, g in profile.disk_read_gbps_by_extent]
    if disk:
        rows.append((f"disk read {_size(disk.qd1_extent)} QD1", f"{disk.qd1_gbps:.2f} GB/s (1 thread)"))
    rows += [("disk write + fsync", f"{profile.disk_write_gbps:.2f} GB/s"),
             ("CPU attention", f"{profile.cpu_attention_gbps:.1f} GB/s of K+V"),
             ("device attention", f"{profile.device_attention_gbps:.1f} GB/s of K+V"),
             ("CPU 4-bit attention", _rate_4bit(profile.cpu_attention_4bit_gbps)),
             ("device 4-bit attention", _rate_4bit(profile.device_attention_4bit_gbps)),
             ("weights (matrix-vector)", f"{profile.weight_stream_gbps:.1f} GB/s"),
             ("device matmul", f"{profile.device_matmul_tflops:.3g} TFLOP/s"),
             ("CPU matmul", f"{profile.cpu_matmul_tflops:.3g} TFLOP/s"),
             ("layer overhead", f"{profile.layer_overhead_s * 1e3:.3f} ms"),
             ("attention piece overhead", f"{profile.piece_overhead_s * 1e3:.3f} ms"),
             ("reads beside compute", f"{profile.read_interference_s_per_gb * 1e3:.1f} ms lost per GB read"),
             ("device free", f"{profile.device_free_bytes / GiB:.1f} GiB"),
             ("host free", f"{profile.host_free_bytes / GiB:.1f} GiB"),
             ("disk free", f"{profile.disk_free_bytes / GiB:.1f} GiB"),
             ("device is host", "yes" if profile.device_is_host else "no")]
    width = max(len(k) for k, _ in rows)
    where = (f"measured in {d['seconds']:.1f} s ({d['device']}, {d['dtype']})" if "seconds" in d
             else "saved earlier; --refresh measures again")
    head = [f"hardware profile: {profile.name}", f"  {where}", f"  file: {path}"]
    if d.get("load_note"):
        head.append(f"  note: {d['load_note']}")
    return "\n".join(head + [f"  {k:<{width}}  {v}" for k, v in rows])


def build_parser() -> argparse.ArgumentParser:
    from offload.commands.args import OneLineParser

    p = OneLineParser(prog="offload profile", description=__doc__.splitlines()[0])
    p.add_argument("--refresh", action="store_true", help="measure again even if a saved profile exists")
    p.add_argument("--quick", action="store_true", help="small sizes, one repeat (a few seconds)")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if present)")
    p.add_argument("--dtype", default=None, help="probe dtype fp32, bf16, fp16 (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where profiles are saved (default $OFFLOAD_CACHE or ~/.cache/offload)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return e.code if isinstance(e.code, int) else 2
    details: dict[str, Any] = {}
    cache = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    try:
        dev, dt = resolve_target(args.device, parse_dtype(args.dtype) if args.dtype else None)
        ensure_cache_dir(cache)
        profile = load_or_measure(device=dev, dtype=dt, cache_dir=cache, refresh=args.refresh,
                                  quick=args.quick, progress=not args.quiet, details=details)
    except (ValueError, OffloadError) as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"offload: error: measuring under {cache / 'kv'} failed ({e}); free space there or pass "
              "--cache-dir DIR on another disk", file=sys.stderr)
        return 2
    print(profile.to_json() if args.json else format_table(profile, profile_path(cache, dev, dtype=dt), details))
    return 0


if __name__ == "__main__":
    sys.exit(main())
