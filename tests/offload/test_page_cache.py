"""The sparse steps' page cache: DISK pages a step read, attended from memory by later steps.

The cache alone (fills, lookups, the oldest entry replaced, entries named this step kept,
slots forgotten when DISK hands them out again), then an engine: a quest run on DISK pages
with the cache attends what it attends without it and reads fewer DISK bytes."""
from __future__ import annotations

import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.kv.page_cache import DiskPageCache
from offload.kv.placement import Placement
from offload.model.model_source import ModelSource
from planner import HardwareProfile
from storage import PageArena, Tier
from tests.offload.test_read_sets import PAGE, _config

MiB = 2**20
H, D = 2, 4


def _pages(values: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """K, V [H, n, PAGE, D]: page i holds ``values[i]`` (V: its negative)."""
    k = torch.tensor(values, dtype=torch.float32).view(1, -1, 1, 1).expand(H, -1, PAGE, D).contiguous()
    return k, -k


def _cache(slots: int) -> DiskPageCache:
    return DiskPageCache(PageArena(num_slots=slots, num_kv_heads=H, page_size=PAGE, head_dim=D,
                                   dtype=torch.float32, device="cpu"))


def _held(cache: DiskPageCache, layer: int, disk_slot: int) -> float | None:
    slot = cache.lookup(layer, [disk_slot])[0]
    return None if slot is None else float(cache.arena.k[0, slot, 0, 0])


def test_fills_lookups_and_the_oldest_entry_replaced():
    cache = _cache(3)
    cache.begin_step()
    k, v = _pages([10.0, 11.0, 12.0, 13.0])
    cache.fill(0, [5, 7], k, v, [1, 3])  # staged pages at buffer positions 1 and 3
    assert cache.pages == 2 and cache.fills == 2
    assert _held(cache, 0, 5) == 11.0 and _held(cache, 0, 7) == 13.0 and _held(cache, 1, 5) is None
    slot = cache.lookup(0, [7])[0]
    assert torch.equal(cache.arena.v[:, slot], -cache.arena.k[:, slot])
    cache.begin_step()
    cache.fill(1, [5], k, v, [0])  # the third slot
    cache.lookup(0, [5])  # layer 0's slot 5 named this step, slot 7 not
    cache.fill(2, [9], k, v, [2])  # full: the oldest not named this step (layer 0, slot 7) goes
    assert _held(cache, 0, 7) is None and _held(cache, 2, 9) == 12.0 and _held(cache, 0, 5) == 11.0
    assert cache.pages == 3


def test_entries_named_this_step_are_kept_and_a_fill_skips_instead():
    cache = _cache(2)
    cache.begin_step()
    k, v = _pages([1.0, 2.0, 3.0])
    cache.fill(0, [0, 1], k, v, [0, 1])
    cache.begin_step()
    assert sorted(cache.lookup(0, [0, 1])) == [0, 1]  # both named this step
    cache.fill(0, [2], k, v, [2])  # no room this step: nothing replaced, nothing filled
    assert _held(cache, 0, 2) is None and _held(cache, 0, 0) == 1.0 and _held(cache, 0, 1) == 2.0


def test_a_disk_slot_handed_out_again_is_forgotten():
    cache = _cache(2)
    cache.begin_step()
    k, v = _pages([4.0])
    cache.fill(3, [8], k, v, [0])
    cache.forget(3, [8, 9])
    assert _held(cache, 3, 8) is None and cache.pages == 0 and cache.arena.num_used == 0


def _engine(tmp_path, cache_bytes: int) -> Engine:
    # Every page on DISK but the tail; 16-token pages, a 1200-token prompt: 75 pages per layer,
    # so F = 0.1 selects (7 pages a step) instead of falling back to exact.
    config = RuntimeConfig(device="cpu", dtype=torch.float32, page_size=PAGE, device_memory_bytes=8 * MiB,
                           disk_space_bytes=32 * MiB, kv_dir=str(tmp_path), placement=Placement.all_on(Tier.DISK),
                           staging_chunk_pages=8, staging_buffers=2, profile=HardwareProfile.preset("cpu-2core"),
                           sparse="quest", sparse_budget=0.1, sparse_cache_bytes=cache_bytes)
    return Engine(ModelSource("tiny-cache", _config(), None, None), config)


def _run(engine: Engine, steps: int) -> tuple[list[torch.Tensor], list[int]]:
    """Each step's logits, teacher-forced on the prompt's formula after a 1200-token prompt
    (a random model's greedy tokens repeat one id), and the DISK bytes each step read."""
    ids = [(i * 37 + 11) % 256 for i in range(1200 + steps)]
    seq = engine.new_sequence()
    engine.forward(seq, ids[:1200])
    logits, disk = [], []
    for token in ids[1200:]:
        before = engine.kv.io.bytes_read[Tier.DISK]
        logits.append(engine.decode_step(seq, token)[-1].clone())
        disk.append(engine.kv.io.bytes_read[Tier.DISK] - before)
        assert not engine.last_step.fallback
    engine.release(seq)
    return logits, disk


def test_a_sparse_run_with_the_cache_attends_the_same_pages_and_reads_less_disk(tmp_path):
    """Same pages, attended from the cache instead of the staging buffer: the same logits up
    to the order the partials are merged in (fp32 rounding), fewer DISK bytes."""
    plain = _engine(tmp_path / "plain", 0)
    cached = _engine(tmp_path / "cached", 4 * MiB)
    try:
        assert plain.kv.page_cache is None and cached.kv.page_cache is not None
        logits, disk = _run(plain, 12)
        logits_c, disk_c = _run(cached, 12)
        for a, b in zip(logits, logits_c):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
            assert int(torch.argmax(a)) == int(torch.argmax(b))
        assert len({int(torch.argmax(a)) for a in logits}) > 1  # the steps differ
        assert disk_c[0] == disk[0] > 0  # the first step reads its pages and keeps them
        assert sum(disk_c[1:]) < 0.2 * sum(disk[1:])  # later steps find nearly all in memory
        assert cached.kv.page_cache.hits > 0
        assert cached.kv.peak_bytes()["device"] > plain.kv.peak_bytes()["device"]
    finally:
        plain.close()
        cached.close()
