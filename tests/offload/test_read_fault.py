"""A fault on the read path mid-answer: one DISK read fails (EIO) or comes back short while a
question is being answered, through the store's ``PosixIO`` (the seam the DISK tier and the
DocCache store read through).

That answer ends with a ``StorageIOError`` naming the layer file and the page; the engine is
left as a clean run leaves it (the question's fork released, the read-ahead idle, no DISK
write pending, the same pages in use); the document's DocCache still verifies and a new
``LongDocQA`` gets a "hit"; and the next question on the same object gives the clean answer.
"""
from __future__ import annotations

import errno
import functools
import os
import re
import threading
from pathlib import Path

import pytest

from offload import LongDocQA, RuntimeConfig
from planner.profile import HardwareProfile
from storage import StorageIOError, Tier
from storage.aligned import DISK_ALIGNMENT
from storage.disk_store import PosixIO

QUESTION = "What is the essay about?"
MAX_NEW = 8
FAULT_STEP = 3  # the decode step whose first DISK read fails (tokens 1-3 are out by then)
# Pages of 32 tokens, fp32 KV of 3 KV heads: 48 KiB. The DEVICE budgets hold the tails, the
# fork's copies and a few document pages per layer; the rest goes to DISK (there is no HOST).
DEVICE_PAGES = {"random": 21, "smollm2": 320}  # 2 and 30 layers
SYNTHETIC_DOC = " ".join(f"Entry {i}: the archive holds {i * 37 % 101} letters from {1900 + i % 90}." for i in range(20))
PROFILE = HardwareProfile.preset("cpu-2core")  # the planner's prices: no profile measured per cache dir


def _make_qa(kind: str, cache: Path) -> LongDocQA:
    config = RuntimeConfig(device="cpu", device_memory_bytes=DEVICE_PAGES[kind] * 48 * 2**10,
                           disk_space_bytes=256 * 2**20, profile=PROFILE)
    if kind == "random":  # SmolLM2's shape with 2 layers of random weights: the same paths, fast
        return LongDocQA("smollm2-135m", config=config, cache_dir=cache, random_weights=True, num_layers=2)
    return LongDocQA("smollm2-135m", config=config, cache_dir=cache)


class _OneShotReadFault:
    """Stands in for the store's ``PosixIO.preadv``: once ``armed``, the next read of a
    DISK-tier layer file (under ``root``) fails with EIO, or reads only part of its bytes
    and returns that count (a short read); every other read goes through unchanged."""

    def __init__(self, io: PosixIO, root: Path, *, short: bool) -> None:
        self._preadv = io.preadv
        self.root = root
        self.short = short
        self.armed = False
        self.hits: list[tuple[str, int]] = []  # (path, offset) of the faulted read
        self._lock = threading.Lock()  # the store's reader threads call preadv concurrently

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        with self._lock:
            fire = self.armed and Path(path).parent == self.root
            if fire:
                self.armed = False
                self.hits.append((path, offset))
        if not fire:
            return self._preadv(fd, buffers, offset)
        if not self.short:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = memoryview(buffers[0])
        part = max(DISK_ALIGNMENT, view.nbytes // 2 // DISK_ALIGNMENT * DISK_ALIGNMENT)
        assert part < view.nbytes
        with view[:part] as first:  # the rest of the buffer keeps whatever it held
            return self._preadv(fd, [first], offset)


@pytest.fixture(scope="module", params=["random", pytest.param("smollm2", marks=pytest.mark.slow)])
def spilled(request, tmp_path_factory):
    """A LongDocQA whose document pages are mostly on DISK: (make a new one, it, the document,
    its Doc, the clean answer). "random": 2 layers of random weights (default run);
    "smollm2": SmolLM2-135M over an essay (slow: about a minute on 2 cores)."""
    kind = request.param
    if kind == "random":
        cache, document = tmp_path_factory.mktemp("read-fault"), SYNTHETIC_DOC
    else:
        request.getfixturevalue("smollm2_source")
        cache, document = request.getfixturevalue("cache_dir"), request.getfixturevalue("essays_text")[:3000]
    make = functools.partial(_make_qa, kind, cache)
    qa = make()
    doc = qa.ingest(document)
    clean = qa.ask(doc, QUESTION, max_new_tokens=MAX_NEW)
    yield make, qa, document, doc, clean
    qa.close()


def _answer_with_a_fault(qa: LongDocQA, doc, monkeypatch, *, short: bool):
    """Ask with a one-shot fault armed at decode step ``FAULT_STEP``; returns the fault, the
    decode steps run, the stream, the pieces shown and the error the answer ended with."""
    engine = qa.engine
    fault = _OneShotReadFault(engine.disk.io, engine.disk.root, short=short)
    monkeypatch.setattr(engine.disk.io, "preadv", fault.preadv)
    real_step, steps = engine.decode_step, []

    def step(seq, token, **kw):
        steps.append(token)
        if len(steps) == FAULT_STEP:
            fault.armed = True
        return real_step(seq, token, **kw)

    monkeypatch.setattr(engine, "decode_step", step)
    stream = qa.ask_stream(doc, QUESTION, max_new_tokens=MAX_NEW)
    pieces: list[str] = []
    with pytest.raises(StorageIOError) as failure:
        for piece in stream:
            pieces.append(piece)
    monkeypatch.undo()
    return fault, steps, stream, pieces, failure.value


@pytest.mark.parametrize("short", [False, True], ids=["eio", "short-read"])
def test_read_fault_mid_answer_fails_that_answer_cleanly_and_the_next_one_works(spilled, monkeypatch, short):
    make, qa, document, doc, clean = spilled
    engine = qa.engine
    assert engine.disk is not None and engine.kv.readahead is not None
    layers = engine.model_config.num_layers
    assert any(Tier.DISK in doc._seq.table.tiers(layer) for layer in range(layers))  # every step reads DISK
    assert clean.stats.generated_tokens > FAULT_STEP + 1  # the fault comes mid-answer
    device_used, disk_free = engine.arena.num_used, engine.kv.free_slots(Tier.DISK)

    fault, steps, stream, pieces, err = _answer_with_a_fault(qa, doc, monkeypatch, short=short)
    # The error names the layer file and the page the failed read was for.
    assert len(fault.hits) == 1 and len(steps) == FAULT_STEP and stream.answer is None
    ((path, offset),) = fault.hits
    page = offset // engine.disk.disk_page_bytes
    assert err.op == "read" and err.path == path and page in err.pages
    assert err.layer == int(Path(path).stem.removeprefix("layer_"))
    reason = r"short read \(got \d+ of \d+ bytes\)" if short else r"\[Errno 5\] Input/output error"
    named = re.fullmatch(rf"read of pages? ([\d, -]+) of layer {err.layer} from {re.escape(path)} failed: {reason}",
                         str(err))
    assert named is not None, str(err)
    assert clean.text.startswith("".join(pieces))  # what was shown before the fault was right

    # The engine is as a clean answer leaves it.
    assert engine.kv.readahead.idle
    assert not engine.kv.writes.pending
    assert engine.arena.num_used == device_used and engine.kv.free_slots(Tier.DISK) == disk_free
    # The document's DocCache is intact, the next question gets the clean answer ...
    assert qa.doc_cache is not None
    qa.doc_cache.store.verify(doc.doc_id)
    again = qa.ask(doc, QUESTION, max_new_tokens=MAX_NEW)
    assert again.token_ids == clean.token_ids and again.text == clean.text
    # ... and a new LongDocQA restores the document from it.
    with make() as fresh:
        restored = fresh.ingest(document)
        assert restored.stats.doc_cache == "hit"
        assert fresh.ask(restored, QUESTION, max_new_tokens=MAX_NEW).token_ids == clean.token_ids
