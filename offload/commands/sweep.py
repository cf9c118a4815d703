"""`offload bench --contexts 2K,8K --modes exact,quest --placements device,disk --out DIR`: every
mode and placement at every context, with the peers, in one run; results.json, report.md and
PNG plots in DIR (``offload.commands.bench_render`` writes the last two from the JSON alone).

What one context costs and measures (declared, printed and stored before anything is timed):
- The context C is the tokens in the KV at the last timed decode step: a document of
  C - question - decode tokens of essays, then a request of ``QUESTION`` tokens, then the decode.
- One prefill per context and page format, shared by every mode and placement through a
  DocCache written by that prefill (a 4-bit DocCache is never served to exact mode, so 4-bit
  rows have a prefill of their own, timed once). Its first run is the DocCache miss; the exact
  prefill alone is repeated ``--prefill-reps`` times (default: ``--reps`` up to 8K tokens, once
  above: at 32K a prefill takes minutes on a small CPU; one value prints its spread as n/a).
- Each row (mode x placement) restores the DocCache into its own engine (a hit, its pages
  placed all on the row's tier), prefills the request on a fork (time to first token on a hit,
  repeated ``--reps`` times after one untimed restore), then decodes ``--decode-tokens`` steps
  on forks of it, ``--reps`` times after an untimed short decode (kernels compile on first use).
- The cold read bandwidth of the exact all-DISK row's pages, read as its decode reads them
  (three times), gives each row's disk bound: its DISK bytes per token / that bandwidth.
- Peers (``offload.commands.bench_peers``) run at contexts up to 8K unless
  ``--peers-all-contexts``, on the same prompt ids; each is measured or says why not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from offload.commands.bench_runs import decode_fork, prefilled, prompt_ids, time_disk_reads
from offload.commands.bench_peers import Peers
from offload.commands.bench_render import render
from offload.commands.bench_results import SCHEMA_VERSION, BadResults, load_fidelity
from offload.commands.sweep_args import MODES, PLACEMENTS, SweepPlan, declare, plan_sweep
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.errors import OffloadError
from offload.kv.doc_cache import DocCache
from offload.kv.placement import Placement
from offload.model.model_source import ModelSource, default_cache_dir, ensure_cache_dir, resolve_model

__all__ = ["run_sweep"]


class Progress:
    """One stderr line: the current row and an estimate of the time left, from a cost model of
    the remaining work scaled by the rate measured so far (a no-op when quiet)."""

    def __init__(self, total_units: float, enabled: bool) -> None:
        self.total, self.done, self.enabled = total_units, 0.0, enabled
        self.t0 = time.perf_counter()

    def show(self, what: str) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        left = "?" if self.done <= 0 else _dur(elapsed / self.done * max(0.0, self.total - self.done))
        print(f"\r\033[Kbench {self.done / self.total:4.0%} | {what} | elapsed {_dur(elapsed)}, left ~{left}",
              end="", file=sys.stderr, flush=True)

    def advance(self, units: float) -> None:
        self.done += units

    def close(self) -> None:
        if self.enabled:
            print(file=sys.stderr, flush=True)


def _dur(s: float) -> str:
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def _prefill_units(tokens: int) -> float:  # attention grows with the context: a rough cost model
    return tokens * (1 + tokens / 16384) / 1000


def _row_units(plan: SweepPlan, tokens: int) -> float:
    return (plan.reps + 1) * (plan.decode + plan.question / 8) * (1 + tokens / 8192) / 20


def _peer_units(peers: Peers, tokens: int) -> float:
    return peers.units(_prefill_units(tokens)) if peers.runs_at(tokens) else 0.0


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    import os

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "ram_bytes": mem,
            "gpu": gpu, "os": platform.platform()}


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numba", "numpy", "transformers", "kv-offload"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _profile(cache: Path, plan: SweepPlan) -> dict[str, Any] | None:
    """This machine's saved hardware profile, if one is saved (the sweep never measures one:
    its rows give placements, so no engine plans; the bandwidths it uses are measured in the run)."""
    from offload.tuning.profile_store import load_profile, profile_path

    prof = load_profile(profile_path(cache, plan.device, dtype=plan.dtype))
    return None if prof is None else json.loads(prof.to_json())


@dataclasses.dataclass
class _Shared:
    """What every row of one context shares: the prompt and the DocCache store."""

    source: ModelSource
    doc: list[int]
    question: list[int]
    store: Path
    kv_dir: str


def _config(plan: SweepPlan, mode: str, placement: str, shared: _Shared) -> RuntimeConfig:
    cfg = shared.source.config
    elem = plan.dtype.itemsize
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem * (len(shared.doc) + 256) * 2
    fields = dict(MODES[mode])
    if "sparse" in fields:
        fields["sparse_budget"] = plan.sparse_budget
    return RuntimeConfig(device=str(plan.device), dtype=plan.dtype, kv_dir=shared.kv_dir,
                         placement=Placement.all_on(PLACEMENTS[placement]), device_memory_bytes=kv + 64 * 2**20,
                         host_memory_bytes=kv + 64 * 2**20 if placement == "host" else 0, **fields)


def _prefill_context(plan: SweepPlan, fmt: str, shared: _Shared, reps: int, progress: Progress) -> dict[str, Any]:
    """The DocCache miss of one page format (prefill + save), then the prefill alone repeated."""
    engine = Engine(shared.source, _config(plan, "4bit" if fmt == "4bit" else "exact", "device", shared))
    try:
        cache = DocCache(engine, shared.source, shared.store)
        progress.show(f"{len(shared.doc) + len(shared.question) + plan.decode} tokens: prefill ({fmt} pages), "
                      "DocCache miss")
        times: list[float] = []

        def prefill(ids: list[int]):
            t0 = time.perf_counter()
            seq = _synthetic(engine, ids) if plan.synthetic else prefilled(engine, ids)
            times.append(time.perf_counter() - t0)
            return seq

        before = _store_bytes(shared.store)  # the other page formats' DocCaches of this context
        t0 = time.perf_counter()
        seq, res = cache.ingest(shared.doc, prefill)
        ingest_s = time.perf_counter() - t0
        doc_bytes = _store_bytes(shared.store) - before
        if res.status != "miss":
            raise OffloadError(f"the bench's fresh DocCache store answered {res.status!r} for a new document")
        fork = engine.fork(seq)
        t1 = time.perf_counter()
        engine.forward(fork, shared.question)
        engine.sync()
        question_s = time.perf_counter() - t1
        engine.release(fork)
        engine.release(seq)
        for _ in range(reps - 1):
            progress.show(f"prefill ({fmt} pages), repetition {len(times) + 1}/{reps}")
            engine.release(prefill(shared.doc))
        return {"kv_format": fmt, "doc_tokens": len(shared.doc), "prefill_s": times, "synthetic": plan.synthetic,
                "ingest_s": ingest_s,
                "save_s": ingest_s - times[0], "question_s": question_s, "ttft_miss_s": ingest_s + question_s,
                "doc_cache_bytes": doc_bytes}
    finally:
        engine.close()


def _synthetic(engine: Engine, ids: list[int]) -> Any:
    """``--synthetic-kv``: random K/V for every position written through the engine's own write
    path (placement, DISK writes, 4-bit quantization as a prefill's pages get), with no compute:
    a long context of a large random-weight shape in seconds instead of hours."""
    seq = engine.new_sequence()
    placement = engine.placement_for(seq, len(ids), document=True)
    cfg = engine.model_config
    gen = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_layers):
        for a in range(0, len(ids), 4096):
            n = min(4096, len(ids) - a)
            k, v = (torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(engine.kv_dtype) for _ in "kv")
            engine.kv.append(seq, layer, k.to(engine.device), v.to(engine.device), placement)
    engine.kv.writes.flush()
    return seq


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in (store / "docs").rglob("*") if p.is_file())


def _row(plan: SweepPlan, mode: str, placement: str, shared: _Shared, between=None) -> dict[str, Any]:
    """One mode x placement: restores (time to first token on a hit) and decodes, repeated."""
    engine = Engine(shared.source, _config(plan, mode, placement, shared))
    try:
        cache = DocCache(engine, shared.source, shared.store)

        def no_prefill(_ids: list[int]):
            raise OffloadError("the bench's DocCache was not found: a row would prefill again")

        ttft: list[float] = []
        base = tok = None
        for rep in range(plan.reps + 1):  # the first restore is untimed (first use of the kernels)
            if base is not None:  # one restored copy at a time: the peak bytes are one document's
                engine.release(base)
            t0 = time.perf_counter()
            seq, _ = cache.ingest(shared.doc, no_prefill)
            base = engine.fork(seq)
            logits = engine.forward(base, shared.question)
            tok = int(torch.argmax(logits[-1]))
            if rep:
                ttft.append(time.perf_counter() - t0)
            engine.release(seq)
        row: dict[str, Any] = {"mode": mode, "placement": placement, **{k: str(v) for k, v in MODES[mode].items()},
                               "ttft_hit_s": ttft, "decode_s_per_token": [], "fetch_wait_s_per_token": []}
        decode_fork(engine, base, tok, 2)  # untimed
        for _ in range(plan.reps):
            stats, toks = decode_fork(engine, base, tok, plan.decode)
            row["decode_s_per_token"].append(stats.decode_s / max(1, stats.decode_tokens))
            row["fetch_wait_s_per_token"].append(stats.fetch_wait_s / max(1, stats.decode_tokens))
            if between is not None:
                between()
        row.update(tokens=[tok] + toks, bytes_per_token=dict(stats.bytes_read_per_token),
                   peak_bytes=dict(stats.peak_bytes), cold_reads=stats.cold_reads, disk_backend=stats.disk_backend)
        if stats.sparse != "exact":
            row["sparse_stats"] = {k: getattr(stats, k) for k in (
                "sparse_budget", "kv_fraction_read", "kv_fraction_read_max", "kv_fraction_fetched",
                "sparse_fallback", "selection_s", "sync_miss_bytes_per_token", "speculation_hit_rate",
                "lsh_table_bytes")}
        if mode == "exact" and placement == "disk":
            reads = [time_disk_reads(engine, base) for _ in range(3)]
            row["read_gbps"] = [b / s / 1e9 for b, s in reads if s > 0]
            row["disk_bytes_per_step"] = reads[0][0]
        engine.release(base)
        return row
    finally:
        engine.close()


def _context(plan: SweepPlan, tokens: int, ids: list[int], progress: Progress, cache: Path,
             peers: Peers) -> dict[str, Any]:
    """One context's prefills, rows and peers; ``ids`` its prompt (document, then the request)."""
    doc, question = ids[:-plan.question], ids[-plan.question:]
    (cache / "bench-docs").mkdir(parents=True, exist_ok=True)
    store = Path(tempfile.mkdtemp(prefix="sweep-", dir=cache / "bench-docs"))
    shared = _Shared(plan.source, doc, question, store, str(cache / "kv"))
    out: dict[str, Any] = {"tokens": tokens, "doc_tokens": len(doc), "question_tokens": len(question),
                           "prefill": [], "rows": [], "peers": []}
    try:
        for fmt in plan.formats:  # the exact prefill is the one timed repeatedly; a 4-bit one gives its rows pages
            reps = plan.prefill_reps(tokens) if fmt == "exact" else 1
            out["prefill"].append(_prefill_context(plan, fmt, shared, reps, progress))
            progress.advance(_prefill_units(tokens) * reps)
        runner = peers.start(tokens, ids)
        for placement in plan.placements:
            for mode in plan.modes:
                progress.show(f"{tokens} tokens: {mode}, {placement}")
                hook = runner.rep if (mode, placement) == ("exact", "device") else None
                out["rows"].append(_row(plan, mode, placement, shared, between=hook))
                progress.advance(_row_units(plan, tokens))
        progress.show(f"{tokens} tokens: peers")
        out["peers"] = runner.finish(out["rows"])
        progress.advance(_peer_units(peers, tokens))
    finally:
        shutil.rmtree(store, ignore_errors=True)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def run_sweep(args: argparse.Namespace) -> int:
    cache = ensure_cache_dir(args.cache_dir or default_cache_dir())
    args.cache_dir_resolved = cache
    try:
        fidelity = None if args.fidelity is None else load_fidelity(args.fidelity)
        plan = plan_sweep(args, resolve_model)
    except (ValueError, OffloadError, BadResults) as e:
        print(f"offload bench: error: {e}", file=sys.stderr)
        return 2
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    peers = Peers(plan, args, cache)
    blob: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "kind": "offload-bench",
                            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                            "command": "offload bench " + shlex.join(args.argv),
                            "machine": _machine(), "versions": _versions(), "profile": _profile(cache, plan),
                            "config": plan.to_dict(), "peers_declared": peers.declared(), "contexts": [],
                            "fidelity": fidelity}
    print("\n".join(declare(plan, peers.declared())), flush=True)
    prompts = {c: prompt_ids(plan.source, c - plan.decode) for c in plan.contexts}
    peers.prepare(prompts)
    units = sum(_prefill_units(c) * (plan.prefill_reps(c) + len(plan.formats) - 1)
                + _row_units(plan, c) * len(plan.modes) * len(plan.placements) + _peer_units(peers, c)
                for c in plan.contexts)
    progress = Progress(units, enabled=not args.quiet)
    t0 = time.perf_counter()
    try:
        for tokens in plan.contexts:
            blob["contexts"].append(_context(plan, tokens, prompts[tokens], progress, cache, peers))
            blob["wall_s"] = time.perf_counter() - t0
            (out_dir / "results.json").write_text(_dumps(blob))  # kept as it grows: a killed run keeps what it did
    finally:
        progress.close()
    blob["wall_s"] = time.perf_counter() - t0
    (out_dir / "results.json").write_text(_dumps(blob))
    for line in render(blob, out_dir):
        print(line)
    return 0


def _dumps(blob: dict[str, Any]) -> str:
    return json.dumps(blob, indent=1, default=str)
