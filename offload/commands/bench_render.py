"""report.md and PNG plots from a sweep's results.json, and nothing else: ``offload bench
--render DIR/results.json`` rebuilds them with no torch and no model (matplotlib only, for the
plots). Every table names the denominator of its ratios; every plot labels its axes with units
and names its bound lines in the legend."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from offload.commands.bench_results import (MIB, TIERS, BadResults, disk_bound, first_difference, load_fidelity,
                                           load_results, median, read_gbps, spread)

__all__ = ["render", "main", "render_argv"]

def _ms(xs: list[float], scale: float = 1.0, digits: int = 1, invert: bool = False) -> str:
    """median [min-max] of ``xs`` (or of scale / x with ``invert``); [n/a] for one value."""
    if not xs:
        return "-"
    vals = [scale / x for x in xs if x > 0] if invert else [x * scale for x in xs]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.{digits}f} {spread(vals, digits)}"


def _tok_s(row: dict[str, Any]) -> float:
    return 1.0 / median(row["decode_s_per_token"])


def _tables(blob: dict[str, Any]) -> list[str]:
    cfg = blob["config"]
    out: list[str] = []
    for ctx in blob["contexts"]:
        n = ctx["tokens"]
        out += [f"## {n} tokens", "", f"Document {ctx['doc_tokens']} tokens + request {ctx['question_tokens']} + "
                f"{cfg['decode_tokens']} decode steps. Peak RSS of the process so far "
                f"{ctx.get('peak_rss_bytes', 0) / 2**30:.2f} GiB.", ""]
        out += ["| pages | prefill tok/s | TTFT, DocCache miss (s) | of it: save (s) | DocCache (MiB) |",
                "|---|---|---|---|---|"]
        for p in ctx["prefill"]:
            rate = _ms(p['prefill_s'], p['doc_tokens'], 0, invert=True)
            rate = f"synthetic KV: {rate}" if p.get("synthetic") else rate
            out.append(f"| {p['kv_format']} | {rate} | "
                       f"{p['ttft_miss_s']:.2f} | {p['save_s']:.2f} | {p['doc_cache_bytes'] / MIB:.1f} |")
        gbps = read_gbps(ctx)
        base = next((r for r in ctx["rows"] if (r["mode"], r["placement"]) == ("exact", "device")), None)
        out += ["", f"Cold read bandwidth in decode's pattern: {f'{gbps:.2f} GB/s' if gbps else 'not measured'}. "
                "Ratios: decode tok/s / exact all-DEVICE's decode tok/s of this context; "
                "decode tok/s / the row's disk bound (its DISK bytes per token at that bandwidth).", "",
                "| mode | placement | decode tok/s | / exact device | TTFT, DocCache hit (ms) | MiB/token dev/host/disk "
                "| disk bound tok/s | / disk bound | kv_fraction_read (max) | peak MiB dev/host/disk |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ctx["rows"]:
            b, pk = r.get("bytes_per_token", {}), r.get("peak_bytes", {})
            bound = disk_bound(ctx, r)
            sp = r.get("sparse_stats") or {}
            frac = (f"{sp.get('kv_fraction_read') or 0:.3f} ({sp.get('kv_fraction_read_max') or 0:.3f})"
                    if sp else "1")
            rel = f"{_tok_s(r) * median(base['decode_s_per_token']):.2f}" if base else "-"
            out.append(f"| {r['mode']} | {r['placement']} | {_ms(r['decode_s_per_token'], 1.0, 2, invert=True)} | "
                       f"{rel} | {_ms(r['ttft_hit_s'], 1e3, 0)} | "
                       f"{'/'.join(f'{b.get(t, 0) / MIB:.2f}' for t in TIERS)} | "
                       f"{f'{bound:.1f}' if bound else '-'} | {f'{_tok_s(r) / bound:.2f}' if bound else '-'} | {frac} | "
                       f"{'/'.join(f'{pk.get(t, 0) / MIB:.0f}' for t in TIERS)} |")
        out += _peer_table(ctx, base)
        out.append("")
    return out


def _peer_table(ctx: dict[str, Any], base: dict[str, Any] | None) -> list[str]:
    if not ctx.get("peers"):
        return []
    out = ["", "Peers on the same prompt ids (ratio: exact all-DEVICE decode tok/s / the peer's).", "",
           "| peer | weights / KV | threads | prefill tok/s | TTFT, prefix-cache hit (ms) | decode tok/s | ours / peer "
           "| same greedy tokens as exact | note |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in ctx["peers"]:
        if not p.get("available"):
            continue  # not run anywhere: the header says why
        if not p.get("measured"):
            out.append(f"| {p['name']} | {p.get('label', '-')} | - | - | - | - | - | - | not run: {p['reason']} |")
            continue
        dec = p.get("decode_s_per_token") or []
        rel = f"{median(dec) / median(base['decode_s_per_token']):.2f}" if base and dec else "-"
        same_s = _same_tokens(p, base)
        out.append(f"| {p['name']} | {p.get('label', '-')} | {p.get('threads', '-')} | "
                   f"{_ms(p.get('prefill_s') or [], p.get('prompt_tokens', 0), 0, invert=True)} | "
                   f"{_ms(p.get('ttft_hit_s') or [], 1e3, 0)} | {_ms(dec, 1.0, 2, invert=True)} | {rel} | {same_s} | "
                   f"{p.get('note', '')} |")
    return out


def _same_tokens(p: dict[str, Any], base: dict[str, Any] | None) -> str:
    """Whether the peer's greedy tokens are exact mode's: checked in the run for transformers (it
    must agree), compared here for a peer on the same weights (information), not for other weights."""
    same = p.get("same_tokens")
    if same is None and p.get("tokens") and base is not None:
        if p.get("label", "").startswith("GGUF"):
            return "not compared (other weights)"
        diff = first_difference(p["tokens"], base["tokens"])
        return "yes" if diff is None else f"no (first difference at token {diff})"
    if same is None:
        return "not checked"
    return "yes" if same else f"no (first difference at token {p.get('first_difference')})"


def _header(blob: dict[str, Any]) -> list[str]:
    cfg, m, v = blob["config"], blob.get("machine", {}), blob.get("versions", {})
    smoke = " A smoke run (one repetition): its spreads print [n/a]; nothing here is a number to quote." \
        if cfg["reps"] < 3 else ""
    lines = ["# offload bench", "", f"`{blob.get('command', 'offload bench')}`", "",
             f"Model {cfg['model']}{' (random weights)' if cfg.get('random_weights') else ''}, {cfg['dtype']} on "
             f"{cfg['device']}; machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('torch_threads', '?')} "
             f"torch threads, {m.get('ram_bytes', 0) / 2**30:.0f} GiB RAM{', GPU ' + m['gpu'] if m.get('gpu') else ''}; "
             + ", ".join(f"{k} {val}" for k, val in v.items()) + ".", "",
             f"Rows: modes {', '.join(cfg['modes'])} x placements {', '.join(cfg['placements'])}; sparse budget "
             f"F={cfg['sparse_budget']:g}; {cfg['reps']} repetitions (medians [min-max]); repetitions of the exact "
             f"prefill {cfg['prefill_reps']} (of another page format's: one); one prefill per context and page format, "
             "shared by every row through a DocCache."
             + smoke, f"Wall time of the run: {blob.get('wall_s', 0) / 60:.1f} min.", ""]
    fid_peers = (blob.get("fidelity") or {}).get("peers") or {}
    for p in blob.get("peers_declared", []):
        if p["name"] in fid_peers:
            status = fid_peers[p["name"]]
            state = "measured in the fidelity table below" if status == "measured" else f"not run: {status}"
            lines.append(f"- peer {p['name']} ({p['label']}): {state}")
            continue
        lines.append(f"- peer {p['name']}: {p['label'] if p['available'] else 'not run: ' + p['reason']}")
    return lines + [""]


def _fidelity_table(blob: dict[str, Any]) -> list[str]:
    fid = blob.get("fidelity")
    if not fid:
        return []
    out = ["## Fidelity (from the sparse harness's JSON)", "", f"Model {fid.get('model', '?')}.", "",
           "| configuration | essay continuation top-1 agreement with exact | KL | kv_fraction_read max |",
           "|---|---|---|---|"]
    for n, cont in (fid.get("continuation") or {}).items():
        for key, c in cont.items():
            out.append(f"| {key} ({n} tokens) | {c['top1_agreement']:.3f} | {c['kl']:.4f} | "
                       f"{c.get('kv_fraction_read_max') or 0:.3f} |")
    for title, key in (("4K tokens and more", "summary_4k_plus"), ("under 4K tokens", "summary_short")):
        summ = fid.get(key) or {}
        if not summ:
            continue
        out += ["", f"QA cases of {title} (invented facts; peers such as kvpress on the same cases):", "",
                "| configuration | hits | misses of exact's right answers | median gold log-prob gap | "
                "kv_fraction_read max |", "|---|---|---|---|---|"]
        for name, s in summ.items():
            out.append(f"| {name} | {s['hits']}/{s['cases']} | {s['misses_of_exact_right']}/{s['exact_right']} | "
                       f"{s['median_gold_gap']:.3f} | {s['kv_fraction_read_max']:.3f} |")
    for name, status in (fid.get("peers") or {}).items():
        out.append(f"\nFidelity peer {name}: {status}.")
    return out + [""]


def render(blob: dict[str, Any], out_dir: Path) -> list[str]:
    """Write report.md and the plots into ``out_dir``; the lines to print (where they went)."""
    out_dir = Path(out_dir)
    plots, why = [], ""
    try:
        from offload.commands import bench_plots
        plots = bench_plots.draw(blob, out_dir)
    except ImportError:
        why = "no matplotlib here: rerun `offload bench --render results.json` where it is installed"
    md = _header(blob) + _tables(blob) + _fidelity_table(blob)
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    elif why:
        md += [f"Plots not drawn: {why}.", ""]
    (out_dir / "report.md").write_text("\n".join(md))
    return [f"report: {out_dir / 'report.md'}"] + ([f"plots: {', '.join(p.name for p in plots)}"] if plots else
                                                   [f"plots not drawn: {why}"])


def render_argv(argv: list[str]) -> list[str] | None:
    """``main``'s arguments when the ``offload`` command line ``argv`` is ``bench --render FILE
    ...`` (``--render=FILE`` too), else None: the one test of it, for every entry point."""
    if argv[:1] != ["bench"] or not any(a == "--render" or a.startswith("--render=") for a in argv):
        return None
    return [a.removeprefix("--render=") for a in argv[1:] if a != "--render"]


def main(argv: list[str]) -> int:
    """``offload bench --render FILE [--fidelity FID]``: exit 2 with one line on a bad or foreign
    JSON. ``--fidelity`` attaches a fidelity harness run to the results (written into FILE, so that
    later renders keep it) before rendering."""
    fidelity = None
    if len(argv) == 3 and argv[1] == "--fidelity":
        argv, fidelity = argv[:1], argv[2]
    elif len(argv) == 2 and argv[1].startswith("--fidelity="):
        argv, fidelity = argv[:1], argv[1].removeprefix("--fidelity=")
    if len(argv) != 1:
        print("offload bench: error: --render takes one results.json (and at most --fidelity FILE), no other flag",
              file=sys.stderr)
        return 2
    path = Path(argv[0])
    try:
        blob = load_results(path)
        if fidelity is not None:
            blob["fidelity"] = load_fidelity(Path(fidelity))
            path.write_text(json.dumps(blob, indent=1, default=str))
    except BadResults as e:
        print(f"offload bench: error: {e}", file=sys.stderr)
        return 2
    for line in render(blob, path.parent):
        print(line)
    return 0
