"""A sweep's results.json: its schema version, loading it with one-line errors, and the numbers
derived from it that both the report and the plots use (no torch)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA_VERSION", "MIB", "TIERS", "BadResults", "load_results", "load_fidelity", "median", "spread",
           "first_difference", "read_gbps", "disk_bound"]

SCHEMA_VERSION = 1
MIB = 2**20
TIERS = ("device", "host", "disk")


class BadResults(ValueError):
    """A results.json this version cannot render."""


def load_results(path: Path) -> dict[str, Any]:
    """The sweep's JSON at ``path``.

    Raises:
        BadResults: unreadable, not JSON, not a sweep's, or another schema version.
    """
    try:
        blob = json.loads(Path(path).read_text())
    except OSError as e:
        raise BadResults(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadResults(f"{path} is not JSON ({e}); give the results.json an `offload bench --out DIR` run "
                         "wrote") from None
    if not isinstance(blob, dict) or blob.get("kind") != "offload-bench":
        raise BadResults(f"{path} is not an `offload bench --out` results.json (no \"kind\": \"offload-bench\")")
    if blob.get("schema_version") != SCHEMA_VERSION:
        raise BadResults(f"{path} has schema_version {blob.get('schema_version')!r}; this offload renders "
                         f"version {SCHEMA_VERSION}: rerun the bench with this version")
    if not isinstance(blob.get("contexts"), list) or not isinstance(blob.get("config"), dict):
        raise BadResults(f"{path} lacks \"contexts\" or \"config\": a truncated or edited file")
    return blob


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(vals: list[float], digits: int = 1, scale: float = 1.0) -> str:
    """``[min-max]`` of repeated values times ``scale``, or ``[n/a]`` for a single one (``--reps 1``)."""
    if len(vals) < 2:
        return "[n/a]"
    return f"[{min(vals) * scale:.{digits}f}-{max(vals) * scale:.{digits}f}]"


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (over their common length), or None."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def read_gbps(ctx: dict[str, Any]) -> float | None:
    """The cold read bandwidth measured at this context (the exact all-DISK row's pages)."""
    for row in ctx["rows"]:
        if row.get("read_gbps"):
            return median(row["read_gbps"])
    return None


def disk_bound(ctx: dict[str, Any], row: dict[str, Any]) -> float | None:
    """Tokens per second the row's DISK bytes per token allow at the measured bandwidth."""
    gbps, disk = read_gbps(ctx), row.get("bytes_per_token", {}).get("disk", 0)
    return gbps * 1e9 / disk if gbps and disk else None


def load_fidelity(path: Path) -> dict[str, Any]:
    """What the report keeps of the sparse harness's JSON (``bench/fidelity.py --json-out``): it
    is stored in results.json, so that ``--render`` draws the fidelity table and plot from it alone.

    Raises:
        BadResults: unreadable, or not the harness's JSON.
    """
    try:
        blob = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadResults(f"--fidelity {path}: cannot read it as JSON ({e})") from None
    if not isinstance(blob, dict) or "continuation" not in blob:
        raise BadResults(f"--fidelity {path} is not the JSON of bench/fidelity.py --json-out (no \"continuation\")")
    return {k: blob[k] for k in ("model", "lengths", "budgets", "continuation", "summary_4k_plus", "summary_short",
                                 "peers") if k in blob}
