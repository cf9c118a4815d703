"""The KV tiers an engine runs on, built from its budgets before the weights load (so a budget
too small fails fast): the exact DEVICE arena, the HOST arena, the DISK store in a run
directory of its own, and with 4-bit pages the packed arenas.

Sizes (``RuntimeConfig``'s budgets):

- DEVICE: ``device_memory_bytes``, or by default half the available RAM on a CPU, or on CUDA
  the model's full context (and a few forks' tails and rings), at most half the free GPU
  memory. With 4-bit pages the exact arena holds the exact pages (sinks, windows, tails,
  rings) of ``EXACT_SEQUENCES`` sequences, at most half a small budget and at least two
  sequences'; the rest of the budget holds 4-bit pages.
- HOST: ``host_memory_bytes`` less the DISK staging area (exact pages, or 4-bit pages only).
- DISK: ``disk_space_bytes``, or half the free space of ``kv_dir`` when the run may spill; a
  slot holds one page as it leaves DEVICE (with 4-bit pages, a packed one, 4 KiB-aligned).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

import psutil
import torch

from offload.config import KVFormat, RuntimeConfig
from offload.errors import CacheDirError, CapacityError, InputError, UnsupportedModelError
from offload.kv.page_table import cdiv
from offload.kv.quant_pages import PackedPools, Quant4Layout
from offload.model.model_source import AnyModelConfig, default_cache_dir
from offload.tuning.planning import WRITE_STAGING_BYTES, staging_bytes, stored_chunk_pages
from storage import PackedArena, PageArena, Tier, make_io
from storage.disk_store import DiskExtentStore
from storage.run_dirs import RunDir, make_run_dir, remove_dead_run_dirs

__all__ = ["Tiers", "build_tiers", "EXACT_SEQUENCES", "remove_disk_tier"]

logger = logging.getLogger(__name__)

# With 4-bit pages, the exact DEVICE arena holds the exact pages (sinks, windows, tails, rings)
# of this many sequences at once: a document, a question's fork, and two more.
EXACT_SEQUENCES = 4


@dataclasses.dataclass
class Tiers:
    """What ``build_tiers`` made. ``run_dir`` holds the DISK store's files (removed with them by
    ``remove_disk_tier``); ``staging`` and ``write_staging`` are the HOST bytes the DISK read
    and write buffers take."""

    arena: PageArena
    host_arena: PageArena | None
    disk: DiskExtentStore | None
    disk_limit: int | None
    run_dir: RunDir | None
    packed: PackedPools | None
    write_staging: int
    chunk_pages: int  # pages of one DISK staging chunk (``stored_chunk_pages``)


def remove_disk_tier(store: DiskExtentStore, run_dir: RunDir) -> None:
    store.close()
    run_dir.remove()  # the files, then the run's lock


@dataclasses.dataclass(frozen=True)
class _Shape:
    config: RuntimeConfig
    model: AnyModelConfig
    device: torch.device
    kv_dtype: torch.dtype
    ring_pages: tuple[int, ...]
    layout: Quant4Layout | None

    @property
    def slot_bytes(self) -> int:
        m = self.model
        return 2 * m.num_kv_heads * self.config.page_size * m.head_dim * self.kv_dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        """Bytes of a page that can leave DEVICE: an exact page, or a packed one."""
        return self.layout.page_bytes if self.layout is not None else self.slot_bytes

    def exact_pages_per_sequence(self) -> int:
        """Exact pages one sequence holds at most with 4-bit pages: per global layer the sink
        page, the window, the tail and the page being packed; per sliding layer its ring and a
        copy-on-write tail."""
        return sum(PackedPools.window_pages + 3 if r == 0 else r + 1 for r in self.ring_pages)


def build_tiers(config: RuntimeConfig, model: AnyModelConfig, *, device: torch.device, kv_dtype: torch.dtype,
                ring_pages: tuple[int, ...]) -> Tiers:
    """The tiers of an engine (module docstring); on a refusal nothing is left behind.

    Raises:
        CapacityError: a budget holds no page; UnsupportedModelError: 4-bit pages of a
        head_dim they cannot hold; CacheDirError / InputError: the DISK tier's directory or
        backend.
    """
    layout = _packed_layout(config, model) if config.kv_format == KVFormat.Q4 else None
    shape = _Shape(config, model, device, kv_dtype, tuple(ring_pages), layout)
    budget = _device_budget(shape)
    arena = PageArena(num_slots=_arena_slots(shape, budget), num_kv_heads=model.num_kv_heads,
                      page_size=config.page_size, head_dim=model.head_dim, dtype=kv_dtype, device=device)
    disk, disk_limit, run_dir = _make_disk(shape)
    try:
        chunk_pages = stored_chunk_pages(config.staging_chunk_pages, shape.slot_bytes, shape.stored_bytes)
        staging = (staging_bytes(shape.stored_bytes, staging_chunk_pages=chunk_pages,
                                 staging_buffers=config.staging_buffers) if disk is not None else 0)
        host_arena = _make_host_arena(shape, reserved=staging) if layout is None else None
        packed = _make_packed_pools(shape, budget - arena.num_slots * arena.slot_bytes, staging)
    except BaseException:
        if disk is not None and run_dir is not None:
            remove_disk_tier(disk, run_dir)
        raise
    return Tiers(arena, host_arena, disk, disk_limit, run_dir, packed, WRITE_STAGING_BYTES if disk is not None else 0,
                 chunk_pages)


def _packed_layout(config: RuntimeConfig, model: AnyModelConfig) -> Quant4Layout:
    try:
        return Quant4Layout(model.num_kv_heads, config.page_size, model.head_dim)
    except ValueError as e:
        raise UnsupportedModelError(f"kv_format 4bit cannot hold this model's pages ({e}); use "
                                    "--kv-format exact") from None


def _device_budget(shape: _Shape) -> int:
    """The DEVICE KV budget in bytes (``device_memory_bytes``, or the default)."""
    budget = shape.config.device_memory_bytes
    if budget is not None:
        return budget
    if shape.device.type == "cuda":
        # GPU memory is reserved up front: the full context of one sequence plus copy-on-write
        # tails of a few forks (with 4-bit pages, the exact pages of a few sequences beside
        # the context's packed pages), at most half of what is free.
        context_pages = cdiv(shape.model.max_position_embeddings, shape.config.page_size) + 4
        want = sum(context_pages if r == 0 else 2 * r + 4 for r in shape.ring_pages) * shape.stored_bytes
        if shape.layout is not None:
            want += EXACT_SEQUENCES * shape.exact_pages_per_sequence() * shape.slot_bytes
        return min(want, torch.cuda.mem_get_info(shape.device)[0] // 2)
    # RAM pages are touched only when written, so the budget can be generous.
    return psutil.virtual_memory().available // 2


def _arena_slots(shape: _Shape, budget: int) -> int:
    """Slots of the exact DEVICE arena: the budget's, or with 4-bit pages what the exact pages
    of ``EXACT_SEQUENCES`` sequences take (at most half a small budget, at least two
    sequences' pages)."""
    slot_bytes = shape.slot_bytes
    slots = budget // slot_bytes
    if shape.layout is not None:
        per_sequence = shape.exact_pages_per_sequence()
        slots = min(slots, EXACT_SEQUENCES * per_sequence, max(2 * per_sequence, slots // 2))
    if slots < 1:
        m = shape.model
        raise CapacityError(
            f"--device-memory {budget} bytes holds no KV page; one page is {slot_bytes} bytes "
            f"({shape.config.page_size} tokens x {m.num_kv_heads} KV heads x {m.head_dim} x K,V); raise it")
    return int(slots)


def _make_disk(shape: _Shape) -> tuple[DiskExtentStore | None, int | None, RunDir | None]:
    """The DISK tier's store, its budget in pages and its run directory, or Nones without one."""
    c = shape.config
    uses_disk = c.placement is not None and c.placement.reaches_disk(shape.model.num_layers)
    spill = c.device_memory_bytes is not None or c.disk_space_bytes is not None or uses_disk
    if c.disk_space_bytes == 0 or not spill:
        return None, None, None
    base = Path(c.kv_dir) if c.kv_dir else default_cache_dir() / "kv"
    try:  # runs killed before they could remove their files (SIGKILL, power loss)
        removed = remove_dead_run_dirs(base)
        if removed:
            logger.info("removed %d DISK-tier directories of processes that no longer run", len(removed))
    except OSError as e:
        logger.warning("could not remove the DISK-tier files of a run that no longer runs (%s)", e)
    try:
        run_dir = make_run_dir(base)  # locked for this engine's life: never taken for dead
    except OSError as e:
        raise CacheDirError(f"cannot create the DISK tier directory under {base} ({e.strerror}); "
                            "pass --cache-dir with a writable directory") from None
    root = run_dir.path
    try:
        budget = c.disk_space_bytes if c.disk_space_bytes is not None else shutil.disk_usage(root).free // 2
        try:
            io = make_io(c.disk_backend.value)
        except ValueError as e:
            raise InputError(str(e)) from None
        store = DiskExtentStore(root, num_layers=shape.model.num_layers, page_bytes=shape.stored_bytes, io=io)
    except BaseException:
        run_dir.remove()
        raise
    return store, budget // store.disk_page_bytes, run_dir


def _make_host_arena(shape: _Shape, *, reserved: int) -> PageArena | None:
    budget = shape.config.host_memory_bytes or 0
    slot_bytes = shape.slot_bytes
    slots = (budget - reserved) // slot_bytes if budget > reserved else 0
    if budget and slots < 1:
        raise CapacityError(f"--host-memory {budget} bytes leaves no room for KV pages after the "
                            f"{reserved}-byte DISK staging area; raise it to at least "
                            f"{cdiv((reserved + slot_bytes), 2**20)}MiB")
    if slots < 1:
        return None
    m = shape.model
    return PageArena(num_slots=int(slots), num_kv_heads=m.num_kv_heads, page_size=shape.config.page_size,
                     head_dim=m.head_dim, dtype=shape.kv_dtype, device="cpu", tier=Tier.HOST,
                     pin_memory=shape.device.type == "cuda")


def _make_packed_pools(shape: _Shape, device_room: int, reserved: int) -> PackedPools | None:
    """With 4-bit pages, their arenas: DEVICE's share of the budget the exact arena leaves
    (``device_room`` bytes), and HOST's budget beside the DISK staging area."""
    layout = shape.layout
    if layout is None:
        return None
    arenas = {}
    if device_room >= layout.page_bytes:
        arenas[Tier.DEVICE] = PackedArena(num_slots=device_room // layout.page_bytes, slot_bytes=layout.page_bytes,
                                          device=shape.device)
    host = shape.config.host_memory_bytes or 0
    if host >= reserved + layout.page_bytes:
        arenas[Tier.HOST] = PackedArena(num_slots=(host - reserved) // layout.page_bytes,
                                        slot_bytes=layout.page_bytes, device="cpu", tier=Tier.HOST)
    elif host:
        raise CapacityError(f"--host-memory {host} bytes leaves no room for 4-bit pages after the {reserved}-byte "
                            f"DISK staging area; raise it to at least {cdiv(reserved + layout.page_bytes, 2**20)}MiB")
    return PackedPools(layout, arenas)
