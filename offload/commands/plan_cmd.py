"""`offload plan`: the planner's placement of a model's KV cache, without running the model.

    offload plan --model llama-3.1-8b --context 131072 --device-memory 24GiB --host-memory 64GiB
    offload plan ... --preset rtx4090-pcie4 --json          # a GPU plan made on any machine
    offload plan ... --what-if --sparse-fraction 0.25       # explore recompute and sparse reads

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

from offload.config import parse_dtype, parse_size

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offload plan", description="Plan where a model's KV cache lives (LP over "
                                "tier fractions, priced by a hardware profile) without running the model.")
    p.add_argument("--model", default="smollm2-135m",
                   help="a named shape (llama-3.1-8b, qwen2.5-7b, ...), a packaged model or a checkpoint directory")
    p.add_argument("--context", type=int, required=True, help="tokens of context per sequence")
    p.add_argument("--batch-size", type=int, default=1)
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
                   help="also explore what the engine cannot execute yet: recompute, a sparse fraction")
    p.add_argument("--sparse-fraction", type=float, default=1.0, help="with --what-if: share of pages a step reads")
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


def _size(value: str | None) -> int | None:
    return None if value is None else parse_size(value)


def _run(args: argparse.Namespace) -> int:
    from offload.tuning.planning import model_problem
    from planner import PlanInfeasibleError, greedy_plan, plan

    if args.context < 1:
        raise ValueError(f"--context must be >= 1, got {args.context}")
    profile = _profile(args)
    dtype = parse_dtype(args.dtype or ("fp32" if profile.device_is_host else "bf16"))
    kv_dtype = parse_dtype(args.kv_dtype) if args.kv_dtype else dtype
    cfg = _model_config(args.model, args.cache_dir)
    problem = model_problem(
        cfg, context_tokens=args.context, dtype_bytes=dtype.itemsize, kv_dtype_bytes=kv_dtype.itemsize,
        device_budget_bytes=_size(args.device_memory), host_budget_bytes=_size(args.host_memory),
        disk_budget_bytes=_size(args.disk_space), page_size=args.page_size, batch_size=args.batch_size,
        what_if=args.what_if, sparse_fraction=args.sparse_fraction, num_layer_groups=args.layer_groups)
    try:
        result = plan(problem, profile)
        baseline = greedy_plan(problem, profile) if args.greedy else None
    except PlanInfeasibleError as e:
        message = str(e)
        if args.dtype is None and dtype.itemsize == 4 and any(v.startswith("device: weights") for v in e.violations):
            # The CPU default dtype is fp32 (fastest there); a user planning a big model often means bf16.
            message += (f" (the weights are fp32, the default with a CPU-only profile; --dtype bf16 halves them to "
                        f"{problem.weight_bytes / 2 / 2**30:.1f} GiB)")
        if args.json:
            print(json.dumps({"error": message, "violations": list(e.violations)}))
        print(f"offload: error: {message}", file=sys.stderr)
        return 2
    head = (f"{args.model}: {args.context} tokens x batch {args.batch_size}, {str(dtype).removeprefix('torch.')} "
            f"weights, {str(kv_dtype).removeprefix('torch.')} KV; profile {profile.name}")
    if args.json:
        out = {"model": args.model, "context": args.context, "profile": profile.name, "plan": result.to_dict()}
        if baseline is not None:
            out["greedy"] = baseline.to_dict()
        print(json.dumps(out))
        return 0
    print(head)
    print(result.explain())
    if baseline is not None:
        ratio = baseline.decode_step_s / result.decode_step_s
        print(f"\n{baseline.explain()}\nGreedy step / LP step: {ratio:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
