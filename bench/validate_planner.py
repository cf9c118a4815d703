"""Planner validation: predicted vs measured decode steps of SmolLM2, LP plan vs greedy rule.

    python bench/validate_planner.py [--repeats 4] [--steps 8] [--quick-profile] [--json out.json]
                                     [--separate-engines]

In one run: the hardware profile is measured (``offload.tuning.profile.measure_profile``), its disk
reads measured again before each configuration (the disk drifts); then for each configuration
declared below (context length and the KV room of each tier, always with
some DEVICE, some HOST and the rest on DISK) the LP planner and the greedy rule (fill DEVICE,
then HOST, then DISK, layer by layer) each plan a synthetic KV cache of that length on the
configuration's budgets, and real decode steps of SmolLM2-135M (real weights, fp32, this CPU)
run over both placements. Decode time does not depend on the K/V values, so random pages written through the
engine's own placement and tiers (DISK pages really written, then read cold) stand in for a
prefill that would take minutes at 16K tokens. Contexts past the model's 8K window are an
explicit override (only speed matters here).

Protocol (default): ONE engine, with room for both, holds two sequences placed by the two
plans, written layer by layer in turns (this VM reads recently written pages faster, so one
after the other would favour the second); their decode steps are interleaved (each repeat runs both, the order alternating), so
both read the same DISK files through the same staging at the same moment, and the greedy/LP
ratio is the median over repeats of adjacent pairs. (With ``--separate-engines``, the earlier
protocol: one engine per plan, two crossover rounds of fresh engines, the ratio the geometric
mean of the rounds; there two engines with identical plans measured up to 1.31x apart on this
VM, because where a file lands on its virtual disk changes how fast it reads.) Before each
measurement the engine's own DISK pages are read alone (same chunks, staging and threads, no
compute): this VM's disk drifts by up to 2x within minutes and reads some files faster than
others, so each prediction prices the plan (``CostModel.decode_step_s``) with the profile of
this run and that disk bandwidth. Nothing of the decode measurements enters a prediction.

Printed per configuration and method: the plan's tier bytes and DISK pages per layer, the
predicted step (median over repeats; the planner's model: DISK reads running ahead across
layers through the staging buffers, ``planner.cost.staged_step_s``, plus the profile's read
interference), the measured step (median over repeats of the mean of ``--steps`` steps, with
min-max), the median relative error |measured - predicted| / measured, the same error for
FlexGen's per-layer model, where each layer's reads overlap only that layer (column
"layer"), the share of decode time waiting for DISK, the bottleneck the model names, and the
greedy / LP measured step ratio (> 1: LP faster).
Targets (issue 4): median error <= 20%, max <= 40%,
LP at least as fast as greedy (ratio >= 0.95) everywhere and faster where the plans differ.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from offload.commands.bench_runs import time_disk_reads  # noqa: E402
from offload.config import RuntimeConfig  # noqa: E402
from offload.engine import Engine  # noqa: E402
from offload.model.model_source import default_cache_dir, resolve_model  # noqa: E402
from offload.tuning.planning import DEVICE_RESERVE_PAGES, staging_bytes  # noqa: E402
from offload.tuning.profile import measure_profile  # noqa: E402
from offload.tuning.profile_probes import disk_probe  # noqa: E402
from planner import CostModel, HardwareProfile  # noqa: E402
from offload.kv.page_table import cdiv  # noqa: E402

MiB = 2**20
WARMUP_STEPS = 4
METHODS = ("lp", "greedy")


@dataclasses.dataclass(frozen=True)
class Config:
    """A context length and the KV room of DEVICE and HOST as fractions of the KV size (DISK
    gets room for all of it)."""

    name: str
    context: int
    device_share: float
    host_share: float


CONFIGS = [
    Config("2K d30 h30", 2048, 0.30, 0.30),
    Config("4K d50 h20", 4096, 0.50, 0.20),
    Config("8K d40 h20", 8192, 0.40, 0.20),
    Config("8K d10 h10", 8192, 0.10, 0.10),
    Config("12K d30 h30", 12288, 0.30, 0.30),
    Config("16K d50 h25", 16384, 0.50, 0.25),
    Config("16K d20 h10", 16384, 0.20, 0.10),
]


def _budgets(engine: Engine, c: Config) -> dict[str, int]:
    """Engine budgets that leave the config's KV room after the DEVICE reserve and the HOST
    staging area."""
    cfg, slot = engine.model_config, engine.arena.slot_bytes
    kv = cdiv(c.context, engine.config.page_size) * cfg.num_layers * slot
    reserve = DEVICE_RESERVE_PAGES * cfg.num_layers * slot
    staging = staging_bytes(slot, staging_chunk_pages=engine.config.staging_chunk_pages,
                            staging_buffers=engine.config.staging_buffers)
    return dict(device_memory_bytes=reserve + int(c.device_share * kv), host_memory_bytes=staging + int(c.host_share * kv),
                disk_space_bytes=2 * kv)


def _fill(engine: Engine, tokens: int, placement=None):
    """A sequence of ``tokens`` random K/V placed where ``placement`` says (default: where the
    engine's planner says)."""
    cfg = engine.model_config
    seq = engine.new_sequence()
    placement = placement or engine.placement_for(seq, tokens)
    gen = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_layers):
        for a in range(0, tokens, 4096):
            n = min(4096, tokens - a)
            k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen, dtype=engine.kv_dtype)
            v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen, dtype=engine.kv_dtype)
            engine.kv.append(seq, layer, k, v, placement)
    engine.kv.writes.flush()
    return seq


def _fill_together(engine: Engine, tokens: int, placements: dict) -> dict:
    """One sequence per placement, written layer by layer in turns (layer 0 of each, then
    layer 1 of each, ...): this VM reads recently written DISK pages 1.3-1.5x faster, so
    filling one sequence after the other would favour the one written last."""
    cfg = engine.model_config
    seqs = {m: engine.new_sequence() for m in placements}
    gens = {m: torch.Generator().manual_seed(0) for m in placements}
    for layer in range(cfg.num_layers):
        for m, placement in placements.items():
            for a in range(0, tokens, 4096):
                n = min(4096, tokens - a)
                k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gens[m], dtype=engine.kv_dtype)
                v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gens[m], dtype=engine.kv_dtype)
                engine.kv.append(seqs[m], layer, k, v, placement)
    engine.kv.writes.flush()
    return seqs


def _steps_s(engine: Engine, seq, steps: int) -> tuple[float, float]:
    """Mean seconds of ``steps`` decode steps and the mean DISK wait per step."""
    wait0, t0 = engine.kv.io.fetch_wait_s, time.perf_counter()
    for _ in range(steps):
        engine.forward(seq, [1])
    return (time.perf_counter() - t0) / steps, (engine.kv.io.fetch_wait_s - wait0) / steps


def _disk_now(profile: HardwareProfile, engine: Engine, seq) -> HardwareProfile:
    """``profile`` with its cold-read bandwidth replaced by what reading this engine's DISK
    pages alone achieves now (``offload.commands.bench.time_disk_reads``: the decode step's chunks, staging
    depth and threads, no compute). This VM's disk drifts by up to 2x within minutes and reads
    some files faster than others, so a disk number from minutes ago or from another file
    misprices the step; the decode measurements themselves never enter a prediction."""
    nbytes, seconds = time_disk_reads(engine, seq)
    if not nbytes:
        return profile
    return dataclasses.replace(profile, disk_read_gbps_by_extent=((1, nbytes / seconds / 1e9),))


def _disk_refreshed(profile: HardwareProfile, kv_root: Path) -> HardwareProfile:
    """The run's profile with its cold-read table measured again (the profile's own probe:
    64 MiB at its extent sizes, 4 threads, one pass), so the plans of a configuration are made
    with the disk of that minute rather than of the run's start."""
    extents = tuple(e for e, _ in profile.disk_read_gbps_by_extent)
    res = disk_probe(kv_root / "probe", file_bytes=64 * MiB, read_bytes=64 * MiB, extents=extents, repeats=1)
    return dataclasses.replace(profile, disk_read_gbps_by_extent=res.read_gbps_by_extent)


def _method_config(source, profile: HardwareProfile, c: Config, kv_root: Path,
                   method: str) -> tuple[RuntimeConfig, dict[str, int]]:
    """The runtime config of one planning method and the configuration's budgets for it
    (sized by a probe engine: the DEVICE reserve and HOST staging depend on the model)."""
    base = RuntimeConfig(device="cpu", kv_dir=str(kv_root), profile=profile, planner=method)
    probe = Engine(source, base)
    try:
        return base, _budgets(probe, c)
    finally:
        probe.close()


def _engines(source, profile: HardwareProfile, c: Config, kv_root: Path, order: tuple[str, ...]) -> dict:
    """One engine per method, filled in ``order`` (each with its own DISK files)."""
    engines: dict[str, tuple[Engine, object]] = {}
    for method in order:
        base, budgets = _method_config(source, profile, c, kv_root, method)
        engine = Engine(source, dataclasses.replace(base, **budgets))
        seq = _fill(engine, c.context)
        assert engine.last_plan is not None, "the configuration fits DEVICE: no plan was made"
        for _ in range(WARMUP_STEPS):
            engine.forward(seq, [1])
        engines[method] = (engine, seq)
    return engines


def _shared(source, profile: HardwareProfile, c: Config, kv_root: Path) -> tuple[Engine, dict]:
    """Each method's plan, made by an engine with the configuration's budgets (nothing
    written), then ONE engine with room for both whose two sequences are placed by those
    plans: the same DISK files, staging and moment for both, so the disk's drift and where a
    file lands no longer separate them."""
    from offload.tuning.planning import plan_placement

    plans = {}
    for method in METHODS:
        base, budgets = _method_config(source, profile, c, kv_root, method)
        planner_engine = Engine(source, dataclasses.replace(base, **budgets))
        seq = planner_engine.new_sequence()
        planner_engine.placement_for(seq, c.context)
        assert planner_engine.last_plan is not None, "the configuration fits DEVICE: no plan was made"
        plans[method] = (planner_engine.last_plan, planner_engine.last_problem)
        planner_engine.release(seq)
        planner_engine.close()
    both = {k: 2 * v for k, v in budgets.items()}
    engine = Engine(source, RuntimeConfig(device="cpu", kv_dir=str(kv_root), profile=profile, **both))
    seqs = _fill_together(engine, c.context, {m: plan_placement(p, first_page=0) for m, (p, _) in plans.items()})
    for method in METHODS:
        for _ in range(WARMUP_STEPS):
            engine.forward(seqs[method], [1])
    return engine, {m: (seqs[m], *plans[m]) for m in METHODS}


def _run_config_shared(source, profile: HardwareProfile, c: Config, args: argparse.Namespace, kv_root: Path) -> dict:
    """Both plans in one engine (``_shared``), their decode steps interleaved: per repeat each
    sequence's DISK reads are timed alone, then its steps, the order alternating; the greedy/LP
    ratio is the median over the repeats of adjacent pairs."""
    runs: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in METHODS}
    engine, members = _shared(source, profile, c, kv_root)
    try:
        for r in range(2 * args.repeats):
            for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                seq, plan, problem = members[method]
                now = _disk_now(profile, engine, seq)
                step, wait = _steps_s(engine, seq, args.steps)
                splits = plan.splits()
                flat = dataclasses.replace(problem, staging_buffers=0)  # FlexGen's per-layer overlap
                runs[method].append((step, CostModel(problem, now).decode_step_s(splits), wait,
                                     CostModel(flat, now).decode_step_s(splits)))
    finally:
        engine.close()
    row = _row(c, runs, {m: members[m][1] for m in METHODS})
    pairs = [g[0] / lp[0] for g, lp in zip(runs["greedy"], runs["lp"])]
    row["round_ratios"] = [min(pairs), max(pairs)]
    row["greedy_over_lp"] = statistics.median(pairs)
    return row


def _run_config(source, profile: HardwareProfile, c: Config, args: argparse.Namespace, kv_root: Path) -> dict:
    """Both plans of one configuration in two rounds of fresh engines (LP filled first, then
    greedy first: where a file lands on the disk changes its read speed); per repeat each
    engine's DISK reads are timed alone, then its decode steps (the order alternating)."""
    # (measured, predicted, wait, predicted by the per-layer model)
    runs: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in METHODS}
    plans = {}
    for order in (METHODS, METHODS[::-1]):
        engines = _engines(source, profile, c, kv_root, order)
        try:
            for r in range(args.repeats):
                for method in (order if r % 2 == 0 else order[::-1]):
                    engine, seq = engines[method]
                    now = _disk_now(profile, engine, seq)
                    step, wait = _steps_s(engine, seq, args.steps)
                    splits = engine.last_plan.splits()
                    predicted = CostModel(engine.last_problem, now).decode_step_s(splits)
                    flat = dataclasses.replace(engine.last_problem, staging_buffers=0)
                    runs[method].append((step, predicted, wait, CostModel(flat, now).decode_step_s(splits)))
                    plans[method] = engine.last_plan
        finally:
            for engine, _ in engines.values():
                engine.close()
    row = _row(c, runs, plans)
    # Crossover: the DISK pages written last read fastest (this VM's host caches recent writes:
    # 1.3-1.5x), so each round favours its second engine; the geometric mean of the two
    # rounds' ratios cancels the order.
    n = args.repeats
    per_round = [statistics.median(r[0] for r in runs["greedy"][k * n:(k + 1) * n])
                 / statistics.median(r[0] for r in runs["lp"][k * n:(k + 1) * n]) for k in (0, 1)]
    row["round_ratios"] = per_round
    row["greedy_over_lp"] = math.sqrt(per_round[0] * per_round[1])
    return row


def _row(c: Config, runs: dict, plans: dict) -> dict:
    """A configuration's row: per method the plan's tiers, predicted and measured steps."""
    row: dict = {"config": c.name, "context": c.context}
    for method in METHODS:
        plan = plans[method]
        measured = [r[0] for r in runs[method]]
        med = statistics.median(measured)
        row[method] = {
            "tier_mib": {t.value: b / MiB for t, b in plan.tier_bytes.items()},
            "disk_pages_per_layer": [min(plan.disk_pages), max(plan.disk_pages)],
            "predicted_s": statistics.median(r[1] for r in runs[method]), "measured_s": med,
            "min_s": min(measured), "max_s": max(measured),
            "error": statistics.median(abs(r[0] - r[1]) / r[0] for r in runs[method]),
            "error_per_layer_model": statistics.median(abs(r[0] - r[3]) / r[0] for r in runs[method]),
            "fetch_wait_share": sum(r[2] for r in runs[method]) / sum(measured), "bottleneck": plan.bottleneck,
            "pages": [plan.device_pages, plan.host_pages, plan.disk_pages],
            "repeats": [{"measured_s": m, "predicted_s": p, "wait_s": w, "predicted_per_layer_s": f}
                        for m, p, w, f in runs[method]],
        }
    row["plans_differ"] = row["lp"]["pages"] != row["greedy"]["pages"]
    return row


def _print_row(row: dict) -> None:
    for method in ("lp", "greedy"):
        r = row[method]
        tiers = "/".join(f"{r['tier_mib'][t]:.0f}" for t in ("device", "host", "disk"))
        print(f"{row['config']:<13} {method:<6} {tiers:>15} {r['disk_pages_per_layer'][0]:>4}-"
              f"{r['disk_pages_per_layer'][1]:<4} {r['predicted_s'] * 1e3:9.1f} {r['measured_s'] * 1e3:9.1f} "
              f"[{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}]".ljust(104)
              + f"{r['error']:6.1%} {r['error_per_layer_model']:6.1%} {r['fetch_wait_share']:6.1%}  {r['bottleneck']}",
              flush=True)
    how = ("median of adjacent pairs in one engine, pairs" if row.get("shared") else
           "geometric mean of the rounds: LP filled first, greedy filled first")
    print(f"{'':<13} greedy/LP measured step: {row['greedy_over_lp']:.2f}x ({how} {row['round_ratios'][0]:.2f}x, "
          f"{row['round_ratios'][1]:.2f}x; {'plans differ' if row['plans_differ'] else 'same plan'})", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=4, help="repeats per round (2 rounds)")
    p.add_argument("--steps", type=int, default=8, help="decode steps per repeat")
    p.add_argument("--quick-profile", action="store_true", help="measure the profile in quick mode (tests)")
    p.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    p.add_argument("--separate-engines", action="store_true",
                   help="measure each plan in its own engine, two crossover rounds (the earlier protocol) instead "
                        "of both plans in one engine with interleaved steps")
    args = p.parse_args(argv)
    configs = [c for c in CONFIGS if args.configs is None or c.name in args.configs.split(",")]
    torch.set_num_threads(torch.get_num_threads())
    print("Configurations (declared before measuring): SmolLM2-135M fp32 on CPU, page 32, synthetic KV; "
          "KV room as a share of the KV size (DISK: the rest)")
    for c in configs:
        print(f"  {c.name:<13} context {c.context:>6}  DEVICE {c.device_share:.0%}  HOST {c.host_share:.0%}")
    protocol = ("2 rounds of fresh engines (one per plan)" if args.separate_engines else
                "one engine holding both plans' sequences, steps interleaved, 2 x")
    print(f"Each: LP plan and greedy plan, {protocol} {args.repeats} repeats x {args.steps} decode steps after "
          f"{WARMUP_STEPS} warm-up steps", flush=True)
    cache = default_cache_dir()
    source = resolve_model("smollm2-135m", cache_dir=cache, show_progress=False)
    with tempfile.TemporaryDirectory(dir=cache) as kv_root:
        profile = measure_profile(device="cpu", dtype=torch.float32, cache_dir=Path(kv_root), quick=args.quick_profile)
        print(f"Profile (this run): {json.dumps(profile.to_dict())}", flush=True)
        print(f"\n{'config':<13} {'method':<6} {'D/H/K MiB':>15} {'disk/lyr':>9} {'pred ms':>9} {'meas ms':>9} "
              f"{'[min-max]':<20}".ljust(104) + f"{'error':>6} {'layer':>6} {'wait':>6}  bottleneck")
        rows = []
        for c in configs:
            planning = _disk_refreshed(profile, Path(kv_root))
            run = _run_config if args.separate_engines else _run_config_shared
            rows.append(run(source, planning, c, args, Path(kv_root)))
            rows[-1]["shared"] = not args.separate_engines
            rows[-1]["planning_disk_gbps"] = planning.disk_read_gbps_by_extent
            _print_row(rows[-1])
    errors = [r[m]["error"] for r in rows for m in ("lp", "greedy")]
    per_layer = [r[m]["error_per_layer_model"] for r in rows for m in ("lp", "greedy")]
    ratios = [r["greedy_over_lp"] for r in rows]
    differ = [r["greedy_over_lp"] for r in rows if r["plans_differ"]]
    print(f"\nPrediction error over {len(errors)} measured plans: median {statistics.median(errors):.1%} "
          f"(target <= 20%), max {max(errors):.1%} (target <= 40%); FlexGen's per-layer overlap alone (column "
          f"'layer'): median {statistics.median(per_layer):.1%}, max {max(per_layer):.1%}")
    print(f"Greedy / LP measured step: min {min(ratios):.2f}x (target >= 0.95); where the plans differ "
          f"({len(differ)} of {len(rows)}): " + ", ".join(f"{x:.2f}x" for x in differ))
    if args.json:
        args.json.write_text(json.dumps({"profile": profile.to_dict(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
