"""Storage tiers: mechanism only (where bytes live and how they move), never policy."""
from storage.aligned import AlignedBuffer
from storage.base import Tier
from storage.disk_store import DiskExtentStore, TransferHandle, TransferResult
from storage.errors import StorageIOError
from storage.kvikio_io import BACKENDS, kvikio_status, make_io
from storage.page_arena import PackedArena, PageArena

__all__ = ["Tier", "PageArena", "PackedArena", "DiskExtentStore", "TransferHandle", "TransferResult", "StorageIOError",
           "AlignedBuffer", "make_io", "kvikio_status", "BACKENDS"]
