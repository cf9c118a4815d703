"""Compute-or-load for a DocCache restore (Cake: Jin et al., "Compute Or Load KV Cache? Why
Not Both?", 2024): recompute the document's first tokens from their ids while the rest of its
KV loads, the two running side by side, the split where they finish together.

The cost of recomputing a prefix of ``t`` tokens is modelled as ``linear_s * t +
quadratic_s * t**2`` (matmuls and windowed attention grow with ``t``, causal attention of the
global layers with ``t**2``); loading the remaining ``tokens - t`` costs ``load_s`` per token
(read, checksum and place its pages). The restore takes the longer of the two:

    restore_s(t) = max(recompute_s(t), load_s * (tokens - t))

A split lies on a multiple of ``step`` tokens (the prefill chunk and the page size: a
prefix recomputed in the ingest's own chunks gives the ingest's own K/V, bit for bit).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = ["RestoreModel", "RestoreSplit", "choose_split", "prefill_flops", "PRESET_PREFILL_EFFICIENCY"]

# Share of the dense matmul rate a prefill reaches when no prefill of the model was measured
# (a preset, or a DocCache saved without its ingest time). An assumption, stated in the plan.
PRESET_PREFILL_EFFICIENCY = 0.5


def prefill_flops(*, num_heads: int, head_dim: int, params_per_layer: Sequence[int],
                  windows: Sequence[int | None]) -> tuple[float, float]:
    """(linear, quadratic) FLOPs of a causal prefill of ``t`` tokens: ``linear * t +
    quadratic * t**2``. Per layer: 2 FLOPs per weight per token; QK^T and PV over the causal
    half of the scores (a global layer: ``2 * heads * head_dim * t**2``), or over its window
    (``4 * heads * head_dim * window`` per token, the window's first tokens neglected)."""
    linear = 2.0 * sum(params_per_layer)
    quadratic = 0.0
    for w in windows:
        if w is None:
            quadratic += 2.0 * num_heads * head_dim
        else:
            linear += 4.0 * num_heads * head_dim * w
    return linear, quadratic


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreModel:
    """What a restore of a ``tokens``-token document costs, split or not.

    Attributes:
        tokens: the document's tokens.
        step: a split's granularity in tokens (> 0).
        linear_s / quadratic_s: recompute seconds per token and per token squared.
        load_s: seconds to load one token's KV (read, verify, place).
        attend_read_s: seconds per document token that a question's prefill spends reading the
            document's pages from slower tiers (DISK), after the restore.
        first_prefill_s: seconds an engine's first prefill costs beyond its tokens (kernels
            loaded): paid by a split's recompute, else by the question's prefill (a process
            that has prefilled before pays it no more: the prediction is then pessimistic).
        min_gain: a split is chosen only when it predicts at least this share less time than
            loading every page (the planner's ``plan_min_gain``: noise and what the model misses).
        source: where the recompute rates come from (a measured ingest, a profile's FLOP rate).
    """

    tokens: int
    step: int
    linear_s: float
    quadratic_s: float
    load_s: float
    attend_read_s: float = 0.0
    first_prefill_s: float = 0.0
    min_gain: float = 0.0
    source: str = ""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.step < 1:
            raise ValueError(f"RestoreModel needs tokens >= 1 and step >= 1, got {self.tokens} and {self.step}")
        for name in ("linear_s", "quadratic_s", "load_s", "attend_read_s", "first_prefill_s", "min_gain"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"RestoreModel.{name} must be a finite number >= 0, got {value!r}")

    def recompute_s(self, t: int) -> float:
        return self.first_prefill_s + self.linear_s * t + self.quadratic_s * t * t if t else 0.0

    def load_rest_s(self, t: int) -> float:
        return self.load_s * (self.tokens - t)

    def restore_s(self, t: int) -> float:
        return max(self.recompute_s(t), self.load_rest_s(t))

    def extend_s(self, new_tokens: int, *, first: bool = False) -> float:
        """Seconds to prefill ``new_tokens`` more tokens after the document (a question): their
        matmuls, their attention over the document (a query-key pair costs what a causal
        prefill's does: ``2 * quadratic_s``; the new tokens' own pairs neglected), reading
        the document's pages from slower tiers, and ``first_prefill_s`` if it is the
        engine's ``first`` prefill."""
        return (self.linear_s * new_tokens + 2 * self.quadratic_s * new_tokens * self.tokens
                + self.attend_read_s * self.tokens + (self.first_prefill_s if first else 0.0))

    def candidates(self) -> range:
        """Splits that leave at least one token to load: 0, step, 2 step, ... < tokens."""
        return range(0, self.tokens, self.step)


@dataclasses.dataclass(frozen=True, slots=True)
class RestoreSplit:
    """A chosen (or forced) split and its predictions, in seconds."""

    tokens: int  # recomputed prefix
    doc_tokens: int
    predicted_s: float
    load_only_s: float
    recompute_only_s: float
    forced: bool

    @property
    def share(self) -> float:
        return self.tokens / self.doc_tokens

    def explain(self) -> str:
        head = "forced" if self.forced else "chosen"
        if self.tokens == 0:
            return (f"load every page ({head}): predicted {self.load_only_s:.3g} s, against "
                    f"{self.recompute_only_s:.3g} s to recompute the whole document")
        return (f"recompute the first {self.tokens} tokens ({self.share:.0%}, {head}) while the rest loads: "
                f"predicted {self.predicted_s:.3g} s, against {self.load_only_s:.3g} s loading every page and "
                f"{self.recompute_only_s:.3g} s recomputing all")

    def to_dict(self) -> dict[str, object]:
        return {"tokens": self.tokens, "share": round(self.share, 4), "predicted_s": self.predicted_s,
                "load_only_s": self.load_only_s, "recompute_only_s": self.recompute_only_s, "forced": self.forced}


def choose_split(model: RestoreModel, forced: float | None = None) -> RestoreSplit:
    """The split with the least predicted restore time (ties: the smaller prefix; none unless it
    saves ``min_gain`` of loading every page), or the multiple of ``step`` nearest ``forced *
    tokens`` (a share in [0, 1), for tests and benchmarks; clamped to the splits that leave a
    page to load)."""
    cands = model.candidates()
    if forced is not None:
        if not 0.0 <= forced < 1.0:
            raise ValueError(f"a forced restore split is a share in [0, 1), got {forced!r}")
        t = min(cands[-1], int(round(forced * model.tokens / model.step)) * model.step)
    else:
        t = min(cands, key=lambda c: (model.restore_s(c), c))
        if model.restore_s(t) > (1 - model.min_gain) * model.restore_s(0):
            t = 0
    return RestoreSplit(t, model.tokens, model.restore_s(t), model.restore_s(0), model.recompute_s(model.tokens),
                        forced is not None)
