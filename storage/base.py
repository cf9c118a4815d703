"""Vocabulary shared by the storage tiers: the Tier enum."""
from __future__ import annotations

import enum

__all__ = ["Tier"]


class Tier(enum.Enum):
    """Where a KV page lives.

    DEVICE is GPU memory, or a RAM budget on a CPU-only machine. HOST (pinned CPU memory)
    and DISK (extent files) arrive with the Tiers issue.
    """

    DEVICE = "device"
    HOST = "host"
    DISK = "disk"

    # Members are singletons compared by identity: hash them by identity too, in C (Enum's own
    # __hash__ hashes the name in Python, and read sets key dicts by tier for every page).
    __hash__ = object.__hash__
