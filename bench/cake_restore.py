"""A DocCache hit restored three ways, side by side: every page loaded, a forced Cake split (a
share of the document recomputed from its tokens while the rest loads), and the planner's
own split; each against the time it predicted.

    python bench/cake_restore.py [--model smollm2-135m] [--tokens 8192] [--split 0.3] [--reps 3]
    python bench/cake_restore.py --model llama-3.1-8b --random-weights --num-layers 4 --dtype bf16 \
        --tokens 32768 --prefill-chunk 1024 --device-memory 1GiB     # a shape on a GPU (gpu_check.sh)

The document (essays with an invented fact) is ingested once into a fresh DocCache (a miss:
its prefill time is what the split's recompute is priced from). Then, per repetition and
per way in turn, a new ``LongDocQA`` (a hit, as a new process gets it) restores it and asks
one question. Measured: the restore (``Doc.restore.seconds``) and the time to first token
(restore + the question's prefill to its first token); predicted: ``Doc.restore.predicted_s``
and ``predicted_first_token_s``. Prints the median and spread of each, measured / predicted
(denominator: the prediction), and whether each way's answer tokens equal the loaded one's.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.long_doc_qa import build_document  # noqa: E402

QUESTION = "What is the vault code of the Harlow observatory?"


def _row(qa, text: str) -> dict:
    doc = qa.ingest(text)
    assert doc.stats.doc_cache == "hit" and doc.restore is not None, doc.stats.doc_cache
    ans = qa.ask(doc, QUESTION, max_new_tokens=16)
    r = doc.restore
    return {"recompute_tokens": r.recompute_tokens, "restore_s": r.seconds, "predicted_restore_s": r.predicted_s,
            "ttft_s": r.seconds + ans.stats.ttft_s,
            "predicted_ttft_s": r.predicted_first_token_s(ans.stats.prefill_tokens), "plan": r.plan,
            "tokens": ans.token_ids, "answer": ans.text.strip()}


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def _print_table(rows: dict[str, list[dict]]) -> None:
    """Each way's medians and spreads against its predictions, and its plan line."""
    loaded = rows["load every page"][0]["tokens"]
    print("\n| restore | recomputed tokens | restore s (median [min-max]) | predicted s | measured / predicted "
          "| TTFT s | predicted TTFT s | TTFT measured / predicted | same tokens as loading |")
    print("|---|---|---|---|---|---|---|---|---|")
    for way, rs in rows.items():
        pred, pttft = rs[0]["predicted_restore_s"], rs[0]["predicted_ttft_s"]
        med, mttft = statistics.median(r["restore_s"] for r in rs), statistics.median(r["ttft_s"] for r in rs)
        ratio = f"{med / pred:.2f}" if pred else "n/a"
        tratio = f"{mttft / pttft:.2f}" if pttft else "n/a"
        same = all(r["tokens"] == loaded for r in rs)
        print(f"| {way} | {rs[0]['recompute_tokens']} | {_spread([r['restore_s'] for r in rs])} | "
              f"{pred if pred is None else f'{pred:.3f}'} | {ratio} | {_spread([r['ttft_s'] for r in rs])} | "
              f"{pttft if pttft is None else f'{pttft:.3f}'} | {tratio} | {'yes' if same else 'NO'} |")
    for way, rs in rows.items():
        print(f"{way}: {rs[0]['plan']}")
    print(f"answer (loading every page): {rows['load every page'][0]['answer']!r}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192, help="document tokens (about)")
    p.add_argument("--prefill-chunk", type=int, default=512, help="the ingest's chunk: a split's granularity")
    p.add_argument("--split", type=float, default=0.3, help="the forced share recomputed")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device-memory", default="64MiB")
    p.add_argument("--host-memory", default="64MiB")
    p.add_argument("--random-weights", action="store_true", help="random weights of a named shape (GPU checks)")
    p.add_argument("--num-layers", type=int, default=None, help="with --random-weights: this many layers")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the device's)")
    p.add_argument("--allow-long-context", action="store_true")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig, parse_dtype

    ways = {"load every page": 0.0, f"forced split {args.split:g}": args.split, "planner's split": None}
    print(f"configuration: {args.model}, ~{args.tokens} document tokens, prefill chunk {args.prefill_chunk}, "
          f"DEVICE {args.device_memory}, HOST {args.host_memory}, {args.reps} repetitions of: "
          + ", ".join(ways), flush=True)
    with tempfile.TemporaryDirectory(prefix="cake-") as tmp:
        base = RuntimeConfig(device_memory_bytes=args.device_memory, host_memory_bytes=args.host_memory,
                             prefill_chunk_tokens=args.prefill_chunk,
                             dtype=parse_dtype(args.dtype) if args.dtype else None)
        kw = dict(cache_dir=tmp, random_weights=args.random_weights, num_layers=args.num_layers,
                  allow_long_context=args.allow_long_context)
        with LongDocQA(args.model, config=base, **kw) as qa:
            text = build_document(qa.codec, args.tokens)
            doc = qa.ingest(text)
            print(f"ingest: {doc.num_tokens} tokens, prefill {doc.stats.prefill_s:.2f} s ({doc.stats.doc_cache})",
                  flush=True)
        rows: dict[str, list[dict]] = {w: [] for w in ways}
        for rep in range(args.reps):
            for way, share in ways.items():
                config = dataclasses.replace(base, restore_recompute=share)
                with LongDocQA(args.model, config=config, **kw) as qa:
                    rows[way].append(_row(qa, text))
                r = rows[way][-1]
                print(f"  rep {rep + 1} {way}: recompute {r['recompute_tokens']} tokens, restore "
                      f"{r['restore_s']:.3f} s (predicted {r['predicted_restore_s']:.3f}), TTFT {r['ttft_s']:.3f} s",
                      flush=True)
    _print_table(rows)
    if args.json_out:
        args.json_out.write_text(json.dumps({"args": vars(args) | {"json_out": str(args.json_out)}, "rows": rows},
                                            indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
