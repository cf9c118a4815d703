"""`offload plan`: the planner's placement of a model's KV cache, without running the model.

    offload plan --model llama-3.1-8b --context 131072 --device-memory 24GiB --host-memory 64GiB
    offload plan ... --preset rtx4090-pcie4 --json          # a GPU plan made on any machine
    offload plan ... --sparse quest --sparse-budget 0.1      # a decode step reads 10% of the K/V bytes
    offload plan ... --kv-format 4bit                       # pages stored in 4 bits
    offload plan ... --recompute auto                       # let the LP recompute K/V (KVPR), and say why
    offload plan ... --what-if                              # also explore recompute (--recompute auto)

Budgets here are a tier's memory for the whole run (weights, working buffers and staging
included, 0.8 of each usable): see ``offload.tuning.planning``. Without ``--profile`` or ``--preset``
the plan uses this machine's saved ``offload profile`` (a quick measurement when none is
saved). No placement fits -> exit 2, naming each violated constraint and the smallest budget
that works.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from offload.commands.args import OneLineParser, flag_error, size_flag, sparse_fields
from offload.config import (KV_FORMATS, SPARSE_MODES, RuntimeConfig, check_sparse_budget, default_prefill_chunk,
                            parse_dtype)
from planner.recompute import RecomputeMode
from planner.restore import PRESET_PREFILL_EFFICIENCY

if TYPE_CHECKING:
    from planner import HardwareProfile, PlanInfeasibleError, PlanProblem

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="offload plan", description="Plan where a model's KV cache lives (LP over "
                                "tier fractions, priced by a hardware profile) without running the model.")
    p.add_argument("--model", default="smollm2-135m",
                   help="a named shape (llama-3.1-8b, qwen2.5-7b, ...), a packaged model or a checkpoint directory")
    p.add_argument("--context", type=int, required=True, help="tokens of context per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--allow-long-context", action="store_true",
                   help="plan a context longer than the model's window (ask refuses one without this flag too)")
    p.add_argument("--device-memory", default=None, help="device memory for the run: weights + buffers + KV "
                   "(e.g. 24GiB; default: the profile's free device memory)")
    p.add_argument("--host-memory", default=None, help="host memory for staging + KV (default: the profile's free)")
    p.add_argument("--disk-space", default=None, help="disk space for KV (default: the profile's free; 0 = none)")
    p.add_argument("--dtype", default=None, help="weights/compute dtype: fp32, bf16, fp16 "
                   "(default bf16 for a GPU profile, fp32 for a CPU one)")
    p.add_argument("--kv-dtype", default=None, help="KV dtype (default: --dtype)")
    p.add_argument("--page-size", type=int, default=32)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--profile", type=Path, default=None, help="a profile JSON saved by `offload profile`")
    src.add_argument("--preset", default=None, help="a named hardware preset (cpu-2core, rtx4090-pcie4, h100-pcie5, "
                     "h100-sxm)")
    p.add_argument("--layer-groups", type=int, default=1, help="layer groups the LP may split differently")
    p.add_argument("--what-if", action="store_true",
                   help="also explore recompute (--recompute auto unless given)")
    p.add_argument("--recompute", choices=[m.value for m in RecomputeMode], default=None,
                   help="what the planner may recompute: none (the default without --what-if), kvpr (keep a share of "
                        "HOST pages as the layer's input activations and recompute their K/V on the device: fewer "
                        "bytes only where hidden_size < 2 x kv_heads x head_dim, as in MHA models), auto (the best "
                        "priced form: kvpr), lowrank (low-rank keys: accepted, not priced yet); the plan says what "
                        "it chose and why. The engine runs KVPR with its own --recompute kvpr (Llama-family "
                        "models)")
    p.add_argument("--sparse", choices=SPARSE_MODES, default=None,
                   help="the decode mode to plan for (quest reads F of the K/V bytes a step would read)")
    p.add_argument("--sparse-budget", "--sparse-fraction", dest="sparse_budget", type=float, default=None,
                   metavar="F", help="with --sparse (or --what-if): the share of K/V bytes a step reads, in (0, 1] "
                   "(--sparse-fraction is its old name)")
    p.add_argument("--kv-format", choices=KV_FORMATS, default="exact",
                   help="price the placed pages as stored in this format (4bit: packed pages, about a sixth "
                        "of fp32's bytes)")
    p.add_argument("--greedy", action="store_true", help="also print the greedy baseline (fill DEVICE, HOST, DISK "
                   "layer by layer)")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the saved profile lives")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display")
    return p


def _profile(args: argparse.Namespace):
    from planner import HardwareProfile

    if args.preset:
        return HardwareProfile.preset(args.preset)
    if args.profile:
        try:
            return HardwareProfile.from_json(args.profile.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"cannot read the profile {args.profile} ({e.strerror}); check the path") from None
    from offload.tuning.profile import load_or_measure

    return load_or_measure(cache_dir=args.cache_dir, quick=True, progress=not args.quiet)


def _model_config(name: str, cache_dir: Path | None):
    from offload.model.model_source import config_from_hf, default_cache_dir, resolve_model
    from offload.model.shapes import NAMED_SHAPES

    if name in NAMED_SHAPES:
        return config_from_hf(NAMED_SHAPES[name])
    return resolve_model(name, cache_dir=cache_dir or default_cache_dir(), random_weights=True,
                         show_progress=False).config


def _check(args: argparse.Namespace) -> None:
    """The flags' own checks, before a profile is measured or a model resolved.

    Raises:
        InputError: naming the flag."""
    from offload.errors import InputError

    for flag, value in (("--context", args.context), ("--batch-size", args.batch_size),
                        ("--layer-groups", args.layer_groups)):
        if value < 1:
            raise InputError(f"{flag} must be at least 1, got {value}")
    try:
        RuntimeConfig(page_size=args.page_size)  # the config owns the page size's bounds
    except InputError as e:
        raise flag_error(e, {"page_size": "--page-size"}) from None
    if args.sparse_budget is not None and not args.what_if:
        sparse_fields(args)  # a budget needs a sparse mode
    if args.sparse_budget is not None:
        check_sparse_budget(args.sparse_budget, "--sparse-budget")
    size_flag("--device-memory", args.device_memory, minimum=1)
    size_flag("--host-memory", args.host_memory)
    size_flag("--disk-space", args.disk_space)
    for flag, value in (("--dtype", args.dtype), ("--kv-dtype", args.kv_dtype)):
        if value is not None:
            try:
                parse_dtype(value)
            except ValueError as e:
                raise InputError(f"{flag}: {e}") from None


def _fetch(args: argparse.Namespace, budget: float) -> float:
    """Pages moved per page attended off DEVICE: Quest reads its live pool ahead, speculation
    the pool pages it predicts."""
    if args.sparse not in ("quest", "speculative") or budget >= 1:
        return 1.0
    from offload.attention.quest import pool_fetch_ratio
    from offload.attention.speculative import fetch_ratio

    ratio = pool_fetch_ratio if args.sparse == "quest" else fetch_ratio
    return ratio(-(-args.context // args.page_size), budget, args.page_size)


def _budget(args: argparse.Namespace) -> float:
    """F the plan prices: the given budget, a sparse mode's default, or 1 (exact)."""
    if args.sparse_budget is not None:
        return args.sparse_budget
    return RuntimeConfig(sparse=args.sparse).sparse_budget if args.sparse not in (None, "exact") else 1.0


def _packed_page_bytes(cfg, args: argparse.Namespace) -> int | None:
    """Bytes of a 4-bit page with ``--kv-format 4bit`` (None: exact pages)."""
    if args.kv_format != "4bit":
        return None
    from offload.kv.quant_pages import Quant4Layout  # (the kernels it imports load only when asked)

    return Quant4Layout(cfg.num_kv_heads, args.page_size, cfg.head_dim).page_bytes


def _packed_note(problem: PlanProblem, profile: HardwareProfile) -> str:
    """How the plan prices 4-bit pages: their bytes and the 4-bit kernel's rate."""
    ratio = problem.page_bytes / problem.exact_page_bytes
    rates = []
    for where, device, measured in (("device", True, profile.device_attention_4bit_gbps),
                                    ("CPU", False, profile.cpu_attention_4bit_gbps)):
        gbps = profile.attention_4bit_gbps(device=device, stored_ratio=ratio)
        rates.append(f"{where} {gbps:.1f} GB/s{'' if measured is not None else ' (unmeasured: as exact)'}")
    return (f" ({problem.page_bytes}-byte 4-bit pages, {ratio:.3f} of exact; 4-bit attention "
            f"{', '.join(rates)} of pages as stored, dequantization included)")


def _lsh_note(cfg, args: argparse.Namespace, budget: float, kv_dtype: torch.dtype) -> str:
    """What ``--sparse lsh`` holds and reads: K, L, its tables' bytes in CPU memory beside the
    global layers' KV, and the rows a step may sample per layer and KV head within F."""
    from offload.attention.lsh import lsh_params
    from offload.attention.quest import fixed_pages

    p = lsh_params(seed=0)
    layers = sum(w is None for w in cfg.layer_windows)
    table = layers * cfg.num_kv_heads * p.tables * 2 * args.context  # the uint16 ids (offsets, planes: little)
    kv = 2 * layers * cfg.num_kv_heads * cfg.head_dim * kv_dtype.itemsize * args.context
    n = -(-args.context // args.page_size)
    rows = max(0, int(budget * n * args.page_size) - len(fixed_pages(n)) * args.page_size)
    return (f"lsh: K={p.bits} bits x L={p.tables} tables (>= {p.min_hits} hits; fixed defaults, not the planner's "
            f"choice yet); tables {table / 2**20:.1f} MiB in CPU memory outside the tiers, beside "
            f"{kv / 2**20:.1f} MiB of the global layers' KV; at F={budget:g} a step samples at most {rows} rows "
            f"per global layer and KV head (fewer as bucket ids are paid), DISK pages read whole")


def _recompute_mode(args: argparse.Namespace) -> RecomputeMode:
    """``--recompute``, or auto with ``--what-if`` and none without."""
    if args.recompute is not None:
        return RecomputeMode(args.recompute)
    return RecomputeMode.AUTO if args.what_if else RecomputeMode.NONE


def _problem(args: argparse.Namespace, cfg, profile: HardwareProfile, *, dtype: torch.dtype, kv_dtype: torch.dtype,
             budget: float, mode: RecomputeMode) -> PlanProblem:
    """The flags' whole-run planning problem (``offload.tuning.planning.model_problem``)."""
    from offload.tuning.planning import model_problem

    return model_problem(
        cfg, context_tokens=args.context, dtype_bytes=dtype.itemsize, kv_dtype_bytes=kv_dtype.itemsize,
        device_budget_bytes=size_flag("--device-memory", args.device_memory, minimum=1),
        host_budget_bytes=size_flag("--host-memory", args.host_memory),
        disk_budget_bytes=size_flag("--disk-space", args.disk_space), page_size=args.page_size,
        batch_size=args.batch_size, allow_recompute=mode.allows_kvpr, sparse_budget=budget,
        sparse_fetch=_fetch(args, budget), num_layer_groups=args.layer_groups,
        packed_page_bytes=_packed_page_bytes(cfg, args),
        prefill_chunk_tokens=default_prefill_chunk(torch.device("cpu" if profile.device_is_host else "cuda")))


def _restore_split(args: argparse.Namespace, cfg, profile: HardwareProfile, result, kv_dtype: torch.dtype):
    """The compute-or-load split of a DocCache hit of ``--context`` tokens, its pages placed as
    the plan places them (``offload.kv.cake.preset_split``)."""
    from offload.kv.cake import preset_split
    from offload.kv.doc_restore import RESTORE_PIECE_BYTES

    disk = sum(result.disk_pages) / max(1, result.num_layers * result.pages_per_layer)
    chunk = default_prefill_chunk(torch.device("cpu" if profile.device_is_host else "cuda"))
    return preset_split(cfg, profile, tokens=args.context, page_size=args.page_size, chunk=chunk,
                        kv_dtype_bytes=kv_dtype.itemsize, disk_share=disk, read_bytes=RESTORE_PIECE_BYTES)[1]


def _refuse(args: argparse.Namespace, e: PlanInfeasibleError, problem: PlanProblem, dtype: torch.dtype) -> int:
    """Print why no placement fits (JSON too with ``--json``); the exit status 2."""
    message = str(e)
    if args.dtype is None and dtype.itemsize == 4 and any(v.startswith("device: weights") for v in e.violations):
        # The CPU default dtype is fp32 (fastest there); a user planning a big model often means bf16.
        message += (f" (the weights are fp32, the default with a CPU-only profile; --dtype bf16 halves them to "
                    f"{problem.weight_bytes / 2 / 2**30:.1f} GiB)")
    if args.json:
        print(json.dumps({"error": message, "violations": list(e.violations)}))
    print(f"offload: error: {message}", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    from offload.errors import ContextTooLongError
    from planner import PlanInfeasibleError, greedy_plan, plan, recompute_choice

    _check(args)
    cfg = _model_config(args.model, args.cache_dir)
    window = cfg.max_position_embeddings
    if args.context > window and not args.allow_long_context:
        raise ContextTooLongError(
            f"--context {args.context} exceeds {args.model}'s context window of {window} tokens; the engine "
            "refuses such a prompt, so plan at most that, or pass --allow-long-context to plan it anyway")
    if args.context > window:
        print(f"offload plan: note: {args.context} tokens are past {args.model}'s context window of {window} "
              "(--allow-long-context)", file=sys.stderr)
    profile = _profile(args)
    dtype = parse_dtype(args.dtype or ("fp32" if profile.device_is_host else "bf16"))
    kv_dtype = parse_dtype(args.kv_dtype) if args.kv_dtype else dtype
    budget = _budget(args)
    mode = _recompute_mode(args)
    problem = _problem(args, cfg, profile, dtype=dtype, kv_dtype=kv_dtype, budget=budget, mode=mode)
    try:
        result = plan(problem, profile)
        baseline = greedy_plan(problem, profile) if args.greedy else None
        why = recompute_choice(problem, profile, result, mode)
    except PlanInfeasibleError as e:
        return _refuse(args, e, problem, dtype)
    head = (f"{args.model}: {args.context} tokens x batch {args.batch_size}, {str(dtype).removeprefix('torch.')} "
            f"weights, {str(kv_dtype).removeprefix('torch.')} KV"
            f"{_packed_note(problem, profile) if args.kv_format == '4bit' else ''}; profile {profile.name}")
    restore = _restore_split(args, cfg, profile, result, kv_dtype)
    if args.json:
        out = {"model": args.model, "context": args.context, "profile": profile.name, "plan": result.to_dict(),
               "recompute": why.to_dict(), "restore": restore.to_dict()}
        if baseline is not None:
            out["greedy"] = baseline.to_dict()
        print(json.dumps(out))
        return 0
    print(head)
    if args.sparse == "lsh":
        print(_lsh_note(cfg, args, budget, kv_dtype))
    print(result.explain())
    print(why.line())
    print(f"DocCache restore (Cake, {args.context} tokens): {restore.explain()}; recompute priced at "
          f"{PRESET_PREFILL_EFFICIENCY:.0%} of {profile.name}'s matmul rate (a hit on this machine prices it from "
          "the document's own ingest)")
    if baseline is not None:
        ratio = baseline.decode_step_s / result.decode_step_s
        print(f"\n{baseline.explain()}\nGreedy step / LP step: {ratio:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except ValueError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - offload errors (bad model names) print one line too
        from offload.errors import OffloadError

        if isinstance(e, OffloadError):
            print(f"offload: error: {e}", file=sys.stderr)
            return 2
        raise
