"""Placement: which tier each KV page lives on, and where HOST pages are attended (plain data).

The planner (``offload.tuning.planning``, from ``planner``'s LP or its greedy rule) produces it; tests
and benchmarks may give one directly. Pages of a layer are placed by page id::

    page_id:  0 .............. device_pages ........... +host_pages ............... last
              |---- DEVICE ----|-------- HOST ---------|---------- DISK -----------|tail
                                                                     (partly filled tail: DEVICE)

``device_pages`` and ``host_pages`` are one count for every layer or a tuple with one count per
layer (plans may split layers differently). The first pages (attention sinks) stay closest. A
sequence's last, partly filled page is always on DEVICE: it is where new tokens are appended.

A share of a layer's HOST pages may keep the layer's input activations instead of their K/V
(``recomputed_share``: KVPR, the K/V recomputed on the compute device when read).
A placement also says where attention over HOST pages runs: in ``delegated_layers`` it runs on
the CPU where the pages are (only the query and the ``(out, lse)`` partial move: FlexGen's CPU
delegation); ``delegated_share`` refines that to a share of each layer's HOST pages (the
first ones in page order); elsewhere the pages are copied to the compute device.
"""
from __future__ import annotations

import dataclasses

from storage import Tier

__all__ = ["Placement", "Count"]

Count = int | None | tuple[int | None, ...]


def _at(value: Count, layer: int) -> int | None:
    return value[layer] if isinstance(value, tuple) else value


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Pages [0, device_pages) of a layer on DEVICE, the next host_pages on HOST, the rest on
    DISK. None means unbounded (everything that remains); a tuple gives one count per layer.
    HOST pages of the layers in ``delegated_layers`` are attended on the CPU; with
    ``delegated_share`` (one fraction per layer) only that share of them is."""

    device_pages: Count = None
    host_pages: Count = 0
    delegated_layers: frozenset[int] = frozenset()
    delegated_share: tuple[float, ...] | None = None
    recomputed_share: float | tuple[float, ...] = 0.0

    def __post_init__(self) -> None:
        for name in ("device_pages", "host_pages"):
            value = getattr(self, name)
            for v in value if isinstance(value, tuple) else (value,):
                if v is not None and (not isinstance(v, int) or v < 0):
                    raise ValueError(f"Placement.{name} must be ints >= 0 or None, got {value!r}")
        if self.delegated_share is not None and not all(0.0 <= s <= 1.0 for s in self.delegated_share):
            raise ValueError(f"Placement.delegated_share must hold fractions in [0, 1], got {self.delegated_share!r}")
        shares = self.recomputed_share if isinstance(self.recomputed_share, tuple) else (self.recomputed_share,)
        if not all(0.0 <= s <= 1.0 for s in shares):
            raise ValueError(f"Placement.recomputed_share must hold fractions in [0, 1], got {self.recomputed_share!r}")
        lengths = {len(v) for v in (self.device_pages, self.host_pages, self.delegated_share, self.recomputed_share)
                   if isinstance(v, tuple)}
        if len(lengths) > 1:
            raise ValueError(f"Placement's per-layer tuples must have one length (one entry per layer), got {lengths}")

    def host_share(self, layer: int) -> float:
        """The share of the layer's HOST pages attended on the CPU (the first ones)."""
        if self.delegated_share is not None:
            return self.delegated_share[layer]
        return 1.0 if layer in self.delegated_layers else 0.0

    def with_delegation(self, layers: range | frozenset[int]) -> "Placement":
        return dataclasses.replace(self, delegated_layers=frozenset(layers), delegated_share=None)

    def tier_of(self, page_id: int, layer: int = 0) -> Tier:
        device, host = _at(self.device_pages, layer), _at(self.host_pages, layer)
        if device is None or page_id < device:
            return Tier.DEVICE
        if host is None or page_id < device + host:
            return Tier.HOST
        return Tier.DISK

    def disk_pages(self, pages: int, layer: int = 0) -> int:
        """How many of a layer's pages ``[0, pages)`` ``tier_of`` puts on DISK."""
        device, host = _at(self.device_pages, layer), _at(self.host_pages, layer)
        return 0 if device is None or host is None else max(0, pages - device - host)

    def recomputes(self, layer: int) -> bool:
        """Whether some of the layer's HOST pages keep activations (``recomputed_share`` > 0)."""
        return bool(_at(self.recomputed_share, layer))  # type: ignore[arg-type]

    def recomputed(self, page_id: int, layer: int = 0) -> bool:
        """Whether a HOST page keeps the layer's input activations instead of its K/V (KVPR):
        ``recomputed_share`` of each layer's HOST pages, spread evenly over them."""
        share = _at(self.recomputed_share, layer)  # type: ignore[arg-type]
        if not share or self.tier_of(page_id, layer) != Tier.HOST:
            return False
        i = page_id - (_at(self.device_pages, layer) or 0)
        return int((i + 1) * share) > int(i * share)

    def check_layers(self, num_layers: int) -> None:
        """Raises ValueError unless every per-layer tuple has ``num_layers`` entries."""
        for name in ("device_pages", "host_pages", "delegated_share", "recomputed_share"):
            value = getattr(self, name)
            if isinstance(value, tuple) and len(value) != num_layers:
                raise ValueError(f"Placement.{name} must have one entry per layer ({num_layers}), got {len(value)}")

    def reaches_disk(self, num_layers: int) -> bool:
        """True when some layer's later pages go to DISK."""
        return any(self.tier_of(1 << 40, layer) == Tier.DISK for layer in range(num_layers))

    @classmethod
    def all_on(cls, tier: Tier) -> "Placement":
        """Every full page on one tier (the tail page stays on DEVICE)."""
        if tier == Tier.DEVICE:
            return cls(None, 0)
        if tier == Tier.HOST:
            return cls(0, None)
        return cls(0, 0)
