"""A page arena: a fixed pool of page slots of one tier in memory.

The DEVICE arena lives in GPU memory (or RAM on a CPU-only machine); the HOST arena in CPU
memory, pinned when CUDA is present so copies to the GPU can be asynchronous.

Layout (head-major, so a run of consecutive slots is one strided view per KV head)::

    k, v: [num_kv_heads, num_slots, page_size, head_dim]

A slot holds one page: ``page_size`` consecutive tokens of one layer's K and V for all KV
heads. Slots are shared by all layers; which layer and page a slot holds is recorded by the
page table in ``offload/``, not here.

Invariants:
- a slot is either on the free list or has a reference count >= 1, never both;
- ``free`` of the last reference returns the slot to the free list (lowest ids first, so a
  fresh arena hands out ascending, contiguous slots).
"""
from __future__ import annotations

import heapq
import logging
import weakref
from typing import Any

import torch

from storage.base import Tier

__all__ = ["PackedArena", "PageArena", "SlotPool"]

logger = logging.getLogger(__name__)


def _unregister(tensors: list[torch.Tensor]) -> None:
    torch.cuda.synchronize()
    rt = torch.cuda.cudart()
    for t in tensors:
        rt.cudaHostUnregister(t.data_ptr())


class SlotPool:
    """Slot bookkeeping shared by the arenas: a free list (lowest ids first) and reference
    counts. A subclass holds the bytes and sets ``slot_bytes``.

    Args:
        num_slots: number of slots (>= 1).
        tier: which tier the slots are (DEVICE or HOST).
    """

    def __init__(self, num_slots: int, tier: Tier) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if tier == Tier.DISK:
            raise ValueError("a page arena holds DEVICE or HOST pages; DISK pages live in a DiskExtentStore")
        self.tier = tier
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots))  # a heap: lowest slot first
        self._refs = [0] * num_slots
        self._peak_used = 0

    @property
    def slot_bytes(self) -> int:
        raise NotImplementedError

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    @property
    def peak_used_bytes(self) -> int:
        """High-water mark of slots in use, in bytes."""
        return self._peak_used * self.slot_bytes

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free slots (reference count 1 each).

        Returns:
            The slot ids in ascending order, or None when fewer than ``n`` are free (an
            expected capacity miss; nothing is taken then).
        """
        if n > len(self._free):
            return None
        slots = [heapq.heappop(self._free) for _ in range(n)]
        for s in slots:
            self._refs[s] = 1
        self._peak_used = max(self._peak_used, self.num_used)
        return slots

    def allocate_shuffled(self, n: int, generator: torch.Generator) -> list[int] | None:
        """Like ``allocate`` but takes ``n`` random free slots (tests of real paging)."""
        if n > len(self._free):
            return None
        order = torch.randperm(len(self._free), generator=generator).tolist()
        pool = sorted(self._free)
        slots = [pool[i] for i in order[:n]]
        taken = set(slots)
        self._free = [s for s in pool if s not in taken]
        heapq.heapify(self._free)
        for s in slots:
            self._refs[s] = 1
        self._peak_used = max(self._peak_used, self.num_used)
        return slots

    def incref(self, slots: list[int]) -> None:
        """Add one reference to each slot (sharing pages between sequences)."""
        for s in slots:
            assert self._refs[s] > 0, f"incref of free slot {s}"
            self._refs[s] += 1

    def free(self, slots: list[int]) -> None:
        """Drop one reference to each slot; slots reaching zero return to the free list."""
        for s in slots:
            assert self._refs[s] > 0, f"double free of slot {s}"
            self._refs[s] -= 1
            if self._refs[s] == 0:
                heapq.heappush(self._free, s)

    def refcount(self, slot: int) -> int:
        return self._refs[slot]


class PageArena(SlotPool):
    """Fixed-size pool of KV page slots with reference counts.

    Args:
        num_slots: number of page slots (>= 1).
        tier: which tier this arena is (DEVICE or HOST).
        pin_memory: allocate pinned host memory (HOST arena with CUDA present).
        num_kv_heads: KV heads per layer.
        page_size: tokens per page.
        head_dim: channels per head.
        dtype: storage dtype of K and V.
        device: torch device of the arena.
    """

    def __init__(
        self,
        *,
        num_slots: int,
        num_kv_heads: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        tier: Tier = Tier.DEVICE,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(num_slots, tier)
        self.page_size = page_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        shape = (num_kv_heads, num_slots, page_size, head_dim)
        # torch.empty: on CPU the pages are touched (and counted in RSS) only when written
        # (pinned memory is touched at once: locking faults every page in).
        self.k = torch.empty(shape, dtype=dtype, device=self.device)
        self.v = torch.empty(shape, dtype=dtype, device=self.device)
        self._token_views: tuple[Any, Any] | None = None  # numpy views of K and V (CPU fp32/fp16)
        self.pinned_by = "no"  # "register" (cudaHostRegister), "allocator" (pin_memory=True) or "no"
        if pin_memory:
            self._pin()
        logger.debug("%s arena: %d slots of %d bytes", tier.value, num_slots, self.slot_bytes)

    def _pin(self) -> None:
        """Page-lock K and V for asynchronous copies to CUDA. ``cudaHostRegister`` locks exactly
        their bytes; ``pin_memory=True`` (the fallback when registering fails) goes through
        torch's caching host allocator, which rounds each block up to a power of two (a
        35 GiB K would lock 64 GiB)."""
        rt = torch.cuda.cudart()
        registered: list[torch.Tensor] = []
        for t in (self.k, self.v):
            if int(rt.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) != 0:  # 0: cudaSuccess
                break
            registered.append(t)
        else:
            self.pinned_by = "register"
            # When the arena goes: the device finishes any copy from it, the memory is
            # unregistered, and only then freed (the finalizer holds the tensors till then).
            weakref.finalize(self, _unregister, registered)
            return
        for t in registered:
            rt.cudaHostUnregister(t.data_ptr())
        logger.warning("cudaHostRegister failed for the %s arena; pinning through torch's allocator",
                       self.tier.value)
        self.k = self.k.pin_memory()
        self.v = self.v.pin_memory()
        self.pinned_by = "allocator"

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot (K and V of one page, all KV heads)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_kv_heads * self.page_size * self.head_dim * elem

    def copy_slot(self, src: int, dst: int) -> None:
        """Copy the contents of slot ``src`` into slot ``dst`` (copy-on-write of a tail page)."""
        self.k[:, dst].copy_(self.k[:, src])
        self.v[:, dst].copy_(self.v[:, src])

    def write(self, slots: torch.Tensor, offsets: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Scatter tokens into slots.

        Args:
            slots: [T] int64, slot of each token.
            offsets: [T] int64, position of each token inside its page.
            k, v: [T, num_kv_heads, head_dim], any float dtype (cast to the arena dtype).
        """
        self.k[:, slots, offsets] = k.transpose(0, 1).to(self.dtype)
        self.v[:, slots, offsets] = v.transpose(0, 1).to(self.dtype)

    def write_pages(self, slots: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """Write whole pages. k, v: [num_kv_heads, len(slots), page_size, head_dim] (any
        float dtype and device: cast and moved to the arena's)."""
        index = torch.tensor(slots, dtype=torch.int64, device=self.k.device)
        self.k.index_copy_(1, index, k.to(self.k.device, self.dtype))
        self.v.index_copy_(1, index, v.to(self.v.device, self.dtype))

    def write_token(self, slot: int, offset: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one token. k, v: [num_kv_heads, head_dim]."""
        views = self._token_views
        if views is None and self.device.type == "cpu" and self.dtype in (torch.float32, torch.float16):
            views = self._token_views = (self.k.numpy(), self.v.numpy())  # made once, on the first write
        if views is not None and k.device.type == "cpu" and k.dtype == self.dtype and v.dtype == self.dtype:
            # A decode step's token on the CPU: numpy assignment costs a fraction of torch indexing's.
            views[0][:, slot, offset] = k.numpy()
            views[1][:, slot, offset] = v.numpy()
            return
        self.k[:, slot, offset] = k
        self.v[:, slot, offset] = v

    def read(self, slots: list[int], num_tokens: int, *, contiguous: bool | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a run of pages, as [num_kv_heads, num_tokens, head_dim].

        A run of consecutive ascending slots is returned as a view (no copy); otherwise the
        pages are gathered into a new tensor. ``num_tokens`` trims a partly filled last page.
        ``contiguous`` may be passed by a caller that already knows (None = check).
        """
        n = len(slots)
        assert 0 < num_tokens <= n * self.page_size
        s0 = slots[0]
        if contiguous is None:
            contiguous = slots == list(range(s0, s0 + n))
        if contiguous:
            k = self.k[:, s0 : s0 + n]
            v = self.v[:, s0 : s0 + n]
        else:
            idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
            k = self.k.index_select(1, idx)
            v = self.v.index_select(1, idx)
        shape = (self.num_kv_heads, n * self.page_size, self.head_dim)
        return k.reshape(shape)[:, :num_tokens], v.reshape(shape)[:, :num_tokens]


class PackedArena(SlotPool):
    """A pool of slots holding one packed page each as opaque bytes (4-bit pages: their layout
    is ``offload.kv.quant_pages``), slot-major: ``data`` uint8 [num_slots, slot_bytes].

    Args:
        num_slots: number of slots (>= 1).
        slot_bytes: bytes of one packed page (>= 1).
        device: torch device of the arena.
        tier: DEVICE or HOST.
    """

    def __init__(self, *, num_slots: int, slot_bytes: int, device: torch.device | str,
                 tier: Tier = Tier.DEVICE) -> None:
        super().__init__(num_slots, tier)
        if slot_bytes < 1:
            raise ValueError(f"slot_bytes must be >= 1, got {slot_bytes}")
        self._slot_bytes = slot_bytes
        self.device = torch.device(device)
        self.data = torch.empty((num_slots, slot_bytes), dtype=torch.uint8, device=self.device)
        logger.debug("%s packed arena: %d slots of %d bytes", tier.value, num_slots, slot_bytes)

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    def rows(self, slots: list[int]) -> torch.Tensor:
        """The blobs of ``slots`` [n, slot_bytes]: a view for a run of ascending slots, else a gather."""
        s0, n = slots[0], len(slots)
        if slots == list(range(s0, s0 + n)):
            return self.data[s0:s0 + n]
        return self.data.index_select(0, torch.tensor(slots, dtype=torch.int64, device=self.device))

    def write_rows(self, slots: list[int], blobs: torch.Tensor) -> None:
        """Write blobs [len(slots), >= slot_bytes] (uint8, any device) into ``slots``."""
        index = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.data.index_copy_(0, index, blobs[:, :self._slot_bytes].to(self.device))
