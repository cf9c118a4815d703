"""The sweep's options checked before anything loads (one-line errors), and the plan they make:
contexts, modes (mapped onto ``sparse`` and ``kv_format``), placements, repetitions."""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable

import torch

from offload.config import RuntimeConfig, check_sparse_budget, parse_dtype
from offload.errors import InputError
from storage import Tier

__all__ = ["MODES", "PLACEMENTS", "SweepPlan", "parse_contexts", "parse_modes", "plan_sweep", "declare"]

K = 1024
# A mode's RuntimeConfig fields; "4bit+quest" and the like combine a page format with a sparse mode.
MODES: dict[str, dict[str, str]] = {
    "exact": {}, "quest": {"sparse": "quest"}, "speculative": {"sparse": "speculative"}, "lsh": {"sparse": "lsh"},
    "4bit": {"kv_format": "4bit"}, "4bit+quest": {"kv_format": "4bit", "sparse": "quest"},
    "4bit+speculative": {"kv_format": "4bit", "sparse": "speculative"},
}
PLACEMENTS = {"device": Tier.DEVICE, "host": Tier.HOST, "disk": Tier.DISK}
QUESTION = 32  # tokens of the request prefilled after the document (on a DocCache hit: the time to first token)


def parse_contexts(text: str) -> list[int]:
    """``2K,8K,32K`` (K = 1024) or plain token counts, in the order given, duplicates dropped."""
    out: list[int] = []
    for part in filter(str.strip, text.split(",")):
        p = part.strip().upper()
        try:
            n = int(p[:-1]) * K if p.endswith("K") else int(p)
        except ValueError:
            raise InputError(f"--contexts: {part.strip()!r} is not a context; write e.g. 2K,8K,32K or 4096") from None
        if n <= 0:
            raise InputError(f"--contexts: {part.strip()} must be a positive number of tokens")
        if n not in out:
            out.append(n)
    if not out:
        raise InputError("--contexts is empty; write e.g. 2K,8K,32K")
    return out


def _parse_list(text: str, known: dict[str, Any], flag: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise InputError(f"{flag}: {', '.join(bad) if bad else 'nothing given'} is not one of {', '.join(known)}")
    return list(dict.fromkeys(items))


def parse_modes(text: str) -> list[str]:
    return _parse_list(text, MODES, "--modes")


@dataclasses.dataclass
class SweepPlan:
    """What one sweep runs, fixed before anything is measured."""

    model: str
    source: Any  # ModelSource
    contexts: list[int]
    modes: list[str]
    placements: list[str]
    reps: int
    decode: int
    question: int
    sparse_budget: float
    device: torch.device
    dtype: torch.dtype
    prefill_reps_given: int | None
    random_weights: bool
    synthetic: bool = False

    @property
    def formats(self) -> list[str]:
        """The page formats that need a prefill of their own, exact first."""
        return list(dict.fromkeys(MODES[m].get("kv_format", "exact") for m in self.modes))

    def prefill_reps(self, tokens: int) -> int:
        if self.prefill_reps_given is not None:
            return self.prefill_reps_given
        return self.reps if tokens <= 8 * K else 1

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "random_weights": self.random_weights, "synthetic_kv": self.synthetic,
                "contexts": self.contexts,
                "modes": self.modes, "mode_fields": {m: MODES[m] for m in self.modes}, "placements": self.placements,
                "reps": self.reps, "prefill_reps": {str(c): self.prefill_reps(c) for c in self.contexts},
                "decode_tokens": self.decode, "question_tokens": self.question, "sparse_budget": self.sparse_budget,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "page_size": RuntimeConfig().page_size, "model_shape": _shape(self.source)}


def _shape(source: Any) -> dict[str, Any]:
    c = source.config
    return {k: getattr(c, k) for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                                       "max_position_embeddings") if hasattr(c, k)}


def plan_sweep(args: argparse.Namespace, resolve_model: Callable[..., Any]) -> SweepPlan:
    """The plan from the parsed flags; every check runs before the model loads, except the
    context window, which needs the model's config.

    Raises:
        InputError / ValueError: a bad flag, with the fix.
    """
    contexts = parse_contexts(args.contexts)
    modes = parse_modes(args.modes)
    placements = _parse_list(args.placements, PLACEMENTS, "--placements")
    if args.reps < 1:
        raise InputError("--reps must be >= 1 (3 or more for a median and a spread; 1 is a smoke run)")
    if args.decode_tokens < 1:
        raise InputError("--decode-tokens must be >= 1")
    if args.synthetic_kv and not args.random_weights:
        raise InputError("--synthetic-kv writes random K/V instead of a prefill: it needs --random-weights")
    if args.prefill_reps is not None and args.prefill_reps < 1:
        raise InputError("--prefill-reps must be >= 1")
    sparse = any("sparse" in MODES[m] for m in modes)
    if args.sparse_budget is not None and not sparse:
        raise InputError("--sparse-budget applies to a sparse mode: name one in --modes (quest, speculative, lsh)")
    budget = 0.1 if args.sparse_budget is None else args.sparse_budget
    check_sparse_budget(budget, "--sparse-budget")
    base = RuntimeConfig(device=args.device, dtype=None if args.dtype is None else parse_dtype(args.dtype))
    device = base.resolved_device()
    if "lsh" in modes and device.type == "cuda":
        raise InputError("--modes lsh runs on the CPU only: leave it out with --device cuda")
    source = resolve_model(args.model, cache_dir=args.cache_dir_resolved, random_weights=args.random_weights,
                           num_layers=args.num_layers, show_progress=not args.quiet)
    window = getattr(source.config, "max_position_embeddings", None)
    low = QUESTION + args.decode_tokens + 64
    for c in contexts:
        if c < low:
            raise InputError(f"--contexts: {c} tokens is too short: each context holds a document, a "
                             f"{QUESTION}-token request and {args.decode_tokens} decode steps; give at least {low}")
        if window and c > window and not args.allow_long_context:
            raise InputError(f"--contexts: {c} tokens is beyond {args.model}'s context window of {window}; add "
                             "--allow-long-context to run it anyway (quality is then not what the model was "
                             "trained for)")
    return SweepPlan(args.model, source, contexts, modes, placements, args.reps, args.decode_tokens, QUESTION,
                     budget, device, base.resolved_dtype(device), args.prefill_reps, args.random_weights,
                     args.synthetic_kv)


def declare(plan: SweepPlan, peers: list[dict[str, Any]]) -> list[str]:
    """The configuration, printed before anything is measured."""
    name = plan.model + (" (random weights)" if plan.random_weights else "")
    where = "cuda" if plan.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    lines = [f"offload bench: {name}, {str(plan.dtype).removeprefix('torch.')} on {where}; contexts "
             f"{', '.join(str(c) for c in plan.contexts)} tokens (document + {plan.question}-token request + "
             f"{plan.decode} decode steps); {plan.reps} repetitions"
             f"{' (a smoke run: no spread, nothing to quote)' if plan.reps < 3 else ''}",
             f"rows: modes {', '.join(plan.modes)} x placements {', '.join(plan.placements)}"
             + (f"; sparse budget F={plan.sparse_budget:g}" if any('sparse' in MODES[m] for m in plan.modes) else ""),
             ("synthetic KV (random K/V written, no prefill)" if plan.synthetic else "prefill")
             + ": one per context and page format (" + ", ".join(plan.formats) + "), shared through a DocCache; "
             "exact's repeated " + ", ".join(f"{plan.prefill_reps(c)}x at {c}" for c in plan.contexts)
             + (", the others' once" if len(plan.formats) > 1 else "")]
    for p in peers:
        lines.append(f"peer {p['name']}: " + (p["label"] if p["available"] else f"not run: {p['reason']}"))
    return lines
