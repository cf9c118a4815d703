"""ReadAhead over a real DiskExtentStore: chunks come back with their own bytes, and a failed or
refused read is raised by its chunk's take and leaves every staging buffer free (no read
going on into a buffer, none lost), so the next plan reads right."""
from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from offload.kv.readahead import Chunk, Extent, ReadAhead
from storage import StorageIOError
from storage.aligned import AlignedBuffer
from storage.disk_store import DiskExtentStore, PosixIO

PAGE_BYTES = 4096
WRITTEN_PAGES = 16
NUM_BUFFERS = 2
CHUNK_PAGES = 4


class _FailOneRead(PosixIO):
    """Fails one ``preadv`` (EIO): the first at ``fail_at`` (file name, offset), once set."""

    fail_at: tuple[str, int] | None = None

    def preadv(self, fd, buffers, offset):
        if self.fail_at is not None and self.fail_at == (os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset):
            self.fail_at = None
            raise OSError(errno.EIO, "Input/output error")
        return super().preadv(fd, buffers, offset)


def _fill(layer: int, page: int) -> int:
    return (layer * WRITTEN_PAGES + page) % 251 + 1


@pytest.fixture
def store(tmp_path):
    io = _FailOneRead()
    s = DiskExtentStore(tmp_path / "disk", num_layers=2, page_bytes=PAGE_BYTES, num_threads=2, io=io)
    with AlignedBuffer(WRITTEN_PAGES * PAGE_BYTES) as buf:
        for layer in range(2):
            buf.numpy()[:] = np.repeat([_fill(layer, p) for p in range(WRITTEN_PAGES)], PAGE_BYTES).astype(np.uint8)
            view = buf.memoryview()
            s.submit_write(layer, 0, view, WRITTEN_PAGES).wait()
            view.release()
    yield s
    s.close()


def _readahead(store) -> ReadAhead:
    return ReadAhead(store, num_buffers=NUM_BUFFERS, chunk_pages=CHUNK_PAGES, split=2)


def _take_and_check(ra: ReadAhead, c: Chunk) -> None:
    buf, _ = ra.take(c)
    got = buf.numpy()[: c.num_pages * PAGE_BYTES].reshape(c.num_pages, PAGE_BYTES)
    want = [_fill(c.layer, e.disk_slot + i) for e in c.extents for i in range(e.num_pages)]
    assert (got == np.asarray(want, dtype=np.uint8)[:, None]).all()
    del got
    ra.give_back(buf)


GOOD = [Chunk.run(0, 0, 0, 4), Chunk.run(0, 4, 4, 4), Chunk.run(1, 0, 0, 4), Chunk.run(1, 8, 8, 3)]


def test_planned_chunks_come_back_with_their_bytes(store):
    ra = _readahead(store)
    for _ in range(3):
        ra.plan(GOOD)
        for c in GOOD:
            _take_and_check(ra, c)
        assert ra.idle and ra.unplanned == 0


def test_a_chunk_of_scattered_extents_comes_back_in_extent_order(store):
    """A sparse set's scattered pages share one chunk: each extent lands after the previous
    one in the buffer, from its own file position, read ahead and on demand alike."""
    ra = _readahead(store)
    scattered = Chunk(0, (Extent(3, 9, 1), Extent(5, 2, 2), Extent(11, 14, 1)))
    assert scattered.num_pages == 4 and scattered.page_ids == [3, 5, 6, 11]
    ra.plan([GOOD[0], scattered, GOOD[2]])
    for c in (GOOD[0], scattered, GOOD[2]):
        _take_and_check(ra, c)
    assert ra.idle and ra.unplanned == 0
    buf, _ = ra.read_now(scattered)
    got = buf.numpy()[: 4 * PAGE_BYTES].reshape(4, PAGE_BYTES)[:, 0].tolist()
    assert got == [_fill(0, 9), _fill(0, 2), _fill(0, 3), _fill(0, 14)]
    del got
    ra.give_back(buf)


def test_scattered_extents_are_read_as_split_tasks_not_one_per_extent(store):
    """A chunk of scattered single pages is ``split`` store tasks of about equal pages (an
    extent longer than a task's room continues in the next); one extent keeps its pieces of
    ``piece_pages``; either way every page is read once, into its own buffer place."""
    ra = ReadAhead(store, num_buffers=1, chunk_pages=8, split=3)
    scattered = Chunk(0, (Extent(1, 1, 1), Extent(4, 4, 1), Extent(6, 6, 3), Extent(12, 12, 1), Extent(15, 15, 1)))
    assert ra.pieces(scattered) == [(0, ((1, 1), (4, 1), (6, 1))), (3, ((7, 2), (12, 1))), (6, ((15, 1),))]
    assert ra.pieces(Chunk.run(0, 2, 2, 7)) == [(0, ((2, 3),)), (3, ((5, 3),)), (6, ((8, 1),))]
    ra.plan([scattered])
    _take_and_check(ra, scattered)
    assert ra.idle


def test_a_failed_read_is_raised_by_its_take_and_leaves_every_buffer_free(store):
    ra = _readahead(store)
    store.io.fail_at = ("layer_001.kv", 0)  # the first piece of GOOD[2]: layer 1, pages 0-1
    ra.plan(GOOD)
    _take_and_check(ra, GOOD[0])
    _take_and_check(ra, GOOD[1])
    with pytest.raises(StorageIOError, match=r"read of pages 0-1 of layer 1 from .*layer_001\.kv failed: "
                                             r"\[Errno 5\] Input/output error"):
        ra.take(GOOD[2])
    assert store.io.fail_at is None
    assert ra.idle  # the plan dropped, the reads in flight waited for, both buffers back
    ra.plan(GOOD)  # and the next plan reads right
    for c in GOOD:
        _take_and_check(ra, c)
    assert ra.idle


def test_a_refused_read_is_raised_by_its_take_and_loses_no_buffer(store):
    """Pages never written: the store refuses the submission itself. Planning it raises
    nothing; its take raises the store's error; no buffer is lost, so every later plan, more
    rounds than there are buffers, still reads right."""
    ra = _readahead(store)
    never = Chunk.run(0, WRITTEN_PAGES + 2, WRITTEN_PAGES + 2, 4)
    for _ in range(NUM_BUFFERS + 1):
        ra.plan([GOOD[0], never, GOOD[2]])
        _take_and_check(ra, GOOD[0])
        with pytest.raises(ValueError, match="never written"):
            ra.take(never)
        assert ra.idle
        ra.plan([never, GOOD[3]])
        ra.plan(GOOD)  # the refused chunk in flight is settled by the reset, not raised
        for c in GOOD:
            _take_and_check(ra, c)
        assert ra.idle


def test_a_buffer_given_back_twice_is_caught(store):
    ra = _readahead(store)
    ra.plan(GOOD[:1])
    buf, _ = ra.take(GOOD[0])
    ra.give_back(buf)
    with pytest.raises(AssertionError, match="given back twice"):
        ra.give_back(buf)
