"""How low-rank are a real model's pre-RoPE keys? ShadowKV's first step (Sun et al., 2024), measured.

    python bench/lowrank_keys.py --model smollm2-135m --tokens 8192 [--json-out FILE]
    python bench/lowrank_keys.py --model gemma3-270m --tokens 8192

About ``--tokens`` tokens of Paul Graham essays (``bench/long_doc_qa.py``'s document, its
invented facts included) are ingested with every page on DEVICE and no DocCache. Every global
layer's keys are read back from the pages (``KVReader.layer_groups``), unrotated at their
positions with the layer's RoPE (``offload.kv.lowrank``) and factored (all KV heads side by
side, [T, D]). Printed per global layer and rank r:

- err: relative Frobenius error ``||K - A B|| / ||K||`` of the pre-RoPE keys (the same for the
  rotated keys: RoPE is a rotation per channel pair), from ``torch.linalg.svd`` factors;
  ``+out`` the same with the worst ``--outlier-share`` of pages (by ``page_errors``) kept exact;
  means over the layers also for centered factors (mean kept) and for ``torch.svd_lowrank``'s;
- attention: the probe queries are the document's own last ``--probe-queries`` queries, the
  real post-RoPE queries of positions T-32..T-1 recorded from ``runner.qkv`` during the
  ingest's prefill (the engine's hidden states are not kept, and a decode step's query would
  need a question: the document tail's queries are the closest real queries at hand). Each
  attends causally over all exact keys and over all rebuilt ones (factors, then RoPE at their
  positions: ``rebuild_rotated``); per query and query head: KL(exact || rebuilt), and of the
  top ``--top-pages`` pages by attention mass, the overlap of the two choices and the exact
  mass the rebuilt choice captures over what the exact choice captures ("recall"). A bf16
  rounding of the exact keys is shown as a yardstick;
- bytes: factors (A [T, r], B [r, D], fp32) against the keys [T, D] (fp32, bf16);
- ``choose_rank`` for mean errors 0.05 and 0.1; the seconds of each factorization.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RANKS = (16, 32, 48, 64, 96, 128)
TARGETS = (0.05, 0.1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tokens", type=int, default=8192, help="document tokens (about)")
    p.add_argument("--ranks", default=",".join(map(str, RANKS)))
    p.add_argument("--outlier-share", type=float, default=1 / 64, help="pages kept exact (the worst)")
    p.add_argument("--probe-queries", type=int, default=32)
    p.add_argument("--top-pages", type=int, default=32)
    p.add_argument("--device-memory", default="4GiB", help="DEVICE KV budget: every page must stay there")
    p.add_argument("--cache-dir", type=Path, default=None, help="default: the offload cache (converted models)")
    p.add_argument("--svd-repeats", type=int, default=5, help="factorizations per timing (median)")
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def record_queries(runner, first_pos: int) -> dict:
    """Wrap ``runner.qkv`` (on the instance) to keep q and k of positions >= first_pos per layer."""
    real_qkv, store = runner.qkv, {}

    def qkv(layer, h, pos):
        q, k, v = real_qkv(layer, h, pos)
        keep = pos >= first_pos
        if bool(keep.any()):
            store.setdefault(layer, []).append((pos[keep].clone(), q[keep].float().clone(), k[keep].float().clone()))
        return q, k, v

    runner.qkv = qkv
    return store


def read_layer_keys(qa, doc, layer: int):
    """Post-RoPE keys [T, nkv, hd] float32 of ``layer`` from the pages, and the tiers they came from."""
    import torch

    groups = list(qa.engine.kv.reader.layer_groups(doc._seq, layer, 1 << 30))
    starts = [g.start_pos for g in groups]
    sizes = [g.k.shape[1] for g in groups]
    assert starts == [sum(sizes[:i]) for i in range(len(sizes))], "groups are not consecutive from 0"
    k = torch.cat([g.k for g in groups], dim=1).float().permute(1, 0, 2).contiguous()
    return k, {g.tier.name for g in groups}


def ingest(args):
    """The document through the engine; returns what the measurement needs (the engine closed)."""
    import torch

    from long_doc_qa import build_document
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig
    from offload.kv.lowrank import layer_rope, unrotate_keys

    config = RuntimeConfig(device_memory_bytes=args.device_memory)
    with LongDocQA(args.model, config=config, cache_dir=args.cache_dir, doc_cache=False, show_progress=True) as qa:
        text = build_document(qa.codec, args.tokens)
        t = len(qa.codec.qa_prompt(text, "").doc_ids)
        runner, n = qa.engine.runner, args.probe_queries
        store = record_queries(runner, t - n)
        t0 = time.perf_counter()
        doc = qa.ingest(text)
        ingest_s = time.perf_counter() - t0
        del runner.qkv  # the class's method again
        assert doc.num_tokens == t
        is_sliding = getattr(runner, "layer_is_sliding", lambda layer: False)
        cfg = qa.engine.model_config
        out = {"tokens": t, "ingest_s": ingest_s, "page_size": qa.engine.config.page_size, "scale": runner.scale,
               "dtype": str(runner.dtype), "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
               "num_kv_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "layers": {}}
        positions = torch.arange(t)
        with torch.inference_mode():
            for layer in (i for i in range(cfg.num_layers) if not is_sliding(i)):
                k, tiers = read_layer_keys(qa, doc, layer)
                rope = layer_rope(runner, layer)
                qpos, q, k_tail = (torch.cat(x) for x in zip(*store[layer]))
                pre = unrotate_keys(k, *rope.cos_sin(positions, torch.float32))
                out["layers"][layer] = {"k": k, "pre": pre, "rope": rope, "q": q, "qpos": qpos, "tiers": tiers,
                                        "tail_check": float((k_tail - k[qpos]).abs().max())}
    return out


def attention_check(q, qpos, k_exact, k_approx, *, scale: float, page_size: int, top: int) -> dict:
    """Causal softmax attention of q [n, nq, hd] at positions qpos over exact vs approximate keys
    [T, nkv, hd]: mean and max KL(exact || approx) per (query, head), the top-``top`` page overlap
    and the exact mass captured by approx's top pages over that of exact's (float64)."""
    import torch

    t, nkv, hd = k_exact.shape
    group = q.shape[1] // nkv
    qd = q.double()
    hidden = torch.arange(t)[None, None, :] > qpos[:, None, None]

    def scores(k):
        return torch.einsum("qhd,thd->qht", qd, k.double().repeat_interleave(group, dim=1)) * scale

    s_exact, s_approx = scores(k_exact), scores(k_approx)
    le = torch.log_softmax(s_exact.masked_fill(hidden, -math.inf), dim=-1)
    la = torch.log_softmax(s_approx.masked_fill(hidden, -math.inf), dim=-1)
    pe = le.exp()
    kl = torch.where(hidden, 0.0, pe * (le - la)).sum(-1)  # [n, nq]
    entropy = -torch.where(hidden, 0.0, pe * le).sum(-1)
    visible = (~hidden).expand_as(s_exact)
    score_rms = float((s_exact - s_approx)[visible].pow(2).mean().sqrt())  # the logits' error, nats
    num_pages = math.ceil(t / page_size)

    def page_mass(p):
        padded = torch.zeros(*p.shape[:2], num_pages * page_size, dtype=p.dtype)
        padded[..., :t] = p
        return padded.view(*p.shape[:2], num_pages, page_size).sum(-1)

    me, ma = page_mass(pe), page_mass(la.exp())
    k_top = min(top, num_pages)

    def chosen(m):
        return torch.zeros_like(m, dtype=torch.bool).scatter_(-1, m.topk(k_top, dim=-1).indices, True)

    se, sa = chosen(me), chosen(ma)
    overlap = (se & sa).sum(-1).double() / k_top
    recall = (me * sa).sum(-1) / (me * se).sum(-1)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "entropy": float(entropy.mean()),
            "score_rms": score_rms, "score_std": float(s_exact[visible].std()), "overlap": float(overlap.mean()),
            "overlap_min": float(overlap.min()), "recall": float(recall.mean()), "recall_min": float(recall.min())}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def measure_layer(entry: dict, ranks: list[int], args, page_size: int, scale: float) -> dict:
    """Errors, outliers, attention and timings of one layer at every rank."""
    import torch

    from offload.kv.lowrank import (
        SvdMethod, factorize, frobenius_error, outlier_pages, page_errors, rank_errors, rebuild_rotated,
    )

    pre, k, rope, q, qpos = entry["pre"], entry["k"], entry["rope"], entry["q"], entry["qpos"]
    t = pre.shape[0]
    tokens, positions = torch.arange(t), torch.arange(t)
    att = dict(scale=scale, page_size=page_size, top=args.top_pages)
    row = {"tail_check": entry["tail_check"], "tiers": sorted(entry["tiers"]),
           "bf16": attention_check(q, qpos, k, k.bfloat16().float(), **att), "ranks": {}}
    centered = rank_errors(pre, ranks, center=True)
    for i, r in enumerate(ranks):
        f, full_s = timed(lambda: factorize(pre, r))
        fl, low_s = timed(lambda: factorize(pre, r, method=SvdMethod.LOWRANK))
        errors = page_errors(pre, f, page_size)
        worst = outlier_pages(errors, args.outlier_share)
        rebuilt = rebuild_rotated(f, tokens, positions, rope)
        kept = rebuilt.clone()
        for p in worst.tolist():
            kept[p * page_size:(p + 1) * page_size] = k[p * page_size:(p + 1) * page_size]
        row["ranks"][r] = {
            "err": frobenius_error(pre, f), "err_out": frobenius_error(pre, f, page_size=page_size, exact_pages=worst),
            "err_centered": centered[i], "err_lowrank": frobenius_error(pre, fl),
            "outliers": sorted(worst.tolist()), "page_err_max": float(errors.max()),
            "page_err_median": float(errors.median()), "svd_s": full_s, "svd_lowrank_s": low_s,
            "rot_err": float((rebuilt - k).norm() / k.norm()),
            "att": attention_check(q, qpos, k, rebuilt, **att), "att_out": attention_check(q, qpos, k, kept, **att),
        }
    return row


def time_svd(pre, ranks: list[int], repeats: int) -> dict:
    """Median seconds of ``factorize`` per method and rank on one layer's keys, with 1 torch
    thread and with the default count (a shared machine's load inflates the default's most)."""
    import torch

    from offload.kv.lowrank import SvdMethod, factorize

    default, out = torch.get_num_threads(), {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        for method in SvdMethod:
            for r in ranks:
                runs = [timed(lambda: factorize(pre, r, method=method))[1] for _ in range(repeats)]
                out[f"{threads}:{method.value}:{r}"] = statistics.median(runs)
    torch.set_num_threads(default)
    return out


def print_svd_times(times: dict, ranks: list[int], shape: tuple, repeats: int) -> None:
    print(f"\nmedian seconds of {repeats} factorizations of the first global layer's keys {shape}")
    keys = sorted({k.rsplit(":", 1)[0] for k in times}, key=lambda k: (int(k.split(":")[0]), k))
    print(f"{'rank':>5} " + "".join(f"{k.replace(':', ' thr ', 1):>18}" for k in keys))
    for r in ranks:
        print(f"{r:>5} " + "".join(f"{times[f'{k}:{r}']:>18.4f}" for k in keys))


def table(title: str, layers: dict, ranks: list[int], cell, fmt: str = "{:.4f}") -> None:
    """Rows per layer and their mean, columns per rank; ``cell(layer_row, rank) -> float``."""
    print(f"\n{title}")
    print("layer  " + "".join(f"{'r=' + str(r):>10}" for r in ranks))
    for layer, row in layers.items():
        print(f"{layer:>5}  " + "".join(f"{fmt.format(cell(row, r)):>10}" for r in ranks))
    print(" mean  " + "".join(f"{fmt.format(statistics.mean(cell(row, r) for row in layers.values())):>10}"
                              for r in ranks))


def print_errors(res: dict, ranks: list[int], share: float) -> None:
    layers = res["layers"]
    table("relative Frobenius error of the pre-RoPE keys, torch.linalg.svd factors (uncentered)",
          layers, ranks, lambda row, r: row["ranks"][r]["err"])
    table(f"same, with the worst {share:.4g} of pages kept exact (outliers)",
          layers, ranks, lambda row, r: row["ranks"][r]["err_out"])
    table("same, factors of the centered keys (mean kept, uncentered norm)",
          layers, ranks, lambda row, r: row["ranks"][r]["err_centered"])
    table("same, torch.svd_lowrank factors (q = r + 8, niter 2, uncentered)",
          layers, ranks, lambda row, r: row["ranks"][r]["err_lowrank"])
    table("worst page's relative error (uncentered, linalg.svd)", layers, ranks,
          lambda row, r: row["ranks"][r]["page_err_max"])
    print("\noutlier pages chosen at the smallest and largest rank, per layer:")
    for layer, row in layers.items():
        print(f"{layer:>5}  r={ranks[0]}: {row['ranks'][ranks[0]]['outliers']}  "
              f"r={ranks[-1]}: {row['ranks'][ranks[-1]]['outliers']}")


def print_attention(res: dict, ranks: list[int], top: int) -> None:
    layers = res["layers"]
    for key, label in (("att", "rebuilt keys"), ("att_out", "rebuilt keys, outlier pages exact")):
        table(f"mean KL(exact || {label}) per query and head, nats", layers, ranks,
              lambda row, r, key=key: row["ranks"][r][key]["kl_mean"], "{:.2e}")
        table(f"top-{top}-page overlap ({label})", layers, ranks,
              lambda row, r, key=key: row["ranks"][r][key]["overlap"], "{:.3f}")
        table(f"exact mass on the rebuilt top-{top} / on the exact top-{top} ({label})", layers, ranks,
              lambda row, r, key=key: row["ranks"][r][key]["recall"], "{:.4f}")
    for key in ("kl_max", "overlap_min", "recall_min"):
        worst = max if key == "kl_max" else min
        vals = "".join(f"{worst(row['ranks'][r]['att'][key] for row in layers.values()):>10.3g}" for r in ranks)
        print(f"worst {key} over layers, queries and heads:  {vals}")
    table("RMS error of the attention logits (scale q.k) over visible keys, rebuilt keys", layers, ranks,
          lambda row, r: row["ranks"][r]["att"]["score_rms"], "{:.3f}")
    print("\nexact attention per layer: mean entropy (nats) of the probe queries' distributions, std of "
          "their logits; max |post-RoPE error - pre-RoPE error| over ranks")
    for layer, row in layers.items():
        att = row["ranks"][ranks[0]]["att"]
        drift = max(abs(x["rot_err"] - x["err"]) for x in row["ranks"].values())
        print(f"{layer:>5}  entropy {att['entropy']:.3f}  logit std {att['score_std']:.3f}  rope drift {drift:.1e}")
    bf = [row["bf16"] for row in layers.values()]
    print(f"yardstick, exact keys rounded to bf16: mean KL {statistics.mean(b['kl_mean'] for b in bf):.2e}, "
          f"overlap {statistics.mean(b['overlap'] for b in bf):.3f}, "
          f"recall {statistics.mean(b['recall'] for b in bf):.4f}")


def print_costs(res: dict, ranks: list[int], chosen: dict) -> None:
    t, d = res["tokens"], res["num_kv_heads"] * res["head_dim"]
    n = len(res["layers"])
    print(f"\nbytes per global layer (T = {t}, D = {d}); x {n} global layers for the model")
    print(f"{'rank':>5} {'A fp32':>10} {'B fp32':>10} {'factors':>10} {'keys fp32':>10} {'keys bf16':>10}"
          f" {'/fp32':>7} {'/bf16':>7}")
    for r in ranks:
        a, b = t * r * 4, r * d * 4
        print(f"{r:>5} {a:>10} {b:>10} {a + b:>10} {t * d * 4:>10} {t * d * 2:>10} {(a + b) / (t * d * 4):>7.3f}"
              f" {(a + b) / (t * d * 2):>7.3f}")
    print("\nseconds of each layer's factorization in the measuring pass (mean over layers; max)")
    print(f"{'rank':>5} {'linalg.svd':>18} {'svd_lowrank':>18}")
    for r in ranks:
        full = [row["ranks"][r]["svd_s"] for row in res["layers"].values()]
        low = [row["ranks"][r]["svd_lowrank_s"] for row in res["layers"].values()]
        print(f"{r:>5} {statistics.mean(full):>10.4f} ({max(full):.4f}) {statistics.mean(low):>10.4f} ({max(low):.4f})")
    for target, (plain, centered) in chosen.items():
        print(f"choose_rank(target={target}): {plain} (uncentered), {centered} (centered)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import os

    import torch

    load0 = os.getloadavg()

    from offload.kv.lowrank import choose_rank

    res = ingest(args)
    d = res["num_kv_heads"] * res["head_dim"]
    ranks = [r for r in map(int, args.ranks.split(",")) if r <= min(d, res["tokens"])]
    print(f"{args.model}: {res['tokens']} tokens ingested in {res['ingest_s']:.1f} s ({res['dtype']}), "
          f"{res['num_kv_heads']} KV heads x {res['head_dim']} = D {d}, page {res['page_size']}, "
          f"global layers {list(res['layers'])}", flush=True)
    pre = [e["pre"] for e in res["layers"].values()]
    chosen = {tg: (choose_rank(pre, tg), choose_rank(pre, tg, center=True)) for tg in TARGETS}
    out = {k: v for k, v in res.items() if k != "layers"}
    out.update(model=args.model, ranks=ranks, outlier_share=args.outlier_share, top_pages=args.top_pages,
               choose_rank={str(t): {"uncentered": a, "centered": b} for t, (a, b) in chosen.items()},
               torch_threads=torch.get_num_threads(), layers={})
    with torch.inference_mode():
        for layer, entry in res["layers"].items():
            t0 = time.perf_counter()
            out["layers"][layer] = measure_layer(entry, ranks, args, res["page_size"], res["scale"])
            print(f"  layer {layer}: tiers {sorted(entry['tiers'])}, tail keys vs recorded "
                  f"{entry['tail_check']:.1e}, measured in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)
        first = next(iter(res["layers"].values()))["pre"]
        out["svd_median_s"] = time_svd(first, ranks, args.svd_repeats)
    print_errors(out, ranks, args.outlier_share)
    print_attention(out, ranks, args.top_pages)
    print_costs(out, ranks, chosen)
    print_svd_times(out["svd_median_s"], ranks, tuple(first.reshape(first.shape[0], -1).shape), args.svd_repeats)
    out["loadavg"] = {"start": load0, "end": os.getloadavg()}
    print(f"1-min load average at start {load0[0]:.2f}, at end {out['loadavg']['end'][0]:.2f} "
          f"({os.cpu_count()} cores, {torch.get_num_threads()} torch threads): timings are this machine's, shared")
    if args.json_out:
        args.json_out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
