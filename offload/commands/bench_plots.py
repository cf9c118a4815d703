"""The sweep's PNG plots, drawn from its results.json alone (``bench_render``): decode tok/s
against context with the disk bound, KV bytes read per token per tier, prefill tok/s and time to
first token against context, and fidelity against bytes read when the JSON carries the sparse
harness's results. Imports matplotlib (Agg), never torch."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from offload.commands.bench_results import MIB, TIERS, disk_bound, median  # noqa: E402

__all__ = ["draw"]

# no version stamp in the PNGs: a re-render gives the same bytes
_SAVE = {"dpi": 110, "metadata": {"Software": None}, "bbox_inches": "tight"}


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, **_SAVE)
    plt.close(fig)
    return path


def _series(blob: dict[str, Any]) -> dict[tuple[str, str], list[tuple[int, dict[str, Any]]]]:
    out: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = {}
    for ctx in blob["contexts"]:
        for row in ctx["rows"]:
            out.setdefault((row["mode"], row["placement"]), []).append((ctx["tokens"], row))
    return out


def _context_axis(ax: Any, blob: dict[str, Any]) -> None:
    xs = [c["tokens"] for c in blob["contexts"]]
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [f"{x // 1024}K" if x % 1024 == 0 else str(x) for x in xs])
    ax.set_xlabel("context (tokens)")
    ax.grid(True, alpha=0.3)


def _decode_plot(blob: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 4.8))
    modes = list(dict.fromkeys(mode for mode, _ in _series(blob)))
    styles = {"device": "-", "host": "-.", "disk": "--"}
    for (mode, placement), pts in _series(blob).items():
        ys = [1 / median(r["decode_s_per_token"]) for _, r in pts]
        ax.plot([x for x, _ in pts], ys, marker="o", linestyle=styles[placement], color=f"C{modes.index(mode)}",
                label=f"{mode}, all-{placement.upper()}")
    bound = [(c["tokens"], disk_bound(c, r)) for c in blob["contexts"] for r in c["rows"]
             if (r["mode"], r["placement"]) == ("exact", "disk")]
    bound = [(x, b) for x, b in bound if b]
    if bound:
        ax.plot([x for x, _ in bound], [b for _, b in bound], color="black", linestyle=":", linewidth=2,
                label="disk bound of exact all-DISK (its bytes / measured cold read GB/s)")
    peers: dict[str, list[tuple[int, float]]] = {}
    markers = "sDv^PX"
    for c in blob["contexts"]:
        for p in c.get("peers", []):
            if p.get("measured") and p.get("decode_s_per_token"):
                peers.setdefault(p["name"], []).append((c["tokens"], 1 / median(p["decode_s_per_token"])))
    for i, (name, pts) in enumerate(peers.items()):
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers[i % len(markers)], linestyle=":",
                color=f"C{(len(modes) + i) % 10}", markersize=7, label=f"peer: {name}")
    _context_axis(ax, blob)
    ax.set_yscale("log")
    ax.set_ylabel("decode (tokens/s, median)")
    ax.set_title(f"Decode throughput, {blob['config']['model']}\n(solid: all pages on DEVICE, dashed: all on DISK, "
                 "dotted: peers)", fontsize=10)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out / "decode_tok_s.png")


def _bytes_plot(blob: dict[str, Any], out: Path) -> Path:
    ctxs = blob["contexts"]
    fig, axes = plt.subplots(1, len(ctxs), figsize=(4.2 * len(ctxs), 4.4), squeeze=False)
    colors = {"device": "tab:green", "host": "tab:orange", "disk": "tab:red"}
    for ax, ctx in zip(axes[0], ctxs):
        labels = [f"{r['mode']}, {r['placement']}" for r in ctx["rows"]]
        bottom = [0.0] * len(labels)
        for tier in TIERS:
            vals = [r.get("bytes_per_token", {}).get(tier, 0) / MIB for r in ctx["rows"]]
            ax.bar(range(len(labels)), vals, bottom=bottom, color=colors[tier], label=f"read from {tier.upper()}")
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=60, ha="right")
        ax.set_ylabel("KV bytes attended per decoded token (MiB)")
        ax.set_title(f"{ctx['tokens']} tokens")
        ax.legend(fontsize=7)
    return _save(fig, out / "bytes_per_token.png")


def _prefill_plot(blob: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    fmts: dict[str, list[tuple[int, float]]] = {}
    for c in blob["contexts"]:
        for p in c["prefill"]:
            fmts.setdefault(p["kv_format"], []).append((c["tokens"], p["doc_tokens"] / median(p["prefill_s"])))
        for p in c.get("peers", []):
            if p.get("measured") and p.get("prefill_s"):
                rate = p["prompt_tokens"] / median(p["prefill_s"])
                fmts.setdefault(f"peer: {p['name']}", []).append((c["tokens"], rate))
    for name, pts in fmts.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o",
                label=name if name.startswith("peer") else f"ours, {name} pages")
    _context_axis(ax, blob)
    ax.set_ylabel("prefill (tokens/s, median)")
    ax.set_title("Prefill throughput")
    ax.legend(fontsize=7)
    return _save(fig, out / "prefill_tok_s.png")


def _ttft_plot(blob: dict[str, Any], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.4))
    miss: dict[str, list[tuple[int, float]]] = {}
    for c in blob["contexts"]:
        for p in c["prefill"]:
            miss.setdefault(p["kv_format"], []).append((c["tokens"], p["ttft_miss_s"]))
    for fmt, pts in miss.items():
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", color="black",
                linestyle="-" if fmt == "exact" else "--", label=f"DocCache miss ({fmt} pages: prefill + save)")
    for (mode, placement), pts in _series(blob).items():
        if mode not in ("exact", "4bit"):
            continue  # a hit restores the same pages for every sparse mode
        ax.plot([x for x, _ in pts], [median(r["ttft_hit_s"]) for _, r in pts], marker="^",
                label=f"DocCache hit, {mode} pages to {placement.upper()}")
    _context_axis(ax, blob)
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, median)")
    ax.set_title("Time to first token of a request on a document")
    ax.legend(fontsize=7)
    return _save(fig, out / "ttft.png")


def _fidelity_plot(blob: dict[str, Any], out: Path) -> Path | None:
    fid = blob.get("fidelity") or {}
    points = [(key, n, c) for n, cont in (fid.get("continuation") or {}).items() for key, c in cont.items()]
    qa = {**(fid.get("summary_short") or {}), **(fid.get("summary_4k_plus") or {})}
    if not points and not qa:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for key, n, c in points:
        left.scatter([c.get("kv_fraction_read_max") or 1.0], [c["top1_agreement"]], label=f"{key} ({n} tokens)")
    for key, s in qa.items():
        exact_right = max(1, s["exact_right"])
        right.scatter([s["kv_fraction_read_max"] or 1.0], [(exact_right - s["misses_of_exact_right"]) / exact_right],
                      marker="s" if key.startswith("kvpress") else "o", label=key)
    left.set_ylabel("top-1 agreement with exact (essay continuation)")
    right.set_ylabel("share of exact's right QA answers kept")
    for ax in (left, right):
        ax.set_xlabel("K/V bytes read per step / exact's (max over steps)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Fidelity against bytes read, {fid.get('model', '')}")
    return _save(fig, out / "fidelity.png")


def draw(blob: dict[str, Any], out: Path) -> list[Path]:
    """Every plot the JSON has data for, written into ``out``."""
    out = Path(out)
    plots = [_decode_plot(blob, out), _bytes_plot(blob, out), _prefill_plot(blob, out), _ttft_plot(blob, out)]
    fid = _fidelity_plot(blob, out)
    return plots + ([fid] if fid else [])
