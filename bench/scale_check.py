"""Scale check: decode over a synthetic long KV on DISK for a large shape, RSS bounded by budgets.

    .venv/bin/python bench/scale_check.py            # llama-3.1-8b shape, 4 layers, bf16, 64K tokens

No prefill: random K/V pages for every position are written through the engine's own write
path (placement by the fill-order rule under the budgets, so almost everything lands on
DISK), then a few greedy decode steps run over them. Prints decode time per token, bytes read
per token per tier, the time spent waiting for reads, and peak RSS beside weights + budgets.
Never imported by the packages.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from offload.config import RuntimeConfig, parse_size  # noqa: E402
from offload.engine import Engine  # noqa: E402
from offload.model.model_source import default_cache_dir, resolve_model  # noqa: E402
from offload.stats import RunStats  # noqa: E402


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux: writing 5 to /proc/self/clear_refs resets VmHWM)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak RSS in bytes since the start or the last ``reset_peak_rss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--decode-tokens", type=int, default=8)
    p.add_argument("--device-memory", default="64MiB")
    p.add_argument("--host-memory", default="128MiB")
    args = p.parse_args()
    cache = default_cache_dir()
    source = resolve_model(args.model, cache_dir=cache, random_weights=True, num_layers=args.num_layers)
    config = RuntimeConfig(device="cpu", dtype=torch.bfloat16, device_memory_bytes=parse_size(args.device_memory),
                           host_memory_bytes=parse_size(args.host_memory), kv_dir=str(cache / "kv"))
    engine = Engine(source, config)
    cfg = source.config
    kv_bytes = args.tokens * engine.kv_bytes_per_token
    rss_weights = psutil.Process().memory_info().rss
    # Warm-up: a few decode steps over a short sequence compile the kernels and allocate the
    # working buffers a decode step needs whatever the context (fixed costs, not KV); then
    # the peak is reset, so the growth printed below is what the long KV's handling adds.
    warm = engine.new_sequence()
    list(engine.generate(warm, list(range(1, 65)), max_new_tokens=3, stats=RunStats()))
    engine.release(warm)
    rss_warm = psutil.Process().memory_info().rss
    hwm_reset = reset_peak_rss()
    print(f"scale check: {args.model} shape, {cfg.num_layers} layers, bf16 random weights "
          f"({engine.runner.weights_bytes / 2**30:.2f} GiB), synthetic KV of {args.tokens} tokens = "
          f"{kv_bytes / 2**30:.2f} GiB; budgets device {args.device_memory}, host {args.host_memory}; "
          f"{torch.get_num_threads()} threads")
    seq = engine.new_sequence()
    placement = engine.placement_for(seq, args.tokens)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    chunk = 4096
    for layer in range(cfg.num_layers):
        for a in range(0, args.tokens, chunk):
            n = min(chunk, args.tokens - a)
            k = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(torch.bfloat16)
            v = torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen).to(torch.bfloat16)
            engine.kv.append(seq, layer, k, v, placement)
    engine.kv.writes.flush()
    write_s = time.perf_counter() - t0
    peak_write = peak_rss()  # the random K/V chunks being generated add their own temporaries
    hwm_reset = hwm_reset and reset_peak_rss()
    print(f"wrote {engine.kv.io.disk_bytes_written / 2**30:.2f} GiB to DISK in {write_s:.1f} s "
          f"({engine.kv.io.disk_bytes_written / write_s / 1e9:.2f} GB/s); placement {placement}; "
          f"cold reads: {engine.disk.cold_read_mode if engine.disk else 'no disk'}")
    stats = RunStats()
    toks = list(engine.generate(seq, [1], max_new_tokens=args.decode_tokens + 1, stats=stats))
    step = stats.decode_s / max(1, stats.decode_tokens)
    per_tok = {t: f"{b / 2**20:.0f} MiB" for t, b in stats.bytes_read_per_token.items()}
    disk_gbps = stats.bytes_read_per_token.get("disk", 0) / step / 1e9
    print(f"decode: {len(toks)} tokens, {step * 1e3:.0f} ms/token ({1 / step:.2f} tok/s); read per token {per_tok} "
          f"({disk_gbps:.2f} GB/s from disk); fetch wait {stats.fetch_wait_s / stats.decode_s:.0%} of decode")
    peak = peak_rss()
    budgets = parse_size(args.device_memory) + parse_size(args.host_memory)
    print(f"RSS after loading weights {rss_weights / 2**30:.2f} GiB; after a warm-up decode of 64 tokens "
          f"{rss_warm / 2**30:.2f} GiB (kernels compiled, working buffers: fixed costs)")
    if hwm_reset:
        print(f"peak RSS while decoding over the {args.tokens}-token KV {peak / 2**30:.2f} GiB: "
              f"{(peak - rss_warm) / 2**20:.0f} MiB above the warm-up, against budgets of {budgets / 2**20:.0f} MiB "
              f"(the KV is {kv_bytes / 2**20:.0f} MiB); while writing it (random chunks of 4096 tokens generated "
              f"on the way) {(peak_write - rss_warm) / 2**20:.0f} MiB above; peak KV held {stats.peak_bytes}")
    else:  # no /proc/self/clear_refs: one peak over the whole run, from the weights
        print(f"peak RSS {peak / 2**30:.2f} GiB: {(peak - rss_weights) / 2**20:.0f} MiB above the RSS after loading "
              f"weights (warm-up and writing included), against budgets of {budgets / 2**20:.0f} MiB (the KV is "
              f"{kv_bytes / 2**20:.0f} MiB); peak KV held {stats.peak_bytes}")
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
