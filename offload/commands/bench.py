"""`offload bench` (first version): one prompt length, every placement and the HF peers, in one run.

Configurations, declared (printed) before anything is measured:
- all-DEVICE: every page in the DEVICE arena;
- HOST spill: every full page on HOST (on a CPU-only machine HOST is the same RAM and its pages
  are attended in place, never copied: the row says so);
- DISK spill: every full page on DISK, read ahead while earlier layers compute;
- overlap pair: a DEVICE/DISK split chosen so one step's disk reads take about as long as its
  compute, run with the read-ahead (pipelined) and without it (``--no-overlap``: each chunk
  read when needed), to show what the overlap buys;
- peers: transformers with its default DynamicCache and with a StaticCache (what
  ``generate(cache_implementation="static")`` builds), timed as manual greedy loops over the
  same cache classes (checked token-identical to ``generate`` on a short prompt); the faster
  one is the peer of the ratios. Their repetitions alternate with all-DEVICE's (ours, HF
  dynamic, HF static, ours, ...), so the ratios against them are taken side by side.

On CUDA (``--device cuda``, the default where a GPU is present) HOST pages are pinned and
cross PCIe: the pipelined rows copy the next layer's HOST and DISK pieces on a side stream
while the current layer computes (``offload.kv.cuda_fetch``), and ``--no-overlap`` copies each
piece when attention asks for it. ``--random-weights`` (a named shape such as
``llama-3.1-8b``, ``--num-layers`` to shorten it) runs on random token ids and has no
transformers peer (there is no checkpoint to load into transformers).

Each configuration is repeated (default 3): prefill of the prompt, then N decode steps on a
copy-on-write fork of it; median and [min-max] are printed ([n/a] for a smoke run of
``--reps 1``, whose single values are no measurement to quote). The first row and the HF peers
each start with one untimed pass (the process's first prefill or forward is slower: allocator
growth, first touches of memory). Cold read bandwidth is measured
in the same run by reading the DISK spill's pages exactly as a decode step does (same chunks,
staging depth and threads, no compute); the disk bound of a step is its disk bytes divided by
that bandwidth.

On a CPU-only machine the disk readers and the compute share the cores and the memory bus (on
a VM the hypervisor's I/O work may take the same cores), so even a perfect overlap is slower
than max(compute, disk bound). The bench measures that too, in the same run: the all-DEVICE
decode of the last repetition runs again while the DISK spill's reads of one step are repeated
beside it on the store's threads, with no dependence between the two: the step time and read
bandwidth both achieve side by side give the best a pipelined all-DISK step can do on this
machine (printed as information next to the target line, which keeps its own denominator).
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from offload.config import KV_FORMATS, SPARSE_MODES, RuntimeConfig, format_size, parse_dtype
from offload.engine import Engine
from offload.errors import OffloadError
from offload.model.model_source import default_cache_dir, ensure_cache_dir, resolve_model
from offload.commands.args import sparse_fields
from offload.commands.bench_report import SHORT_PROMPT, Beside, Result, median, report
from offload.commands.bench_runs import HFPeers, decode_fork, prefilled, prompt_ids, time_disk_reads
from offload.tuning.pieces import step_breakdown
from offload.kv.placement import Placement
from storage import Tier
from offload.kv.page_table import cdiv

__all__ = ["main"]

def _run_ours(engine: Engine, ids: list[int], decode: int, reps: int, res: Result, progress,
              keep: bool = False, warm: bool = False, between: Callable[[], None] | None = None) -> Any:
    """Run the repetitions; with ``keep`` the last prefilled sequence is kept and returned (with the
    first decoded token) instead of being released. ``warm``: one untimed prefill first (the
    process's first prefill pays for allocator growth and first touches of memory; the HF peers
    get the same, ``HFPeers``). ``between`` runs after each repetition (the peers' repetitions,
    interleaved with these so that drifts of a shared machine hit both sides alike)."""
    kept = None
    if warm:
        engine.release(prefilled(engine, ids))
    for rep in range(reps):
        doc = engine.new_sequence()
        t0 = time.perf_counter()
        logits = engine.forward(doc, ids)
        engine.kv.writes.flush()
        res.prefill_s.append(time.perf_counter() - t0)
        tok = int(torch.argmax(logits[-1]))
        if rep == 0:  # untimed: kernels compiled on first use (Numba, Triton) stay out of the timings
            decode_fork(engine, doc, tok, 2)
        stats, toks = decode_fork(engine, doc, tok, decode)
        res.decode_s.append(stats.decode_s / max(1, stats.decode_tokens) * decode)
        res.fetch_wait_s.append(stats.fetch_wait_s)
        res.bytes_per_token = stats.bytes_read_per_token
        res.tokens = [tok] + toks
        if stats.sparse != "exact":
            res.sparse = {k: getattr(stats, k) for k in (
                "sparse", "sparse_budget", "kv_fraction_read", "kv_fraction_read_max", "kv_fraction_fetched",
                "sparse_fallback", "selection_s", "sync_miss_bytes_per_token", "wasted_prefetch_bytes_per_token",
                "speculation_hit_rate")}
        if keep and rep == reps - 1:
            kept = (doc, tok)
        else:
            engine.release(doc)
        progress()
        if between is not None:
            between()
    return kept


def _decode_beside_reads(dev: Engine, kept: Any, disk: Engine, disk_seq: Any, decode: int, reps: int) -> Beside:
    """Time ``reps`` all-DEVICE decodes of ``decode`` steps each while a thread repeats the DISK
    spill's reads of one step (``time_disk_reads``: same chunks, staging and threads) until they
    end. The two share nothing but the machine."""
    doc, tok = kept
    stop = threading.Event()
    moved: list[tuple[int, float]] = []
    errors: list[BaseException] = []

    def read_loop() -> None:
        try:
            while not stop.is_set():
                moved.append(time_disk_reads(disk, disk_seq))
        except BaseException as e:  # noqa: BLE001 - re-raised on the bench's thread below
            errors.append(e)

    reader = threading.Thread(target=read_loop, name="bench-reads-beside", daemon=True)
    reader.start()
    steps = []
    try:
        while not moved and not errors:  # the readers are running before the timing starts
            time.sleep(0.01)
        for _ in range(reps):
            stats, _ = decode_fork(dev, doc, tok, decode)
            steps.append(stats.decode_s / max(1, stats.decode_tokens))
    finally:
        stop.set()
        reader.join()
    if errors:
        raise errors[0]
    passes = moved[1:-1] or moved  # the first and last passes ran only partly beside the decodes
    return Beside(steps, sum(b for b, _ in passes) / sum(t for _, t in passes) / 1e9)


def _host_extra(cfg: Any, dtype: torch.dtype) -> int:
    """HOST bytes beside the HOST-spill row's pages: the DISK staging area the HOST budget also
    holds (``offload.tiers``), with 16 MiB to spare, at least 64 MiB (an MHA shape's 512 KiB
    pages, Llama-2-7B's, need a 136 MiB staging area)."""
    from offload.tuning.planning import staging_bytes

    c = RuntimeConfig()
    page_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize * c.page_size
    staging = staging_bytes(page_bytes, staging_chunk_pages=c.staging_chunk_pages, staging_buffers=c.staging_buffers)
    return max(64 * 2**20, staging + 16 * 2**20)


def _overlap_placement(engine: Engine, n_tokens: int, step_s: float, read_gbps: float) -> Placement:
    """DEVICE/DISK split whose disk reads per step take about ``step_s`` (the compute time)."""
    ps, layers = engine.config.page_size, engine.model_config.num_layers
    pages = cdiv(n_tokens, ps)
    disk_pages = int(step_s * read_gbps * 1e9 / (engine.arena.slot_bytes * layers))
    disk_pages = max(1, min(pages - 1, disk_pages))
    return Placement(device_pages=pages - disk_pages, host_pages=0)


def build_parser() -> argparse.ArgumentParser:
    from offload.commands.args import OneLineParser

    p = OneLineParser(prog="offload bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of the model's shape, random prompt ids, no transformers peer")
    p.add_argument("--num-layers", type=int, default=None, help="with --random-weights: only this many layers")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="weights and KV dtype (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--contexts", default=None, help="sweep: contexts in tokens, K = 1024 (default 8K), e.g. 2K,8K,32K")
    p.add_argument("--modes", default=None, help="sweep: exact, quest, speculative, lsh, 4bit, 4bit+quest, "
                   "4bit+speculative, comma-separated (default exact)")
    p.add_argument("--placements", default=None, help="sweep: device, host, disk (default device,disk)")
    p.add_argument("--out", type=Path, default=None, help="sweep: directory for results.json, report.md and the "
                   "plots (default bench-out)")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                   help="rewrite report.md and the plots beside a sweep's results.json, from it alone")
    p.add_argument("--prefill-reps", type=int, default=None,
                   help="sweep: prefill repetitions per context (default --reps up to 8K tokens, 1 above)")
    p.add_argument("--peers-all-contexts", action="store_true", help="sweep: peers beyond 8K tokens too")
    p.add_argument("--no-peers", default=None, help="sweep: leave out these peers (transformers, llamacpp, vllm)")
    p.add_argument("--allow-long-context", action="store_true", help="sweep: contexts beyond the model's window")
    p.add_argument("--synthetic-kv", action="store_true", help="sweep, with --random-weights: random K/V written "
                   "through the engine's write path instead of a prefill (long contexts of large shapes)")
    p.add_argument("--fidelity", type=Path, default=None,
                   help="sweep: the sparse harness's JSON (bench/fidelity.py --json-out), for the fidelity plot")
    p.add_argument("--tokens", type=int, default=None,
                   help="single-context shorthand (today's first version): prompt tokens (default 8192)")
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--reps", type=int, default=3,
                   help="repetitions of each row (default 3; 1 is a smoke run: its spreads print n/a)")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers peers")
    p.add_argument("--sparse", nargs="+", choices=[m for m in SPARSE_MODES if m != "exact"], default=None,
                   help="also run these sparse modes all-DISK (and a short-prompt all-DEVICE row for their bound); "
                        "quest and speculative together also print speculative against quest")
    p.add_argument("--sparse-budget", type=float, default=None, metavar="F", help="with --sparse (default 0.1)")
    p.add_argument("--sparse-cache", default=None, metavar="SIZE",
                   help="with --sparse: also run each mode all-DISK with a page cache of SIZE (the DISK pages a "
                        "step read, kept in memory for the next steps)")
    p.add_argument("--kv-format", nargs="+", choices=KV_FORMATS, default=None,
                   help="page formats to run all-DISK beside the exact rows (which always run): 4bit adds "
                        "'4bit DISK spill' and, with --sparse, 4bit with each sparse mode")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def _sweep(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The sweep (``offload.commands.sweep``) with this parser's defaults filled in."""
    if args.no_hf:
        args.no_peers = ",".join(filter(None, [args.no_peers, "transformers"]))
    skip = [t.strip() for t in (args.no_peers or "").split(",") if t.strip()]
    bad = [t for t in skip if t not in ("transformers", "llamacpp", "vllm")]
    if bad:
        print(f"offload bench: error: --no-peers: {bad[0]} is not one of transformers, llamacpp, vllm", file=sys.stderr)
        return 2
    args.no_peers = skip
    args.contexts = args.contexts or "8K"
    args.modes = args.modes or "exact"
    args.placements = args.placements or "device,disk"
    args.out = args.out or Path("bench-out")
    args.argv = list(sys.argv[2:] if argv is None else argv)
    from offload.commands.sweep import run_sweep

    return run_sweep(args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return e.code if isinstance(e.code, int) else 2
    if args.render is not None:
        from offload.commands import bench_render

        return bench_render.main([str(args.render)] + ([] if args.fidelity is None else ["--fidelity", str(args.fidelity)]))
    if (args.tokens is None and args.json_out is None and not args.sparse and not args.kv_format
            and not args.sparse_cache):
        return _sweep(args, argv)
    sweep_only = [f for f, v in (("--contexts", args.contexts), ("--modes", args.modes), ("--placements", args.placements),
                                 ("--out", args.out), ("--fidelity", args.fidelity), ("--no-peers", args.no_peers),
                                 ("--prefill-reps", args.prefill_reps),
                                 ("--synthetic-kv", args.synthetic_kv or None)) if v is not None]
    if sweep_only:
        print(f"offload bench: error: {sweep_only[0]} belongs to the sweep, and --tokens/--json-out to the "
              "single-context shorthand: use one or the other", file=sys.stderr)
        return 2
    args.tokens = 8192 if args.tokens is None else args.tokens
    if args.reps < 1:
        print("offload bench: error: --reps must be >= 1 (3 or more for a median and a spread; 1 is a smoke run)",
              file=sys.stderr)
        return 2
    cache = ensure_cache_dir(args.cache_dir or default_cache_dir())
    try:
        modes = list(dict.fromkeys(args.sparse or []))
        sparse = sparse_fields(argparse.Namespace(sparse=modes[0] if modes else None, sparse_budget=args.sparse_budget,
                                                  sparse_cache=args.sparse_cache))
        base = RuntimeConfig(device=args.device, dtype=None if args.dtype is None else parse_dtype(args.dtype))
        device = base.resolved_device()
        dtype = base.resolved_dtype(device)
        source = resolve_model(args.model, cache_dir=cache, random_weights=args.random_weights,
                               num_layers=args.num_layers, show_progress=not args.quiet)
    except (ValueError, OffloadError) as e:
        print(f"offload bench: error: {e}", file=sys.stderr)
        return 2
    no_hf = args.no_hf or source.weights_dir is None
    ids = prompt_ids(source, args.tokens)
    kv_dir = str(cache / "kv")
    formats = [f for f in dict.fromkeys(args.kv_format or []) if f != "exact"]
    cached = int(sparse.get("sparse_cache_bytes", 0))  # with --sparse-cache: each mode again with the cache
    n_configs = (5 + (0 if no_hf else 2) + (len(modes) * (2 if cached else 1) + 1 if modes else 0)
                 + len(formats) * (1 + len(modes)))
    cuda = device.type == "cuda"
    where = (f"{torch.cuda.get_device_name(device)}" if cuda else f"cpu, {torch.get_num_threads()} threads")
    print(f"offload bench: {args.model}{' (random weights)' if source.weights_dir is None else ''}, "
          f"{str(dtype).removeprefix('torch.')} on {where}, prompt {len(ids)} tokens "
          f"({'essays' if source.tokenizer_dir is not None else 'random ids'}), {args.decode_tokens} decode steps, "
          f"{args.reps} repetitions each{' (a smoke run: no spread, nothing to quote)' if args.reps < 3 else ''}; "
          f"torch {torch.__version__}")
    host_note = ("HOST spill (pinned, copied over PCIe)" if cuda
                 else "HOST spill (CPU-only: HOST is RAM, pages attended in place, not copied)")
    peers = ("HF DynamicCache, HF StaticCache (manual greedy loops)" if not no_hf else
             "no HF peers" + (" (random weights: no checkpoint for transformers)" if source.weights_dir is None else ""))
    sparse_rows = ""
    budget = float(sparse.get("sparse_budget", 0.1))
    if modes:
        sparse_rows = "".join(f" | DISK spill, {m} F={budget:g}" + (
            f" | DISK spill, {m} F={budget:g}, page cache {format_size(cached)}" if cached else "") for m in modes) + (
            f" | all-DEVICE at {SHORT_PROMPT} tokens (the step's context-independent part)")
    format_rows = "".join(f" | {fmt} DISK spill" + "".join(f" | {fmt} DISK spill, {m} F={budget:g}" for m in modes)
                          for fmt in formats)
    print(f"configurations: all-DEVICE | {host_note} | DISK spill (read-ahead) | DEVICE/DISK split with compute ~ "
          f"disk time, pipelined{' (fetch-ahead on a side stream)' if cuda else ''} and --no-overlap{sparse_rows}"
          f"{format_rows} | {peers}")
    cfg = source.config
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * dtype.itemsize
    from tqdm import tqdm

    bar = tqdm(total=n_configs * args.reps + 1, desc="bench", disable=args.quiet, leave=False)  # + the breakdown
    results: dict[str, Result] = {}

    kept: dict[str, Any] = {}

    def run(name: str, note: str, keep: bool = False, prompt: list[int] = ids, warm: bool = False,
            between: Callable[[], None] | None = None, **kw: Any) -> Engine:
        # Every row gives a placement or a DEVICE budget of twice the prompt, so no engine here
        # ever plans: the bench needs no hardware profile and never measures one
        # (offload.tuning.profile.profile_for would for the DEVICE budget alone).
        kw.setdefault("device_memory_bytes", 2 * len(ids) * kv_per_token + 64 * 2**20)
        engine = Engine(source, RuntimeConfig(device=str(device), dtype=dtype, kv_dir=kv_dir, **kw))
        results[name] = Result(name, note)
        kept[name] = _run_ours(engine, prompt, args.decode_tokens, args.reps, results[name], bar.update, keep, warm,
                               between)
        return engine

    # The HF peers' repetitions alternate with all-DEVICE's: the ratios of the issue are taken
    # side by side. The all-DEVICE engine and its last prompt stay for the breakdown by piece
    # and, on CPU, the reads-beside-compute timing.
    peers = None if no_hf else HFPeers(source, ids, args.decode_tokens, bar.update, device, dtype)
    dev = run("all-DEVICE", "every page in the DEVICE arena", keep=True, warm=True,
              between=None if peers is None else peers.rep)
    peer_results = {} if peers is None else peers.results
    del peers  # its model's memory goes before the other rows
    kv_step = sum(results["all-DEVICE"].bytes_per_token.values())
    breakdown = step_breakdown(dev, *kept["all-DEVICE"], ids, kv_step)
    bar.update()
    if cuda:
        dev.release(kept["all-DEVICE"][0])
        dev.close()
    run("HOST spill", "pinned, over PCIe" if cuda else "HOST = RAM here: attended in place",
        placement=Placement.all_on(Tier.HOST), host_memory_bytes=2 * len(ids) * kv_per_token + _host_extra(cfg, dtype)
        ).close()
    disk = run("DISK spill", "all full pages on DISK, read ahead", placement=Placement.all_on(Tier.DISK))
    # Cold read bandwidth, same pattern as a decode step, in this run.
    seq = disk.new_sequence()
    disk.forward(seq, ids)
    reads = [time_disk_reads(disk, seq) for _ in range(3)]
    read_gbps = median([b / s / 1e9 for b, s in reads])
    disk_bytes = reads[0][0]
    cold = disk.disk.cold_read_mode if disk.disk is not None else "none"
    beside = None
    if not cuda:
        beside = _decode_beside_reads(dev, kept["all-DEVICE"], disk, seq, args.decode_tokens, args.reps)
        dev.close()
    disk.release(seq)
    disk.close()
    step_s = median(results["all-DEVICE"].decode_s) / args.decode_tokens
    split = _overlap_placement(disk, len(ids), step_s, read_gbps)
    run("split, pipelined", f"pages >= {split.device_pages} on DISK", placement=split).close()
    run("split, --no-overlap", "same, each chunk read when needed", placement=split, overlap=False).close()
    for mode in modes:
        run(f"DISK spill, {mode}", f"F={budget:g}, all full pages on DISK", placement=Placement.all_on(Tier.DISK),
            sparse=mode, sparse_budget=budget).close()
        if cached:
            run(f"DISK spill, {mode}, page cache", f"F={budget:g}, all full pages on DISK, {format_size(cached)} "
                f"page cache", placement=Placement.all_on(Tier.DISK), sparse=mode, sparse_budget=budget,
                sparse_cache_bytes=cached).close()
    for fmt in formats:
        for mode in [None, *modes]:
            run(f"{fmt} DISK spill" + (f", {mode}" if mode else ""), "all full pages on DISK" + (
                f", F={budget:g}" if mode else ""), placement=Placement.all_on(Tier.DISK), kv_format=fmt,
                **({"sparse": mode, "sparse_budget": budget} if mode else {})).close()
    if modes:
        run("all-DEVICE, short", f"{SHORT_PROMPT}-token prompt", prompt=ids[:SHORT_PROMPT]).close()
    results.update(peer_results)
    bar.close()
    report(args, results, ids, read_gbps, disk_bytes, cold, step_s, beside, breakdown)
    return 0

