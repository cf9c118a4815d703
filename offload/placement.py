"""Placement: which tier each KV page lives on (plain data; the LP planner will produce it).

The rule of this version, ``fill_order_placement``, fills DEVICE, then HOST, then DISK under the
budgets, with the same split in every layer so each layer's decode step reads the same bytes
from each tier (what a pipelined fetch of layer l+1 during layer l wants)::

    page_id:  0 .............. device_pages ........... +host_pages ............... last
              |---- DEVICE ----|-------- HOST ---------|---------- DISK -----------|tail
                                                                     (partly filled tail: DEVICE)

The first pages (attention sinks) stay closest. A sequence's last, partly filled page is
always on DEVICE: it is where new tokens are appended.

A placement also says where attention over HOST pages runs: in ``delegated_layers`` it runs
on the CPU where the pages are (only the query and the ``(out, lse)`` partial move: FlexGen's
CPU delegation); elsewhere the pages are copied to the compute device.
"""
from __future__ import annotations

import dataclasses

from storage import Tier

__all__ = ["Placement", "fill_order_placement"]


@dataclasses.dataclass(frozen=True, slots=True)
class Placement:
    """Pages [0, device_pages) of every layer on DEVICE, the next host_pages on HOST, the rest
    on DISK. None means unbounded (everything that remains). HOST pages of the layers in
    ``delegated_layers`` are attended on the CPU."""

    device_pages: int | None = None
    host_pages: int | None = 0
    delegated_layers: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        for name in ("device_pages", "host_pages"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"Placement.{name} must be >= 0 or None, got {value}")

    def delegates(self, layer: int) -> bool:
        """True when the layer's HOST pages are attended on the CPU, not fetched."""
        return layer in self.delegated_layers

    def with_delegation(self, layers: range | frozenset[int]) -> "Placement":
        return dataclasses.replace(self, delegated_layers=frozenset(layers))

    def tier_of(self, page_id: int) -> Tier:
        if self.device_pages is None or page_id < self.device_pages:
            return Tier.DEVICE
        if self.host_pages is None or page_id < self.device_pages + self.host_pages:
            return Tier.HOST
        return Tier.DISK

    @classmethod
    def all_on(cls, tier: Tier) -> "Placement":
        """Every full page on one tier (the tail page stays on DEVICE)."""
        if tier == Tier.DEVICE:
            return cls(None, 0)
        if tier == Tier.HOST:
            return cls(0, None)
        return cls(0, 0)


def fill_order_placement(*, pages_per_layer: int, num_layers: int, device_free_slots: int,
                         host_free_slots: int, has_disk: bool) -> Placement:
    """DEVICE first, then HOST, then DISK, the same split in every layer.

    ``device_free_slots`` must already exclude what the device must keep for tails and
    staging. Without a disk every page must fit on DEVICE and HOST together; callers check
    capacity with the returned placement.
    """
    per_layer_device = device_free_slots // num_layers
    if per_layer_device >= pages_per_layer:
        return Placement(None, 0)
    per_layer_host = host_free_slots // num_layers
    if not has_disk or per_layer_device + per_layer_host >= pages_per_layer:
        return Placement(per_layer_device, None)
    return Placement(per_layer_device, per_layer_host)
