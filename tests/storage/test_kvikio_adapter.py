"""KvikioIO's adapter logic (storage/kvikio_io.py) on any machine: a stand-in ``kvikio``
module whose CuFile reads and writes with os.pread/os.pwrite checks how the adapter opens,
splits, offsets, falls back and reports errors. The real KvikIO runs the same storage tests
on a GPU machine (tests/storage/conftest.py's ``kvikio`` backend, marked ``gpu``)."""
from __future__ import annotations

import errno
import os
import sys
import types

import numpy as np
import pytest

from storage.disk_store import DiskExtentStore, PosixIO
from storage.doc_store import DocStore
from storage.kvikio_io import KVIKIO_THREADS, KvikioIO, make_io


class _Future:
    def __init__(self, n: int) -> None:
        self.n = n

    def get(self) -> int:
        return self.n


class _CuFile:
    """os-backed stand-in: opens ``path`` itself, as KvikIO does."""

    opened: list[tuple[str, str]] = []
    fail_open: set[str] = set()
    fail_io = False

    def __init__(self, path: str, flags: str = "r") -> None:
        if path in self.fail_open:
            raise RuntimeError("cuFile refused the file")
        self.fd = os.open(path, os.O_RDONLY if flags == "r" else os.O_RDWR)
        self.opened.append((path, flags))

    def pread(self, buf: np.ndarray, size: int, file_offset: int = 0) -> _Future:
        if self.fail_io:
            raise RuntimeError("KvikIO failure at posix_io.hpp: pread returned -1")
        data = os.pread(self.fd, size, file_offset)
        buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return _Future(len(data))

    def pwrite(self, buf: np.ndarray, size: int, file_offset: int = 0) -> _Future:
        return _Future(os.pwrite(self.fd, buf[:size].tobytes(), file_offset))

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def fake_kvikio(monkeypatch):
    mod = types.ModuleType("kvikio")
    defaults = types.ModuleType("kvikio.defaults")
    settings: dict = {"compat_mode": 1}
    defaults.set = lambda key, value: settings.__setitem__(key, value)
    defaults.get = settings.__getitem__
    mod.CuFile, mod.defaults = _CuFile, defaults
    monkeypatch.setitem(sys.modules, "kvikio", mod)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", defaults)
    _CuFile.opened, _CuFile.fail_open, _CuFile.fail_io = [], set(), False
    return settings


def test_asks_for_direct_io_and_serves_the_disk_store(tmp_path, fake_kvikio, monkeypatch):
    monkeypatch.delenv("KVIKIO_NTHREADS", raising=False)
    io = KvikioIO()
    assert fake_kvikio["auto_direct_io_read"] is True and fake_kvikio["auto_direct_io_write"] is True
    assert fake_kvikio["num_threads"] == KVIKIO_THREADS == io.num_threads  # not KvikIO's default of one
    rng = np.random.default_rng(0)
    with DiskExtentStore(tmp_path / "kv", num_layers=2, page_bytes=5000, io=io) as store:
        assert store.backend == "kvikio"
        from storage import AlignedBuffer

        src = AlignedBuffer(3 * store.disk_page_bytes)
        src.memoryview()[:] = rng.integers(0, 256, src.nbytes, dtype=np.uint8).tobytes()
        store.submit_write(1, 4, src.memoryview(), 3).wait()
        dst = AlignedBuffer(2 * store.disk_page_bytes)
        store.submit_read(1, 5, 2, dst.memoryview()).wait()
        assert bytes(dst.memoryview()) == bytes(src.memoryview()[store.disk_page_bytes:])
    assert {p for p, _ in _CuFile.opened} >= {str(tmp_path / "kv" / "layer_001.kv")}
    assert io._files == {}  # every CuFile closed with its fd


def test_doc_store_round_trip_and_read_only_opens(tmp_path, fake_kvikio):
    store = DocStore(tmp_path, io=KvikioIO())
    b = store.builder("d", 4096)
    pages = bytes(range(256)) * 16 * 3
    b.write_pages(0, pages[:8192])
    b.write_pages(0, pages[8192:])  # appended at the right offset
    b.commit({"fingerprint": "f"})
    with store.open("d", "f") as r:
        assert r.read_pages(0, 1, 2) == pages[4096:]
    assert ("r+" in {f for _, f in _CuFile.opened}) and ("r" in {f for _, f in _CuFile.opened})


def test_a_file_kvikio_refuses_goes_through_posix(tmp_path, fake_kvikio):
    io = KvikioIO()
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 8192)
    _CuFile.fail_open.add(str(path))
    fd = io.open(str(path), os.O_RDWR)
    buf = bytearray(4096)
    assert io.preadv(fd, [memoryview(buf)], 4096) == 4096 and buf == b"x" * 4096
    io.close(fd)
    assert io.fallbacks == 1


def test_kvikio_errors_surface_as_os_errors(tmp_path, fake_kvikio):
    io = KvikioIO()
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 8192)
    fd = io.open(str(path), os.O_RDONLY)
    _CuFile.fail_io = True
    with pytest.raises(OSError) as e:
        io.preadv(fd, [memoryview(bytearray(4096))], 0)
    assert e.value.errno == errno.EIO and "KvikIO read of 4096 bytes at offset 0 failed" in str(e.value)
    io.close(fd)


def test_short_read_at_end_of_file(tmp_path, fake_kvikio):
    io = KvikioIO()
    path = tmp_path / "f.bin"
    path.write_bytes(b"y" * 6000)
    fd = io.open(str(path), os.O_RDONLY)
    a, b = bytearray(4096), bytearray(4096)
    assert io.preadv(fd, [memoryview(a), memoryview(b)], 0) == 6000  # stops at the short piece
    assert b[:1904] == b"y" * 1904
    io.close(fd)


def test_kvikio_nthreads_from_the_environment_is_kept(fake_kvikio, monkeypatch):
    monkeypatch.setenv("KVIKIO_NTHREADS", "3")
    KvikioIO()
    assert "num_threads" not in fake_kvikio


def test_older_kvikio_settings_api(fake_kvikio, monkeypatch):
    """KvikIO before 25.x: ``defaults.compat_mode()`` and ``defaults.num_threads_reset(n)``
    instead of ``get``/``set``; no direct-I/O settings."""
    import kvikio.defaults as d

    calls: dict = {}
    monkeypatch.delattr(d, "get")
    monkeypatch.delattr(d, "set")
    monkeypatch.delenv("KVIKIO_NTHREADS", raising=False)
    d.compat_mode = lambda: True
    d.num_threads = lambda: calls.get("num_threads", 1)
    d.num_threads_reset = lambda n: calls.__setitem__("num_threads", n)
    io = KvikioIO()
    assert io.compat_mode is True and calls == {"num_threads": KVIKIO_THREADS} and io.num_threads == KVIKIO_THREADS


def test_auto_falls_back_to_posix_when_kvikio_cannot_start(fake_kvikio, monkeypatch):
    import storage.kvikio_io as kio

    def broken(self):
        raise AttributeError("module 'kvikio.defaults' has no attribute 'frobnicate'")

    monkeypatch.setattr(kio, "kvikio_status", lambda: None)  # as on a GPU machine with kvikio installed
    monkeypatch.setattr(kio.KvikioIO, "__init__", broken)
    io = make_io("auto")
    assert type(io) is PosixIO
    with pytest.raises(ValueError, match="KvikIO failed to start .*frobnicate.*--disk-backend posix"):
        make_io("kvikio")
