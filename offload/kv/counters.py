"""I/O counters of the paged KV and their snapshots.

Counters are keyed by ``Tier`` and ``LayerKind`` (closed sets); stats and JSON turn them into
strings at the edge (``IOSnapshot.as_strings``). Reads are counted from a step's read sets
(``offload.kv.reads.LayerReads``) when they are consumed, never by the kernels; waits are
timed where the reads are taken.
"""
from __future__ import annotations

import dataclasses

from offload.kv.page_table import LayerKind
from storage import Tier

__all__ = ["IOCounters", "IOSnapshot", "per_tier"]


def per_tier() -> dict[Tier, int]:
    return {t: 0 for t in Tier}


def _per_kind() -> dict[LayerKind, dict[Tier, int]]:
    return {k: per_tier() for k in LayerKind}


@dataclasses.dataclass(slots=True)
class IOCounters:
    """Bytes of KV pages read per tier for attention, of those attended in place by a CPU
    kernel, copied to the compute device, and time spent waiting for DISK.

    Attributes:
        bytes_read: bytes of pages read for attention, per tier.
        cpu_attended_bytes: of those, bytes a CPU kernel attended where they lie (HOST
            delegation; on a CPU-only machine also DEVICE pages and staged DISK chunks).
        read_by_kind / written_by_kind: per layer kind, bytes of pages read per tier, and
            bytes of K/V written per tier (the tokens' own bytes, padding excluded).
        copied_to_device_bytes: bytes copied to a CUDA device for attention.
        fetch_wait_s: seconds attention waited for DISK reads.
        disk_bytes_written: bytes written to the DISK tier (whole DISK pages).
        evicted_pages: DEVICE pages moved to HOST or DISK to make room.
    """

    bytes_read: dict[Tier, int] = dataclasses.field(default_factory=per_tier)
    cpu_attended_bytes: dict[Tier, int] = dataclasses.field(default_factory=per_tier)
    read_by_kind: dict[LayerKind, dict[Tier, int]] = dataclasses.field(default_factory=_per_kind)
    written_by_kind: dict[LayerKind, dict[Tier, int]] = dataclasses.field(default_factory=_per_kind)
    copied_to_device_bytes: int = 0
    fetch_wait_s: float = 0.0
    disk_bytes_written: int = 0
    evicted_pages: int = 0

    def snapshot(self) -> IOSnapshot:
        """A copy of the counters now (subtract two with ``IOSnapshot.minus``)."""
        return IOSnapshot(
            bytes_read=dict(self.bytes_read), cpu_attended_bytes=dict(self.cpu_attended_bytes),
            read_by_kind={k: dict(d) for k, d in self.read_by_kind.items()},
            copied_to_device_bytes=self.copied_to_device_bytes, fetch_wait_s=self.fetch_wait_s)


@dataclasses.dataclass(frozen=True, slots=True)
class IOSnapshot:
    """The read-side counters at one moment (or a difference of two moments)."""

    bytes_read: dict[Tier, int]
    cpu_attended_bytes: dict[Tier, int]
    read_by_kind: dict[LayerKind, dict[Tier, int]]
    copied_to_device_bytes: int
    fetch_wait_s: float

    def minus(self, before: IOSnapshot) -> IOSnapshot:
        """What happened between ``before`` and this snapshot."""
        return IOSnapshot(
            bytes_read={t: b - before.bytes_read[t] for t, b in self.bytes_read.items()},
            cpu_attended_bytes={t: b - before.cpu_attended_bytes[t] for t, b in self.cpu_attended_bytes.items()},
            read_by_kind={k: {t: b - before.read_by_kind[k][t] for t, b in d.items()}
                          for k, d in self.read_by_kind.items()},
            copied_to_device_bytes=self.copied_to_device_bytes - before.copied_to_device_bytes,
            fetch_wait_s=self.fetch_wait_s - before.fetch_wait_s)


def tier_strings(d: dict[Tier, int], per: int = 1) -> dict[str, int]:
    """A per-tier dict with the tiers' string values as keys (stats, JSON), divided by ``per``."""
    return {t.value: b // per for t, b in d.items()}


def kind_strings(d: dict[LayerKind, dict[Tier, int]], per: int = 1) -> dict[str, dict[str, int]]:
    return {k.value: tier_strings(v, per) for k, v in d.items()}


__all__ += ["tier_strings", "kind_strings"]
