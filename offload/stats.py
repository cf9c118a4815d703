"""Counters of one request: timings, token counts, memory per tier."""
from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["RunStats"]


@dataclasses.dataclass(slots=True)
class RunStats:
    """What one generate/ask call did.

    Attributes:
        ttft_s: time from the call to the first generated token.
        prefill_tokens: tokens run through prefill by this call (0 for a reused document).
        prefill_s / decode_s: wall time of prefill and of the decode steps.
        decode_tokens: tokens produced by decode steps (the first token comes from prefill).
        peak_bytes: high-water mark of KV pages held per tier, in bytes.
        weights_bytes: bytes of model weights (not part of the KV budgets).
        bytes_read_per_token: KV bytes attended per decoded token, by tier.
        cpu_attended_bytes_per_token: of those, bytes attended in place by the CPU page kernel
            (HOST pages under delegation; on a CPU-only machine also DEVICE pages), by tier.
        copied_to_device_bytes_per_token: KV bytes copied to the compute device per decoded
            token (0 on a CPU-only machine; HOST pages under delegation are not copied).
        bytes_read_per_token_by_kind: the same split by layer kind: "global" (pages placed on
            the tiers) and "sliding" (sliding-window rings, always DEVICE; Gemma 3).
        kv_held_bytes_by_kind: bytes of the sequence's pages per layer kind and tier (the
            "sliding" entry is the rings).
        kv_written_bytes_by_kind: K/V bytes the engine has written so far (tokens' own bytes,
            measured at each write), per layer kind and tier.
        fetch_wait_s / compute_s: decode time spent waiting for DISK reads / the rest.
        cold_reads: how DISK reads were kept cold ("o_direct" or "fadvise_dontneed").
        disk_backend: the DISK tier's file I/O ("posix" or "kvikio").
        disk_bytes_written: DISK bytes written by the engine so far.
        doc_cache: for an ingest with the DocCache on: "hit" (restored, no prefill), "miss"
            (prefilled and saved), "rebuilt" (a DocCache failed verification: quarantined,
            prefilled and saved again) or "not saved" (prefilled; its DocCache could not be
            saved, ``doc_cache_reason`` says why); "" when off. doc_cache_verify_s / doc_cache_bytes_read:
            checksum time and bytes read on a hit; doc_cache_evicted: DocCaches removed to fit
            the cache limit.
        restore_recompute_tokens / restore_predicted_s / restore_plan: on a DocCache hit, the
            document's tokens recomputed while the rest loaded (Cake; 0: every page loaded), the
            restore's predicted seconds (None when not priced) and the line that explains the split.
        plan: the planner's last executed plan (method, predicted decode step, bottleneck, KV
            bytes per tier of the pages it placed, delegated share), or None while every page
            fits DEVICE.
        profile: the hardware profile the planner priced with, as "<profile name> (given|saved|
            preset)": given in ``RuntimeConfig.profile``, this machine's saved one, or the
            device type's preset (``Engine.hardware_profile``); None while the planner has not run.
        sparse / sparse_budget: the decode mode ("exact", "quest") and its budget F (None in exact mode).
        kv_format: how pages out of the recent window are stored ("exact", "4bit").
        kv_fraction_read / kv_fraction_read_max: K/V bytes the decode steps attended in the
            global layers (key bounds scanned included) over what exact attention reads at
            each step: mean and max over the steps (``offload.attention.read_account``); 1.0
            in exact mode; None with no decode step.
        kv_fraction_fetched: bytes brought from HOST or DISK (read-ahead dropped unused
            included) over the same denominator, mean over the steps.
        sparse_fallback: why steps attended every page in a sparse mode (the budget covers
            every page, or leaves none to choose), "" if none did.
        selection_s: time spent scoring and choosing pages over the decode.
        selected_pages_per_layer: pages attended per global layer and step, on average.
        speculation_hit_rate: share of the chosen pages a speculative prefetch had brought
            (None: no speculation).
        sync_miss_bytes_per_token: HOST/DISK bytes named only once the layer's query existed,
            read on demand, per decoded token.
        wasted_prefetch_bytes_per_token: DISK bytes read ahead that the final set dropped.
        key_bounds_bytes: bytes of the sequence's key bounds held on the compute device;
            key_bounds_bytes_read_per_token: of them, scanned per decoded token (lsh mode: the
            bucket ids the retrieval walked, 2 bytes each).
        lsh_table_bytes: bytes of the sequence's SimHash tables in CPU memory, outside the
            tiers (lsh mode).
    """

    ttft_s: float = 0.0
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    generated_tokens: int = 0
    context_tokens: int = 0
    peak_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    page_size: int = 0
    device: str = ""
    dtype: str = ""
    kv_dtype: str = ""
    stop_reason: str = ""
    bytes_read_per_token: dict[str, int] = dataclasses.field(default_factory=dict)
    cpu_attended_bytes_per_token: dict[str, int] = dataclasses.field(default_factory=dict)
    copied_to_device_bytes_per_token: int = 0
    bytes_read_per_token_by_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    kv_held_bytes_by_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    kv_written_bytes_by_kind: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    fetch_wait_s: float = 0.0
    compute_s: float = 0.0
    cold_reads: str = ""
    disk_backend: str = ""
    disk_bytes_written: int = 0
    plan: dict[str, Any] | None = None
    profile: str | None = None
    sparse: str = "exact"
    sparse_budget: float | None = None
    kv_format: str = "exact"
    kv_fraction_read: float | None = None
    kv_fraction_read_max: float | None = None
    kv_fraction_fetched: float | None = None
    sparse_fallback: str = ""
    selection_s: float = 0.0
    selected_pages_per_layer: float | None = None
    speculation_hit_rate: float | None = None
    sync_miss_bytes_per_token: int = 0
    wasted_prefetch_bytes_per_token: int = 0
    key_bounds_bytes: int = 0
    key_bounds_bytes_read_per_token: int = 0
    lsh_table_bytes: int = 0
    doc_cache: str = ""
    doc_cache_reason: str = ""
    doc_cache_verify_s: float = 0.0
    doc_cache_bytes_read: int = 0
    doc_cache_evicted: list[str] = dataclasses.field(default_factory=list)
    restore_recompute_tokens: int = 0
    restore_predicted_s: float | None = None
    restore_plan: str = ""

    @property
    def prefill_tok_s(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["prefill_tok_s"] = round(self.prefill_tok_s, 3)
        d["decode_tok_s"] = round(self.decode_tok_s, 3)
        for key in ("ttft_s", "prefill_s", "decode_s"):
            d[key] = round(d[key], 6)
        return d
