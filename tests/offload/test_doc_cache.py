"""DocCache through the API: ingest once, reuse from a new LongDocQA (a later process), verified.

Random-weight models (a 2-layer SmolLM2 shape; a 6-layer Gemma 3 270M shape: five sliding
layers and one global) keep this fast; budgets make the pages spill to DISK so restoring goes
through the planner and the tiers like a prefill does.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from offload.api import LongDocQA
from offload.config import RuntimeConfig
from offload.kv.doc_cache import DocCacheError
from planner.profile import HardwareProfile

# Each test spills into its own fresh cache dir: a given profile keeps LongDocQA from
# measuring one per test (tests/conftest.py, TEST_PROFILE).
PROFILE = HardwareProfile.preset("cpu-2core")

DOC = " ".join(f"line {i}: the quick brown fox number {i * 7 % 13} jumps." for i in range(60))  # ~3.4K bytes
QUESTION = "Which number jumps?"


def _qa(cache: Path, model: str = "smollm2-135m", layers: int = 2, **kw) -> LongDocQA:
    device_mib = 10 if model.startswith("gemma3") else 2  # Gemma: five rings of 17 pages of 64 KiB
    config = RuntimeConfig(device="cpu", device_memory_bytes=device_mib * 2**20, host_memory_bytes=12 * 2**20,
                           staging_chunk_pages=8, kv_dir=str(cache / "kv"), profile=PROFILE)
    return LongDocQA(model, config=config, cache_dir=cache, random_weights=True, num_layers=layers, **kw)


def _answer(qa: LongDocQA, doc) -> list[int]:
    return qa.ask(doc, QUESTION, max_new_tokens=8).token_ids


@pytest.mark.parametrize("model, layers", [("smollm2-135m", 2),
                                           pytest.param("gemma3-270m", 6, marks=pytest.mark.slow)])
def test_hit_in_a_new_instance_answers_like_a_fresh_ingest(tmp_path, model, layers):
    with _qa(tmp_path, model, layers, doc_cache=False) as qa:
        fresh = _answer(qa, qa.ingest(DOC))
    with _qa(tmp_path, model, layers) as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "miss" and doc.stats.prefill_tokens == doc.num_tokens
        assert _answer(qa, doc) == fresh
    with _qa(tmp_path, model, layers) as qa:  # a later process: nothing shared but the cache dir
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "hit" and doc.stats.prefill_tokens == 0
        assert doc.stats.doc_cache_bytes_read > 0 and doc.stats.peak_bytes["disk"] > 0
        answer = qa.ask(doc, QUESTION, max_new_tokens=8)
        assert answer.token_ids == fresh and answer.stats.doc_cache == "hit"
        assert _answer(qa, doc) == fresh  # ask twice


def test_hit_restored_in_small_pieces_answers_like_a_fresh_ingest(tmp_path, monkeypatch):
    """A DocCache restored a few pages at a time (as a long document's is, to bound memory)
    answers exactly as a fresh ingest."""
    import offload.kv.doc_restore as doc_restore

    with _qa(tmp_path, doc_cache=False) as qa:
        fresh = _answer(qa, qa.ingest(DOC))
    with _qa(tmp_path) as qa:
        assert qa.ingest(DOC).stats.doc_cache == "miss"
    with _qa(tmp_path) as qa:
        monkeypatch.setattr(doc_restore, "RESTORE_PIECE_BYTES", 3 * qa.engine.kv.page_bytes)
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "hit" and _answer(qa, doc) == fresh


def _layer_files(cache: Path) -> list[Path]:
    return sorted((cache / "docs").glob("*/layer_*.kv"))


@pytest.mark.slow
def test_corruption_is_quarantined_and_rebuilt_or_refused(tmp_path):
    with _qa(tmp_path) as qa:
        fresh = _answer(qa, qa.ingest(DOC))
    path = _layer_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x40
    path.write_bytes(bytes(data))
    with _qa(tmp_path, rebuild=False) as qa, pytest.raises(DocCacheError, match="fails its checksum"):
        qa.ingest(DOC)
    with _qa(tmp_path) as qa:  # the quarantined one is gone: a plain miss now
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "miss" and _answer(qa, doc) == fresh
    path = _layer_files(tmp_path)[0]
    data = bytearray(path.read_bytes())
    data[5] ^= 0x01
    path.write_bytes(bytes(data))
    with _qa(tmp_path) as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "rebuilt" and _answer(qa, doc) == fresh
    with _qa(tmp_path) as qa:
        assert qa.ingest(DOC).stats.doc_cache == "hit"


@pytest.mark.slow
def test_cache_limit_evicts_least_recently_used(tmp_path):
    docs = [DOC + f" Appendix {i}." for i in range(3)]
    with _qa(tmp_path) as qa:
        qa.ingest(docs[0])
        size = sum(p.stat().st_size for p in _layer_files(tmp_path))
    with _qa(tmp_path, cache_limit_bytes=int(2.5 * size)) as qa:
        assert qa.ingest(docs[1]).stats.doc_cache == "miss"
        assert qa.ingest(docs[0]).stats.doc_cache == "hit"  # now the most recent
        third = qa.ingest(docs[2])
        assert third.stats.doc_cache == "miss" and len(third.stats.doc_cache_evicted) == 1
        assert qa.ingest(docs[0]).stats.doc_cache == "hit"
        assert qa.ingest(docs[1]).stats.doc_cache == "miss"  # it was the one evicted
    with _qa(tmp_path, cache_limit_bytes=size // 2) as qa:  # over the limit: ingested, not saved
        doc = qa.ingest(DOC + " too big")
        assert doc.stats.doc_cache == "not saved" and "cache_limit_bytes" in doc.stats.doc_cache_reason
        with pytest.raises(DocCacheError, match="cache-limit"):
            qa.ingest(DOC + " too big", require_doc_cache=True)


@pytest.mark.slow  # kills and restarts subprocesses: minutes
def test_reliability_script_small():
    """bench/doc_cache_reliability.py with few trials: kills at every named phase and a random
    moment, corruptions, two concurrent ingests, a full disk; it exits 0 only if every count
    is as required (0 invalid DocCaches used, 0 leftovers, every corruption detected, one build)."""
    from bench.doc_cache_reliability import main

    assert main(["--kills", "1", "--corruptions", "3", "--seed", "1"]) == 0


def test_an_ingest_that_waits_for_another_build_says_so(tmp_path):
    """Another holder of the document's exclusive lock (a process building its DocCache): the
    ingest says once that it waits, then goes on; with the lock free it says nothing. Quiet
    (``show_progress`` off), the line is only logged."""
    import fcntl
    import os
    import threading

    short = DOC[:500]  # a quick prefill
    with _qa(tmp_path) as qa:
        assert qa.doc_cache is not None and qa.doc_cache.notice is None  # quiet
        said: list[str] = []
        qa.doc_cache.notice = said.append
        qa.forget(qa.ingest(short + " Postscript."))  # the lock is free: no word
        assert said == []
        ids = qa.codec.qa_prompt(short, "").doc_ids
        holder = os.open(qa.doc_cache.store.lock_path(qa.doc_cache.doc_id(ids)), os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: as another process's
        released = threading.Lock()

        def release() -> None:  # the other build ends (without publishing)
            with released:
                nonlocal holder
                if holder >= 0:
                    os.close(holder)
                    holder = -1

        qa.doc_cache.notice = lambda line: (said.append(line), release())
        backstop = threading.Timer(10.0, release)  # without a notice the ingest would wait forever
        backstop.start()
        try:
            doc = qa.ingest(short)
        finally:
            backstop.cancel()
            release()
        assert doc.stats.doc_cache == "miss" and len(said) == 1, said
        assert "waiting for another process" in said[0] and doc.doc_id[:12] in said[0]


def test_a_build_beside_another_processes_build_ends_within_the_cache_limit(tmp_path, monkeypatch):
    """Another process publishes a DocCache while ours is built (after our eviction made room
    for ours alone): once ours is published, the least recently used one is evicted, so the
    store ends within --cache-limit (two concurrent builds used to leave it above for good)."""
    short = DOC[:500]  # a quick prefill
    with _qa(tmp_path) as qa:
        qa.ingest(short)
        store = qa.doc_cache.store
        (info,) = store.list()
        assert store.remove(info.doc_id)
    limit = int(1.5 * info.size_bytes)  # one DocCache fits, two do not
    with _qa(tmp_path, cache_limit_bytes=limit) as qa:
        store = qa.doc_cache.store
        real_builder = store.builder

        def builder_beside_another(doc_id: str, page_bytes: int):
            other = real_builder("f" * 32, page_bytes)  # the other process's build, published meanwhile
            other.write_pages(0, bytes(info.size_bytes // page_bytes * page_bytes))
            other.commit({"fingerprint": "another document"})
            return real_builder(doc_id, page_bytes)

        monkeypatch.setattr(store, "builder", builder_beside_another)
        doc = qa.ingest(short)
        assert doc.stats.doc_cache == "miss" and doc.stats.doc_cache_evicted == ["f" * 32]
        assert [i.doc_id for i in store.list()] == [doc.doc_id] and store.size_bytes() <= limit
