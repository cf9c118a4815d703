"""Storage tiers: mechanism only (where bytes live and how they move), never policy."""
from storage.base import Tier
from storage.device_arena import DeviceArena

__all__ = ["Tier", "DeviceArena"]
