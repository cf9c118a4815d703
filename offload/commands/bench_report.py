"""What ``offload bench`` prints and stores: the results of its rows and the report over them
(tables, ratios against the peers and against the issue's targets, the breakdown by piece)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from typing import Any

from offload.commands.bench_results import median, spread
from offload.tuning.pieces import format_breakdown

__all__ = ["SHORT_PROMPT", "Result", "Beside", "report", "median", "spread"]

SHORT_PROMPT = 256  # tokens of the row that prices a step without long-context attention


@dataclasses.dataclass
class Result:
    """Repeated measurements of one configuration."""

    name: str
    note: str
    prefill_s: list[float] = dataclasses.field(default_factory=list)
    decode_s: list[float] = dataclasses.field(default_factory=list)
    fetch_wait_s: list[float] = dataclasses.field(default_factory=list)
    bytes_per_token: dict[str, int] = dataclasses.field(default_factory=dict)
    tokens: list[int] = dataclasses.field(default_factory=list)
    sparse: dict[str, Any] = dataclasses.field(default_factory=dict)  # a sparse row's read fractions


def _fmt(xs: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not xs:
        return "-"
    vals = [scale / x for x in xs] if scale else xs
    return f"{statistics.median(vals):.{digits}f} {spread(vals, digits)}"


@dataclasses.dataclass
class Beside:
    """All-DEVICE decode steps timed while the DISK spill's reads run beside them."""

    step_s: list[float]
    read_gbps: float


def report(args: argparse.Namespace, results: dict[str, Result], ids: list[int], read_gbps: float,
            disk_bytes: int, cold: str, step_s: float, beside: Beside | None = None,
            breakdown: dict[str, Any] | None = None) -> None:
    n, d = len(ids), args.decode_tokens
    peers = [r for k, r in results.items() if k.startswith("HF")]
    peer = min(peers, key=lambda r: median(r.decode_s)) if peers else None
    print(f"cold read bandwidth ({cold}, decode's chunks and staging depth): {read_gbps:.2f} GB/s over "
          f"{disk_bytes / 2**20:.0f} MiB; disk bound of an all-DISK step: {disk_bytes / read_gbps / 1e9 * 1e3:.0f} ms")
    print(f"{'configuration':22} {'prefill tok/s':>22} {'decode tok/s':>20} {'wait/decode':>11} "
          f"{'MiB/token dev/host/disk':>24}  note")
    for r in results.values():
        wait = f"{median(r.fetch_wait_s) / median(r.decode_s):.0%}" if r.fetch_wait_s else "-"
        b = r.bytes_per_token
        mib = "/".join(f"{b.get(t, 0) / 2**20:.1f}" for t in ("device", "host", "disk")) if b else "-"
        print(f"{r.name:22} {_fmt(r.prefill_s, n, 0):>22} {_fmt(r.decode_s, d, 2):>20} {wait:>11} {mib:>24}  {r.note}")
    if peer is not None:
        print(f"ratios to the peer ({peer.name}, the faster HF decode), medians:")
        for r in results.values():
            if r in peers:
                continue
            print(f"  {r.name:22} prefill {median(peer.prefill_s) / median(r.prefill_s):.2f}x  "
                  f"decode {median(peer.decode_s) / median(r.decode_s):.2f}x  (ours / {peer.name})")
    static = results.get("HF StaticCache")
    if peers and static is not None:
        fast = max(peers, key=lambda r: n / median(r.prefill_s))
        dev = results["all-DEVICE"]
        print(f"all-DEVICE against transformers: prefill {median(fast.prefill_s) / median(dev.prefill_s):.2f}x "
              f"the faster HF prefill ({fast.name}; target >= 1.0), decode "
              f"{median(static.decode_s) / median(dev.decode_s):.2f}x HF StaticCache (target >= 1.3)")
    pipe, serial = results["split, pipelined"], results["split, --no-overlap"]
    ratio = median(pipe.decode_s) / median(serial.decode_s)
    wait = median(pipe.fetch_wait_s) / median(pipe.decode_s)
    disk_step = median(results["DISK spill"].decode_s) / d
    bound = max(step_s, disk_bytes / read_gbps / 1e9)
    print(f"overlap: pipelined / serial decode time = {ratio:.2f} (target <= 0.75); fetch wait = {wait:.0%} of "
          f"pipelined decode (target <= 15%)")
    print(f"all-DISK step {disk_step * 1e3:.0f} ms / max(compute-only step {step_s * 1e3:.0f} ms, disk bound "
          f"{disk_bytes / read_gbps / 1e6:.0f} ms) = {disk_step / bound:.2f} (target <= 1.3)")
    if beside is not None:
        side = median(beside.step_s)
        side_disk = disk_bytes / beside.read_gbps / 1e9
        print(f"reads beside compute (CPU-only: readers and compute share the cores): all-DEVICE step with one "
              f"step's DISK reads repeated beside it {side * 1e3:.0f} ms {spread(beside.step_s, 0, 1e3)} "
              f"(alone {step_s * 1e3:.0f} ms), reads beside it {beside.read_gbps:.2f} GB/s (alone {read_gbps:.2f}); "
              f"all-DISK step / max({side * 1e3:.0f} ms, disk time beside {side_disk * 1e3:.0f} ms) = "
              f"{disk_step / max(side, side_disk):.2f} (target <= 1.1: the best overlap this machine allows)")
    sparse_rows = {k.removeprefix("DISK spill, "): r for k, r in results.items() if k.startswith("DISK spill, ")}
    if sparse_rows:
        budget = next(iter(sparse_rows.values())).sparse.get("sparse_budget") or 0.0
        fixed = median(results["all-DEVICE, short"].decode_s) / d  # weights, MLP, lm_head: no long context
        attention = max(0.0, step_s - fixed)
        best = fixed + budget * attention
        print(f"sparse bound (F={budget:g}): all-DEVICE step without its long-context attention {fixed * 1e3:.0f} ms "
              f"+ F x that attention {budget * attention * 1e3:.0f} ms = {best * 1e3:.0f} ms; the attention is the "
              f"all-DEVICE step {step_s * 1e3:.0f} ms less the {SHORT_PROMPT}-token step")
    for mode, row in sparse_rows.items():
        sparse_step = median(row.decode_s) / d
        sp = row.sparse
        hit = sp.get("speculation_hit_rate")
        print(f"sparse ({mode}, F={budget:g}): kv_fraction_read {sp.get('kv_fraction_read') or 0:.3f} "
              f"(max {sp.get('kv_fraction_read_max') or 0:.3f}), kv_fraction_fetched "
              f"{sp.get('kv_fraction_fetched') or 0:.3f} (target <= {1.5 * budget:.3f}), selection "
              f"{(sp.get('selection_s') or 0) / d * 1e3:.1f} ms/step, on-demand reads "
              f"{(sp.get('sync_miss_bytes_per_token') or 0) / 2**20:.2f} MiB/step"
              f"{'' if hit is None else f', speculation_hit_rate {hit:.3f}'}"
              f"{'; fallback: ' + sp['sparse_fallback'] if sp.get('sparse_fallback') else ''}")
        print(f"  sparse all-DISK step {sparse_step * 1e3:.0f} ms / bound {best * 1e3:.0f} ms = "
              f"{sparse_step / best:.2f} (target <= 1.25)")
        print(f"  exact all-DISK step {disk_step * 1e3:.0f} ms / sparse all-DISK step = {disk_step / sparse_step:.2f}x")
    if "quest" in sparse_rows and "speculative" in sparse_rows:
        q, s_ = sparse_rows["quest"], sparse_rows["speculative"]
        wait_q, wait_s = median(q.fetch_wait_s), median(s_.fetch_wait_s)
        print(f"speculative against quest: fetch wait {wait_s * 1e3:.1f} ms / {wait_q * 1e3:.1f} ms = "
              f"{wait_s / wait_q if wait_q > 0 else float('nan'):.2f} (target <= 0.25); step quest / speculative = "
              f"{median(q.decode_s) / median(s_.decode_s):.2f}x (target >= 1.3 at SmolLM2 8K, >= 1.0)")
    _report_formats(results, step_s, d)
    if breakdown is not None:
        print("\n".join(format_breakdown(breakdown)))
    if args.json_out is not None:
        blob = {"tokens": n, "decode_tokens": d, "read_gbps": read_gbps, "disk_bytes_per_step": disk_bytes,
                "cold_reads": cold, "results": {k: dataclasses.asdict(r) for k, r in results.items()},
                "beside": None if beside is None else dataclasses.asdict(beside), "breakdown": breakdown}
        args.json_out.write_text(json.dumps(blob, indent=1))
        print(f"raw timings: {args.json_out}")


def _report_formats(results: dict[str, Result], step_s: float, d: int) -> None:
    """The 4-bit rows against exact ones of the same run: the step against exact all-DEVICE's,
    and DISK bytes per step against exact all-DISK's."""
    exact_disk = results["DISK spill"].bytes_per_token.get("disk", 0)
    for name, row in results.items():
        if not name.startswith("4bit DISK spill"):
            continue
        step = median(row.decode_s) / d
        disk = row.bytes_per_token.get("disk", 0)
        sp = row.sparse
        sparse = (f"; kv_fraction_read {sp.get('kv_fraction_read') or 0:.3f} (max "
                  f"{sp.get('kv_fraction_read_max') or 0:.3f}) of exact fp32 pages" if sp else "")
        print(f"{name}: step {step * 1e3:.0f} ms / exact all-DEVICE step {step_s * 1e3:.0f} ms = {step / step_s:.2f} "
              f"(target <= 1.2); DISK bytes per step / exact all-DISK's = "
              f"{disk / exact_disk if exact_disk else float('nan'):.3f} (target <= 0.2){sparse}")
