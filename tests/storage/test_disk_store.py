"""storage.disk_store (+ aligned, errors): byte-exact extents, concurrency, injected faults."""
from __future__ import annotations

import errno
import mmap
import os
import pickle
import threading

import numpy as np
import pytest
import torch

from storage.aligned import AlignedBuffer, round_up
from storage.disk_store import MAX_IO_BYTES, DiskExtentStore, PosixIO
from storage.errors import StorageIOError, describe_pages

PAGE_BYTES = [49152, 3 * 1000]  # a 4 KiB multiple, and one padded to 4096-byte slots
NUM_PAGES = [1, 2, 7]
DIRECT = [None, False]  # auto (O_DIRECT here when the file system allows it), fadvise path
NUM_LAYERS = 5


@pytest.fixture
def make_store(tmp_path, io_backend):
    """(**kwargs) -> DiskExtentStore under tmp_path, on each I/O backend present (a test that
    injects faults passes its own ``io``); closed at teardown."""
    stores: list[DiskExtentStore] = []

    def make(**kwargs) -> DiskExtentStore:
        kwargs.setdefault("io", io_backend)
        kwargs.setdefault("num_layers", NUM_LAYERS)
        kwargs.setdefault("page_bytes", PAGE_BYTES[0])
        store = DiskExtentStore(tmp_path / "kv", **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _random_buffer(store: DiskExtentStore, num_pages: int, rng) -> AlignedBuffer:
    buf = AlignedBuffer(num_pages * store.disk_page_bytes)
    buf.numpy()[:] = rng.integers(0, 256, buf.nbytes, dtype=np.uint8)
    return buf


def _write(store, layer, first_page, buf, num_pages) -> None:
    store.submit_write(layer, first_page, buf.memoryview(), num_pages).wait()


def _read(store, layer, first_page, num_pages) -> AlignedBuffer:
    out = AlignedBuffer(num_pages * store.disk_page_bytes)
    result = store.submit_read(layer, first_page, num_pages, out.memoryview()).wait()
    assert result.nbytes == num_pages * store.disk_page_bytes and result.seconds >= 0
    return out


# -- fault-injecting system calls ----------------------------------------------------------

class FaultyIO(PosixIO):
    """Raises OSError(code) or returns a short count for the chosen op."""

    def __init__(self, op: str, *, code: int | None = None, short: bool = False,
                 after_bytes: int = 0) -> None:
        self.op, self.code, self.short, self.after_bytes = op, code, short, after_bytes
        self.armed = False  # so the O_DIRECT probe in the constructor is unaffected

    def _maybe_fail(self, op: str, buffers, offset: int, call):
        if not self.armed or op != self.op or offset < self.after_bytes:
            return call()
        if self.code is not None:
            raise OSError(self.code, os.strerror(self.code))
        call()
        return sum(memoryview(b).nbytes for b in buffers) - 4096  # short by one block

    def preadv(self, fd, buffers, offset):
        return self._maybe_fail("read", buffers, offset,
                                lambda: super(FaultyIO, self).preadv(fd, buffers, offset))

    def pwritev(self, fd, buffers, offset):
        return self._maybe_fail("write", buffers, offset,
                                lambda: super(FaultyIO, self).pwritev(fd, buffers, offset))


class GatedIO(PosixIO):
    """Every write blocks until ``gate`` is set."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.armed = False

    def pwritev(self, fd, buffers, offset):
        if self.armed:
            assert self.gate.wait(10), "test gate never opened"
        return super().pwritev(fd, buffers, offset)


class RecordingIO(PosixIO):
    """Records (call, offset, length) of every preadv/pwritev/fadvise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.lock = threading.Lock()

    def _note(self, name, offset, length):
        with self.lock:
            self.calls.append((name, offset, length))

    def preadv(self, fd, buffers, offset):
        self._note("preadv", offset, sum(memoryview(b).nbytes for b in buffers))
        return super().preadv(fd, buffers, offset)

    def pwritev(self, fd, buffers, offset):
        self._note("pwritev", offset, sum(memoryview(b).nbytes for b in buffers))
        return super().pwritev(fd, buffers, offset)

    def fadvise(self, fd, offset, length, advice):
        assert advice == os.POSIX_FADV_DONTNEED
        self._note("fadvise", offset, length)
        super().fadvise(fd, offset, length, advice)


class NoDirectIO(PosixIO):
    """A file system that refuses O_DIRECT at open, as tmpfs did before Linux 6.6."""

    def open(self, path, flags, mode=0o644):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return super().open(path, flags, mode)


# -- round trips ---------------------------------------------------------------------------

@pytest.mark.parametrize("direct", DIRECT, ids=["auto", "fadvise"])
@pytest.mark.parametrize("num_pages", NUM_PAGES)
@pytest.mark.parametrize("page_bytes", PAGE_BYTES)
def test_round_trip_is_byte_exact(make_store, rng, page_bytes, num_pages, direct):
    store = make_store(page_bytes=page_bytes, direct=direct)
    assert store.disk_page_bytes == round_up(page_bytes, 4096)
    with _random_buffer(store, num_pages, rng) as src:
        _write(store, 2, 3, src, num_pages)
        out = _read(store, 2, 3, num_pages)
        assert np.array_equal(out.numpy(), src.numpy())
        assert torch.equal(out.torch(), src.torch())


def test_page_lives_at_its_slot_offset_in_its_layer_file(make_store, rng):
    store = make_store(page_bytes=3000)
    src = _random_buffer(store, 2, rng)
    _write(store, 1, 5, src, 2)
    raw = store.paths[1].read_bytes()
    assert store.paths[1].name == "layer_001.kv"
    assert raw[5 * 4096:7 * 4096] == bytes(src.memoryview())
    assert all(p.stat().st_size == 0 for i, p in enumerate(store.paths) if i != 1)


def test_many_layers_and_extents_stay_separate(make_store, rng):
    store = make_store(page_bytes=3000)
    written = {}
    for layer in range(NUM_LAYERS):
        for first, n in [(0, 3), (3, 1), (9, 4)]:  # adjacent extents and a gap
            written[layer, first, n] = _random_buffer(store, n, rng)
            _write(store, layer, first, written[layer, first, n], n)
    for (layer, first, n), src in written.items():
        assert np.array_equal(_read(store, layer, first, n).numpy(), src.numpy())
    # one read across two extents that were written separately
    both = _read(store, 4, 0, 4).numpy()
    assert np.array_equal(both[:3 * 4096], written[4, 0, 3].numpy())
    assert np.array_equal(both[3 * 4096:], written[4, 3, 1].numpy())


def test_scattered_extents_read_as_one_task_land_one_after_another(make_store, rng):
    """``submit_read_extents``: each extent from its own file position, laid in ``out`` in the
    order given (not file order), one call per extent, one result for all."""
    io = RecordingIO()
    store = make_store(page_bytes=3000, io=io)
    src = _random_buffer(store, 12, rng)
    _write(store, 2, 0, src, 12)
    extents = ((9, 1), (2, 3), (0, 1), (11, 1))
    out = AlignedBuffer(6 * 4096)
    io.calls.clear()  # the O_DIRECT probe's and the write's
    handle = store.submit_read_extents(2, extents, out.memoryview())
    assert handle.wait().nbytes == 6 * 4096 and handle.num_pages == 6 and handle.extents == extents
    pages = src.numpy().reshape(12, 4096)
    assert np.array_equal(out.numpy().reshape(6, 4096), pages[[9, 2, 3, 4, 0, 11]])
    assert [c[1:] for c in io.calls if c[0] == "preadv"] == [(9 * 4096, 4096), (2 * 4096, 3 * 4096),
                                                            (0, 4096), (11 * 4096, 4096)]
    assert repr(handle) == "TransferHandle(read pages 0, 2-4, 9, 11 of layer 2, done)"
    with pytest.raises(ValueError, match="cannot read page 12 of layer 2: never written"):
        store.submit_read_extents(2, ((1, 1), (12, 1)), AlignedBuffer(2 * 4096).memoryview())
    with pytest.raises(ValueError, match="num_pages must be >= 1"):
        store.submit_read_extents(2, ((1, 1), (3, 0)), AlignedBuffer(4096).memoryview())
    with pytest.raises(ValueError, match="buffer length is 8192 bytes, expected 12288"):
        store.submit_read_extents(2, ((1, 1), (3, 2)), AlignedBuffer(2 * 4096).memoryview())
    with pytest.raises(ValueError, match="at least one extent"):
        store.submit_read_extents(2, (), AlignedBuffer(4096).memoryview())


def test_an_error_in_a_later_extent_names_its_pages(make_store, rng):
    io = FaultyIO("read", code=errno.EIO, after_bytes=2 * 4096)
    store = make_store(page_bytes=3000, io=io)
    _write(store, 0, 0, _random_buffer(store, 10, rng), 10)
    io.armed = True
    handle = store.submit_read_extents(0, ((1, 2), (7, 1)), AlignedBuffer(3 * 4096).memoryview())
    with pytest.raises(StorageIOError, match="read of page 7 of layer 0"):
        handle.wait()


@pytest.mark.parametrize("direct", DIRECT, ids=["auto", "fadvise"])
def test_64_concurrent_writes_then_64_concurrent_reads(make_store, rng, direct):
    store = make_store(page_bytes=49152, num_threads=8, direct=direct)
    num = 64
    dpb = store.disk_page_bytes
    src = _random_buffer(store, num, rng)
    view = src.memoryview()
    # page i goes to layer i % 5, page id 2 * (i // 5) or one more: scattered, with gaps
    where = [(i % NUM_LAYERS, 2 * (i // NUM_LAYERS) + i % 2) for i in range(num)]
    assert len(set(where)) == num
    writes = [store.submit_write(layer, page, view[i * dpb:(i + 1) * dpb], 1)
              for i, (layer, page) in enumerate(where)]
    assert all(h.wait().nbytes == dpb for h in writes)
    out = AlignedBuffer(num * dpb)
    out_view = out.memoryview()
    reads = [store.submit_read(layer, page, 1, out_view[i * dpb:(i + 1) * dpb])
             for i, (layer, page) in enumerate(where)]
    for h in reads:
        h.wait()
    assert all(h.done() for h in reads)
    assert np.array_equal(out.numpy(), src.numpy())


def test_extent_over_8_mib_is_split_into_aligned_pieces(make_store, rng):
    io = RecordingIO()
    store = make_store(page_bytes=49152, io=io)
    num_pages = 200  # 9.4 MiB
    src = _random_buffer(store, num_pages, rng)
    io.calls.clear()
    _write(store, 0, 1, src, num_pages)
    out = _read(store, 0, 1, num_pages)
    assert np.array_equal(out.numpy(), src.numpy())
    base, total = 49152, num_pages * 49152
    expected = [(base, MAX_IO_BYTES), (base + MAX_IO_BYTES, total - MAX_IO_BYTES)]
    assert [c[1:] for c in io.calls if c[0] == "pwritev"] == expected
    assert [c[1:] for c in io.calls if c[0] == "preadv"] == expected
    assert all(off % 4096 == 0 and n % 4096 == 0 for _, off, n in io.calls)


# -- cold reads ------------------------------------------------------------------------------

def test_cold_read_mode_on_tmp_path(make_store):
    store = make_store()
    assert store.cold_read_mode in ("o_direct", "fadvise_dontneed")
    if store.cold_read_mode == "o_direct":
        assert make_store(direct=True).cold_read_mode == "o_direct"
    assert make_store(direct=False).cold_read_mode == "fadvise_dontneed"


@pytest.mark.parametrize("direct", DIRECT, ids=["auto", "fadvise"])
def test_fadvise_dontneed_around_every_io_only_in_buffered_mode(make_store, rng, direct):
    io = RecordingIO()
    store = make_store(page_bytes=3000, io=io, direct=direct)
    io.calls.clear()
    _write(store, 0, 2, _random_buffer(store, 3, rng), 3)
    _read(store, 0, 2, 3)
    if store.cold_read_mode == "o_direct":
        assert [c[0] for c in io.calls] == ["pwritev", "preadv"]
    else:
        extent = (2 * 4096, 3 * 4096)
        assert io.calls == [("pwritev", *extent), ("fadvise", *extent),
                            ("fadvise", *extent), ("preadv", *extent)]


def test_falls_back_when_file_system_refuses_o_direct(make_store, rng):
    store = make_store(page_bytes=3000, io=NoDirectIO())
    assert store.cold_read_mode == "fadvise_dontneed"
    src = _random_buffer(store, 2, rng)
    _write(store, 3, 0, src, 2)
    assert np.array_equal(_read(store, 3, 0, 2).numpy(), src.numpy())
    with pytest.raises(ValueError, match="O_DIRECT is not supported.*direct=None"):
        make_store(io=NoDirectIO(), direct=True)
    assert not list((store.root).glob(".o_direct_probe*"))


# -- bad input -------------------------------------------------------------------------------

def _misaligned(nbytes: int) -> memoryview:
    return AlignedBuffer(nbytes + 4096).memoryview()[1:1 + nbytes]


def _aligned(nbytes: int) -> memoryview:
    return AlignedBuffer(nbytes).memoryview()


def _too_long(nbytes: int) -> memoryview:
    return AlignedBuffer(nbytes + 4096).memoryview()


def _too_short(nbytes: int) -> memoryview:
    return AlignedBuffer(nbytes).memoryview()[:nbytes - 4096]


def _read_only(nbytes: int) -> memoryview:
    return AlignedBuffer(nbytes).memoryview().toreadonly()


BAD_SUBMITS = [  # (op, layer, first_page, num_pages, buffer factory(nbytes), match)
    ("write", 0, 0, 2, _misaligned, "not 4096-byte aligned"),
    ("read", 0, 0, 1, _misaligned, "not 4096-byte aligned"),
    ("write", 0, 0, 2, _too_long, "buffer length is .* expected"),
    ("read", 0, 0, 1, _too_short, "buffer length is .* expected"),
    ("read", 0, 0, 1, _read_only, "read-only"),
    ("write", NUM_LAYERS, 0, 1, _aligned, r"layer must be in \[0, 5\)"),
    ("read", -1, 0, 1, _aligned, "layer must be in"),
    ("write", 0, -1, 1, _aligned, "first_page must be >= 0"),
    ("write", 0, 0, 0, _aligned, "num_pages must be >= 1"),
]


@pytest.mark.parametrize("op,layer,first,num,make_buf,match", BAD_SUBMITS)
def test_bad_submit_is_rejected(make_store, rng, op, layer, first, num, make_buf, match):
    store = make_store()
    _write(store, 0, 0, _random_buffer(store, 2, rng), 2)
    buf = make_buf(max(num, 1) * store.disk_page_bytes)
    with pytest.raises(ValueError, match=match):
        if op == "write":
            store.submit_write(layer, first, buf, num)
        else:
            store.submit_read(layer, first, num, buf)


@pytest.mark.parametrize("kwargs,match", [({"num_layers": 0}, "num_layers must be >= 1"),
                                          ({"page_bytes": 0}, "page_bytes must be >= 1"),
                                          ({"num_threads": 0}, "num_threads must be >= 1")])
def test_bad_config_is_rejected(make_store, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_store(**kwargs)


def test_reading_never_written_pages_is_rejected_at_submit(make_store, rng):
    store = make_store(page_bytes=3000)
    _write(store, 1, 0, _random_buffer(store, 3, rng), 3)
    out = AlignedBuffer(4 * 4096)
    with pytest.raises(ValueError, match="cannot read page 3 of layer 1: never written"):
        store.submit_read(1, 0, 4, out.memoryview())
    with pytest.raises(ValueError, match="cannot read pages 0-3 of layer 2: never written"):
        store.submit_read(2, 0, 4, out.memoryview())
    assert store.is_written(1, 2) and not store.is_written(1, 3)


def test_a_page_is_readable_once_its_write_completed(make_store, rng):
    io = GatedIO()
    store = make_store(page_bytes=3000, io=io)
    io.armed = True
    src = _random_buffer(store, 1, rng)
    handle = store.submit_write(0, 0, src.memoryview(), 1)
    assert not handle.done()
    with pytest.raises(TimeoutError):
        handle.wait(timeout=0.01)
    with pytest.raises(ValueError, match="page 0 of layer 0: never written.*wait"):
        store.submit_read(0, 0, 1, AlignedBuffer(4096).memoryview())
    io.gate.set()
    handle.wait()
    assert np.array_equal(_read(store, 0, 0, 1).numpy(), src.numpy())


# -- injected faults -------------------------------------------------------------------------

FAULTS = [("read", errno.EIO), ("write", errno.EIO), ("write", errno.ENOSPC)]


def _submit(store, op, layer, first, src, num_pages=3):
    """Read pages into a fresh buffer, or write ``src``, as ``op`` says."""
    if op == "read":
        return store.submit_read(layer, first, num_pages, AlignedBuffer(num_pages * 4096).memoryview())
    return store.submit_write(layer, first, src.memoryview(), num_pages)


@pytest.mark.parametrize("op,code", FAULTS)
def test_os_error_surfaces_from_wait(make_store, rng, op, code):
    io = FaultyIO(op, code=code)
    store = make_store(page_bytes=3000, io=io)
    src = _random_buffer(store, 3, rng)
    _write(store, 2, 4, src, 3)
    io.armed = True
    handle = _submit(store, op, 2, 4, src)
    with pytest.raises(StorageIOError) as info:
        handle.wait()
    err = info.value
    path = str(store.paths[2])
    where = "from" if op == "read" else "to"
    assert str(err) == (f"{op} of pages 4-6 of layer 2 {where} {path} failed: "
                        f"[Errno {code}] {os.strerror(code)}")
    assert isinstance(err, OSError) and err.errno == code
    assert (err.op, err.path, err.layer, err.pages) == (op, path, 2, [4, 5, 6])
    assert isinstance(err.__cause__, OSError)
    if op == "write":  # the failed write's pages are no longer readable
        with pytest.raises(ValueError, match="pages 4-6 of layer 2: never written"):
            store.submit_read(2, 4, 3, AlignedBuffer(3 * 4096).memoryview())
    assert src.memoryview().nbytes  # the caller's buffer is intact
    src.close()  # and not pinned by the error the handle keeps


@pytest.mark.parametrize("op,text", [("read", "short read (got 8192 of 12288 bytes)"),
                                     ("write", "short write (wrote 8192 of 12288 bytes)")])
def test_short_transfer_surfaces_from_wait(make_store, rng, op, text):
    io = FaultyIO(op, short=True)
    store = make_store(page_bytes=3000, io=io)
    src = _random_buffer(store, 3, rng)
    _write(store, 0, 0, src, 3)
    io.armed = True
    handle = _submit(store, op, 0, 0, src)
    with pytest.raises(StorageIOError, match=rf"{op} of pages 0-2 of layer 0 .* failed: "
                                             + text.replace("(", r"\(").replace(")", r"\)")):
        handle.wait()


def test_error_in_second_piece_names_that_piece_s_pages(make_store, rng):
    io = FaultyIO("read", code=errno.EIO, after_bytes=MAX_IO_BYTES)
    store = make_store(page_bytes=49152, io=io)
    src = _random_buffer(store, 200, rng)
    _write(store, 0, 0, src, 200)
    io.armed = True
    handle = store.submit_read(0, 0, 200, AlignedBuffer(200 * 49152).memoryview())
    with pytest.raises(StorageIOError, match="read of pages 170-199 of layer 0"):
        handle.wait()
    assert store.bytes_read == MAX_IO_BYTES  # the first piece did arrive


# -- counters and lifetime -------------------------------------------------------------------

def test_byte_counters(make_store, rng):
    store = make_store(page_bytes=3000)
    assert (store.bytes_read, store.bytes_written) == (0, 0)
    _write(store, 0, 0, _random_buffer(store, 5, rng), 5)
    _write(store, 1, 0, _random_buffer(store, 2, rng), 2)
    for _ in range(3):
        _read(store, 0, 1, 4)
    assert store.bytes_written == 7 * 4096
    assert store.bytes_read == 12 * 4096


def test_close_waits_is_idempotent_and_keeps_handles(make_store, rng):
    io = GatedIO()
    store = make_store(page_bytes=3000, io=io)
    io.armed = True
    handles = [store.submit_write(0, p, _random_buffer(store, 1, rng).memoryview(), 1)
               for p in range(4)]
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(timeout=0.2)
    assert closer.is_alive() and not any(h.done() for h in handles)  # close() is waiting
    io.gate.set()
    closer.join(timeout=10)
    assert not closer.is_alive()
    assert all(h.done() and h.wait().nbytes == 4096 for h in handles)
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.submit_read(0, 0, 1, AlignedBuffer(4096).memoryview())


def test_context_manager_delete_and_reopen(tmp_path, rng):
    with DiskExtentStore(tmp_path / "kv", num_layers=2, page_bytes=3000) as store:
        _write(store, 0, 0, _random_buffer(store, 1, rng), 1)
    with pytest.raises(ValueError, match="closed"):
        store.submit_write(0, 0, AlignedBuffer(4096).memoryview(), 1)
    # a new store over the same files starts with nothing readable
    with DiskExtentStore(tmp_path / "kv", num_layers=2, page_bytes=3000) as again:
        with pytest.raises(ValueError, match="never written"):
            again.submit_read(0, 0, 1, AlignedBuffer(4096).memoryview())
        again.delete()
        again.delete()
    assert not list((tmp_path / "kv").iterdir())


# -- errors and aligned buffers --------------------------------------------------------------

def test_storage_io_error_pickles_and_describes_pages():
    err = StorageIOError("read", "/x/layer_003.kv", 3, list(range(12, 20)), None,
                         "short read (got 4096 of 393216 bytes)")
    assert str(err) == ("read of pages 12-19 of layer 3 from /x/layer_003.kv failed: "
                        "short read (got 4096 of 393216 bytes)")
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.pages, again.errno) == (str(err), err.pages, None)
    assert describe_pages([7]) == "page 7"
    assert describe_pages([9, 1, 2, 3, 7, 10]) == "pages 1-3, 7, 9-10"


BUFFER_SIZES = [(1, 4096), (4096, 4096), (5000, 4096), (3, 2 * 2**20)]  # (nbytes, alignment)


@pytest.mark.parametrize("nbytes,alignment", BUFFER_SIZES)
def test_aligned_buffer_views_share_memory(nbytes, alignment):
    with AlignedBuffer(nbytes, alignment) as buf:
        assert buf.nbytes == round_up(nbytes, alignment) and buf.address % alignment == 0
        arr, ten, view = buf.numpy(), buf.torch(), buf.memoryview()
        assert arr.dtype == np.uint8 and ten.dtype == torch.uint8 and view.nbytes == buf.nbytes
        assert not arr.any()
        view[0] = 7
        ten[-1] = 9
        assert arr[0] == 7 and arr[-1] == 9 and ten[0] == 7
        with pytest.raises(BufferError):  # a live view pins the memory
            buf.close()
        del arr, ten
        view.release()
    assert buf.closed
    buf.close()


def test_aligned_buffer_and_round_up_reject_bad_input():
    assert [round_up(n, 4096) for n in (0, 1, 4096, 4097)] == [0, 4096, 4096, 8192]
    with pytest.raises(ValueError, match="nbytes must be >= 1"):
        AlignedBuffer(0)
    with pytest.raises(ValueError, match="power of two"):
        AlignedBuffer(10, 3000)
    assert mmap.PAGESIZE % 4096 == 0 or 4096 % mmap.PAGESIZE == 0
