"""``RuntimeConfig(kv_format="4bit")`` through the engine and the API: the values a 4-bit run
attends do not depend on where its pages live (greedy tokens identical over every placement),
a DocCache hit answers as a fresh 4-bit ingest does, a DocCache of one format is never served
to the other, the bytes read are the packed pages', and answers stay close to exact mode's."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from offload.api import LongDocQA
from offload.config import KVFormat, RuntimeConfig
from offload.engine import Engine
from offload.errors import InputError
from offload.kv.placement import Placement
from planner.profile import HardwareProfile
from storage import Tier

PROFILE = HardwareProfile.preset("cpu-2core")
# 300 tokens: 9 full pages, 1-6 packed; 36 decode steps pack page 7 of every global layer.
PROMPT, NEW = 300, 36
PLACEMENTS = {
    "all-device": None,
    "all-host": Placement.all_on(Tier.HOST),
    "all-disk": Placement.all_on(Tier.DISK),
    "mixed": Placement(device_pages=3, host_pages=2),
}


def _engine(source, tmp_path: Path, fmt: str, placement: Placement | None, **kw) -> Engine:
    return Engine(source, RuntimeConfig(device="cpu", kv_format=fmt, placement=placement, host_memory_bytes=64 * 2**20,
                                        kv_dir=str(tmp_path), staging_chunk_pages=4, **kw))


def _run(engine: Engine, ids: list[int], force: list[int] | None = None) -> tuple[list[int], list[torch.Tensor]]:
    """NEW decode steps after the prompt: each step's argmax and logits, the next token being
    the argmax or, teacher-forced, ``force``'s."""
    seq = engine.new_sequence()
    try:
        logits = engine.prefill(seq, ids)
        top, rows = [], []
        for i in range(NEW):
            rows.append(logits[-1])
            top.append(int(logits[-1].argmax()))
            logits = engine.decode_step(seq, force[i] if force is not None else top[-1])
        return top, rows
    finally:
        engine.release(seq)


@pytest.fixture(scope="module")
def exact_run(smollm2_source, essay_prompt, tmp_path_factory):
    engine = _engine(smollm2_source, tmp_path_factory.mktemp("exact"), "exact", None)
    try:
        return _run(engine, essay_prompt(PROMPT))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def q4_device_run(smollm2_source, essay_prompt, tmp_path_factory, exact_run):
    """Teacher-forced on exact mode's greedy tokens."""
    engine = _engine(smollm2_source, tmp_path_factory.mktemp("q4"), "4bit", None)
    try:
        tokens, rows = _run(engine, essay_prompt(PROMPT), exact_run[0])
        return tokens, rows, engine.kv.io.bytes_read[Tier.DEVICE]
    finally:
        engine.close()


# The real-model runs are `slow` (their fixtures take ~30 s from a cold cache): the default run
# checks placement independence on the paged KV against a float64 oracle (test_packed_kv.py)
# and the engine over HOST and DISK through the DocCache test below.
@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PLACEMENTS if n != "all-device"])
def test_tokens_do_not_depend_on_where_4bit_pages_live(smollm2_source, essay_prompt, tmp_path, exact_run,
                                                        q4_device_run, name):
    engine = _engine(smollm2_source, tmp_path, "4bit", PLACEMENTS[name])
    try:
        tokens, rows = _run(engine, essay_prompt(PROMPT), exact_run[0])
        io = engine.kv.io
        if name != "all-host":
            assert io.bytes_read[Tier.DISK] > 0 and engine.disk.disk_page_bytes == 8192  # a packed page per slot
    finally:
        engine.close()
    assert tokens == q4_device_run[0]
    for a, b in zip(rows, q4_device_run[1]):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)  # merge order differs by placement


@pytest.mark.slow
def test_4bit_stays_close_to_exact(exact_run, q4_device_run):
    """Teacher-forced top-1 agreement with exact mode over the decode steps (the issue's bar
    is 96% at 8K over essays, measured by bench/fidelity.py; 1K here keeps it quick)."""
    exact_top, _ = exact_run
    top, _, device_bytes = q4_device_run
    agree = sum(a == b for a, b in zip(top, exact_top)) / NEW
    assert agree >= 0.9, f"top-1 agreement {agree:.3f}"
    assert device_bytes > 0


def test_bad_kv_format_is_refused():
    with pytest.raises(InputError, match="kv_format must be one of exact, 4bit"):
        RuntimeConfig(kv_format="int4")
    assert RuntimeConfig(kv_format="4bit").kv_format == KVFormat.Q4


def _qa(cache: Path, fmt: str, **kw) -> LongDocQA:
    # HOST: the DISK staging area (4 chunks of 8 exact pages' bytes: 48 packed pages each; and
    # 8 MiB of writes) and a few pages more, so the document spills to DISK in both formats
    # (4-bit DEVICE: 20 exact pages, 22 packed).
    host, device = (12, 2) if fmt == "exact" else (9.8, 1.1)
    config = RuntimeConfig(device="cpu", device_memory_bytes=int(device * 2**20), host_memory_bytes=int(host * 2**20),
                           staging_chunk_pages=8, kv_dir=str(cache / "kv"), profile=PROFILE, kv_format=fmt)
    return LongDocQA("smollm2-135m", config=config, cache_dir=cache, random_weights=True, num_layers=2, **kw)


DOC = " ".join(f"line {i}: the quick brown fox number {i * 7 % 13} jumps." for i in range(60))
QUESTION = "Which number jumps?"


def _records(qa: LongDocQA, doc) -> list[bytes]:
    """Every layer's pages as a 4-bit DocCache stores them (blobs and exact pages), read from
    the sequence wherever they live."""
    assert qa.doc_cache is not None
    return [bytes(qa.doc_cache._records_4bit(doc._seq, layer)) for layer in range(qa.engine.model_config.num_layers)]


def test_4bit_doc_cache_hit_answers_like_a_fresh_ingest(tmp_path):
    def ask(qa: LongDocQA, doc) -> list[int]:
        return qa.ask(doc, QUESTION, max_new_tokens=8).token_ids

    with _qa(tmp_path, "4bit", doc_cache=False) as qa:
        fresh = ask(qa, qa.ingest(DOC))
    with _qa(tmp_path, "exact") as qa:  # an exact DocCache of the same document
        assert qa.ingest(DOC).stats.doc_cache == "miss"
    with _qa(tmp_path, "4bit") as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "miss"  # the exact one is not served to a 4-bit engine
        prefilled = _records(qa, doc)
        assert ask(qa, doc) == fresh
    with _qa(tmp_path, "4bit") as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "hit" and doc.stats.peak_bytes["disk"] > 0
        assert _records(qa, doc) == prefilled  # every blob and exact page, bit for bit
        assert ask(qa, doc) == fresh
    with _qa(tmp_path, "exact") as qa:  # and the exact one is still there for an exact engine
        assert qa.ingest(DOC).stats.doc_cache == "hit"
        assert qa.doc_cache is not None
        docs = {d.meta["kv_format"]: d for d in qa.doc_cache.store.list()}
    # The 4-bit DocCache keeps a packed page as its blob: per layer, pages 1 .. T // 32 - 3 are
    # packed (7680 bytes: 2 x 3 heads x 32 tokens x 64 channels / 2 + scales), the sink page,
    # the 2-page window and the tail exact (49152 bytes, 7 records of 7680).
    tokens = docs["4bit"].meta["num_tokens"]
    packed = tokens // 32 - 2 - 1
    records = packed + 7 * (-(-tokens // 32) - packed)
    files = [f.stat().st_size for f in sorted(docs["4bit"].path.glob("layer_*.kv"))]
    assert files == [records * 7680] * 2
    exact_files = [f.stat().st_size for f in sorted(docs["exact"].path.glob("layer_*.kv"))]
    assert exact_files == [-(-tokens // 32) * 49152] * 2
    assert sum(files) < 0.3 * sum(exact_files)


@pytest.mark.slow  # (Gemma 3's shape: a 4-bit DocCache beside sliding rings, which stay exact)
def test_4bit_doc_cache_of_a_model_with_sliding_rings_answers_like_a_fresh_ingest(tmp_path):
    config = RuntimeConfig(device="cpu", device_memory_bytes=12 * 2**20, host_memory_bytes=12 * 2**20,
                           staging_chunk_pages=8, kv_dir=str(tmp_path / "kv"), profile=PROFILE, kv_format="4bit")

    def qa(**kw) -> LongDocQA:
        return LongDocQA("gemma3-270m", config=config, cache_dir=tmp_path, random_weights=True, num_layers=6, **kw)

    with qa(doc_cache=False) as q:
        doc = q.ingest(DOC)
        assert doc.num_tokens > 2 * 512  # past the sliding window: the rings have dropped pages
        fresh = q.ask(doc, QUESTION, max_new_tokens=8).token_ids
    stored = []
    for status in ("miss", "hit"):
        with qa() as q:
            doc = q.ingest(DOC)
            assert doc.stats.doc_cache == status
            stored.append(_records(q, doc))
            assert q.ask(doc, QUESTION, max_new_tokens=8).token_ids == fresh
    assert stored[0] == stored[1]  # every packed blob and exact page restored bit for bit


def test_4bit_with_no_device_room_for_packed_pages(tmp_path):
    """A DEVICE budget that holds only the exact pages (two sequences' worth): every packed
    page goes to HOST or DISK, and a question whose tokens open no new page is not planned
    (a plan of no pages was refused by the planner)."""
    exact_pages = 2 * 2 * 5  # two sequences x 2 layers x (sink, 2-page window, tail, one being packed)
    config = RuntimeConfig(device="cpu", device_memory_bytes=exact_pages * 49152 + 1000,
                           host_memory_bytes=int(9.8 * 2**20), staging_chunk_pages=8, kv_dir=str(tmp_path / "kv"),
                           profile=PROFILE, kv_format="4bit")
    with LongDocQA("smollm2-135m", config=config, cache_dir=tmp_path, random_weights=True, num_layers=2,
                   doc_cache=False) as qa:
        assert Tier.DEVICE not in qa.engine.kv.packed.arenas
        # A staging chunk holds 8 exact pages' DISK bytes: 48 packed pages of an 8 KiB slot.
        assert qa.engine.kv.readahead.chunk_pages == 8 * 49152 // 8192
        doc = qa.ingest(DOC)
        assert qa.ask(doc, "Which?", max_new_tokens=4).token_ids
        assert doc.stats.peak_bytes["disk"] > 0
