"""Resources over many questions: a closed engine frees its KV memory at once (default run),
and the soak (bench/soak.py) at a shorter length: 60 questions against one document spilled
to DISK, with DocCache hits in the same and in new LongDocQA objects (slow)."""
from __future__ import annotations

import gc
import weakref

import pytest

from offload import LongDocQA, RuntimeConfig
from planner.profile import HardwareProfile

QUESTIONS = 60
EVERY = 10
WARMUP = 3  # samples: the first, then one after each kind of DocCache event
RSS_BOUND_MIB = 32.0


def test_a_closed_engine_frees_its_kv_memory_without_the_cycle_collector(tmp_path):
    """Closing a LongDocQA and dropping it frees its arenas, read-ahead staging buffers and
    DISK store at once (on CUDA: GPU and pinned memory), not whenever the cycle collector
    next runs: nothing of the KV manager is left in a reference cycle."""
    config = RuntimeConfig(device="cpu", device_memory_bytes=21 * 48 * 2**10, disk_space_bytes=64 * 2**20,
                           profile=HardwareProfile.preset("cpu-2core"))
    qa = LongDocQA("smollm2-135m", config=config, cache_dir=tmp_path, random_weights=True, num_layers=2)
    doc = qa.ingest(" ".join(f"Entry {i}: {i * 37 % 101} letters." for i in range(40)))
    qa.ask(doc, "How many letters?", max_new_tokens=4)
    kv = qa.engine.kv
    assert kv.disk is not None and kv.readahead is not None
    parts = {"PagedKV": kv, "DEVICE arena": kv.arena, "read-ahead": kv.readahead, "DISK store": kv.disk,
             "staging buffer": kv.readahead.buffers[0]}
    refs = {name: weakref.ref(obj) for name, obj in parts.items()}
    del kv, parts
    gc.collect()
    gc.disable()
    try:
        qa.close()
        del qa, doc
        assert [name for name, ref in refs.items() if ref() is not None] == []
    finally:
        gc.enable()


@pytest.mark.slow  # 60 questions, 4 LongDocQA objects: a few minutes on 2 cores
def test_soak_is_bounded(smollm2_source, tmp_path):
    from bench.soak import problems, soak, table

    result = soak(str(smollm2_source.weights_dir), tmp_path / "cache", questions=QUESTIONS, every=EVERY,
                  device="cpu")
    print(table(result.samples))
    assert len(result.samples) == QUESTIONS // EVERY
    assert result.answers == QUESTIONS + (QUESTIONS // EVERY + 1) // 2  # the second document's, every other event
    assert result.statuses.count("hit") >= QUESTIONS // EVERY
    assert all(s.pages[2] > 0 for s in result.samples)  # pages on DISK throughout
    assert problems(result, warmup=WARMUP, rss_bound_mib=RSS_BOUND_MIB) == []
