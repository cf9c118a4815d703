"""What LSH sampling (``sparse="lsh"``, MagicPIG) costs beside the KV cache, in one run.

    .venv/bin/python bench/bench_lsh.py                    # SmolLM2 and Gemma 3 at 8K tokens
    .venv/bin/python bench/bench_lsh.py --tokens 4096 --reps 3 --json-out lsh.json

1. Hashing at prefill: a document prefilled in lsh mode (its keys hashed as each layer's are
   appended), ``--reps`` times per model; the seconds spent hashing (``LshIndex.add``) over
   the prefill's seconds, median and spread (target: at most 10%).
2. Memory: the SimHash tables' bytes of those prefills beside their KV bytes, and the same
   formula (``table_bytes``: ids, offsets, means and the shared planes) for Gemma 3 at 32K
   tokens and Llama-3.1-8B shapes (32 layers, 8 KV heads, head_dim 128, bf16) at 128K.

Configurations are printed before measuring. Real weights (the models' GGUF packages), essays
from ``../shared``. Never imported by the packages.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
GiB = 2**30


def table_bytes(params, *, tokens: int, layers: int, num_kv_heads: int, head_dim: int) -> int:
    """Bytes of the tables of ``layers`` global layers at ``tokens`` tokens: uint16 ids per table
    and token, uint16 offsets per 32K-token segment and a float32 mean per layer and KV head,
    and the float32 planes every layer shares."""
    from cpu_kernels.lsh import SEGMENT_TOKENS

    segments = -(-tokens // SEGMENT_TOKENS)
    per_head = 2 * params.tables * tokens + 2 * segments * params.tables * ((1 << params.bits) + 1) + 4 * head_dim
    return layers * num_kv_heads * per_head + num_kv_heads * 4 * params.tables * params.bits * head_dim


def measure_prefill(model: str, tokens: int, reps: int, say) -> dict:
    """Prefill ``tokens`` of essays ``reps`` times in lsh mode, timing the hashing inside."""
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig
    from offload.kv import lsh_index

    config = RuntimeConfig(sparse="lsh", device_memory_bytes="4GiB", host_memory_bytes=0)
    spent = [0.0]
    real_add = lsh_index.LshIndex.add

    def timed_add(self, layer, start, k):
        t0 = time.perf_counter()
        try:
            return real_add(self, layer, start, k)
        finally:
            spent[0] += time.perf_counter() - t0

    lsh_index.LshIndex.add = timed_add
    try:
        with LongDocQA(model, config=config, doc_cache=False, allow_long_context=True) as qa:
            eng = qa.engine
            text = "\n\n".join(p.read_text() for p in sorted(ESSAYS.glob("*.txt")))
            ids = qa.codec.encode(text)[:tokens]
            shares, prefill_s = [], []
            for r in range(reps):
                seq = eng.new_sequence()
                spent[0] = 0.0
                t0 = time.perf_counter()
                eng.prefill(seq, ids)
                total = time.perf_counter() - t0
                shares.append(spent[0] / total)
                prefill_s.append(total)
                say(f"  {model} prefill {r + 1}/{reps}: {total:.1f} s, hashing {spent[0]:.2f} s")
                params, cfg, layers = seq.lsh.params, eng.model_config, len(eng.global_layers)
                tables = seq.lsh.nbytes()  # the global layers' K and V as the engine holds them:
                kv = 2 * layers * cfg.num_kv_heads * cfg.head_dim * eng.kv_dtype.itemsize * tokens
                eng.release(seq)
    finally:
        lsh_index.LshIndex.add = real_add
    return {"model": model, "tokens": tokens, "bits": params.bits, "tables": params.tables,
            "hash_share_median": statistics.median(shares), "hash_share_min": min(shares),
            "hash_share_max": max(shares), "prefill_s_median": statistics.median(prefill_s),
            "table_bytes": tables, "kv_bytes": kv, "global_layers": layers, "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.reps < 3:
        p.error("--reps must be >= 3 (medians of at least 3)")
    say = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not ESSAYS.is_dir():
        print("no essays in ../shared: nothing to measure", file=sys.stderr)
        return 0
    from offload.attention.lsh import lsh_params

    params = lsh_params(seed=0)
    print(f"LSH tables K={params.bits} bits x L={params.tables} tables, >= {params.min_hits} hits; prefill of "
          f"{args.tokens} essay tokens, {args.reps} times per model: {', '.join(args.models)}")
    rows = [measure_prefill(m, args.tokens, args.reps, say) for m in args.models]
    print("(KV: the global layers' K and V in the engine's KV dtype; the tables hash only those)")
    print(f"\n{'model':<16}{'prefill s':>10}{'hashing share (median [min-max])':>36}{'tables MiB':>12}{'KV MiB':>9}"
          f"{'tables/KV':>10}")
    for r in rows:
        print(f"{r['model']:<16}{r['prefill_s_median']:>10.1f}{r['hash_share_median']:>18.1%} "
              f"[{r['hash_share_min']:.1%}-{r['hash_share_max']:.1%}]      {r['table_bytes'] / 2**20:>10.1f}"
              f"{r['kv_bytes'] / 2**20:>9.1f}{r['table_bytes'] / r['kv_bytes']:>10.2f}")
    shapes = [("Gemma 3 270M, 32K tokens, bf16 KV", 32768, 3, 1, 256, 2),
              ("Llama-3.1-8B shapes, 128K tokens, bf16 KV", 131072, 32, 8, 128, 2)]
    print("\nby formula (ids, offsets, planes; KV of the global layers only):")
    sized = []
    for name, tokens, layers, nkv, hd, itemsize in shapes:
        tb = table_bytes(params, tokens=tokens, layers=layers, num_kv_heads=nkv, head_dim=hd)
        kv = 2 * layers * nkv * hd * itemsize * tokens
        print(f"  {name}: tables {tb / GiB:.2f} GiB, KV {kv / GiB:.2f} GiB, tables/KV {tb / kv:.2f}")
        sized.append({"shape": name, "tokens": tokens, "table_bytes": tb, "kv_bytes": kv})
    if args.json_out:
        args.json_out.write_text(json.dumps({"measured": rows, "by_formula": sized}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
