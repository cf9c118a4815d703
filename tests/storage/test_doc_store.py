"""DocStore: publish by rename, verification of every byte, crash leftovers, locks, eviction, ENOSPC."""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from storage.doc_store import (BUILD_PREFIX, CRASH_ENV, MANIFEST, DocCacheCorrupt, DocCacheNoSpace, DocReader,
                               DocStore)

PAGE = 512
FP = "fingerprint-1"


def _pages(layer: int, n: int) -> bytes:
    return bytes((layer * 31 + i) % 251 for i in range(n * PAGE))


def _build(store: DocStore, doc_id: str, layers: int = 3, pages: int = 5) -> Path:
    b = store.builder(doc_id, PAGE)
    for layer in range(layers):
        b.write_pages(layer, _pages(layer, pages))
    return b.commit({"fingerprint": FP, "layers": layers})


def test_roundtrip_and_page_checksums(tmp_path, io_backend):
    store = DocStore(tmp_path, io=io_backend)
    _build(store, "doc")
    with store.open("doc", FP) as r:
        assert r.num_pages(1) == 5
        assert r.read_pages(1, 2, 2) == _pages(1, 5)[2 * PAGE: 4 * PAGE]
        assert r.bytes_read == 2 * PAGE
    store.verify("doc")
    assert [i.doc_id for i in store.list()] == ["doc"]
    assert not list(tmp_path.glob(BUILD_PREFIX + "*"))


def test_every_single_byte_corruption_is_detected(tmp_path, io_backend):
    """One flipped byte anywhere in any file (pages or manifest) is caught by open or by the
    first read of that page; pages elsewhere still read."""
    store = DocStore(tmp_path, io=io_backend)
    folder = _build(store, "doc", layers=2, pages=3)
    files = sorted(p for p in folder.iterdir() if p.name != "last_used")
    for path in files:
        size = path.stat().st_size
        for offset in (0, size // 2, size - 1):
            data = bytearray(path.read_bytes())
            data[offset] ^= 0x01
            original = path.read_bytes()
            path.write_bytes(bytes(data))
            with pytest.raises(DocCacheCorrupt) as e:
                store.verify("doc")
            if path.name != MANIFEST:
                assert f"page {offset // PAGE}" in str(e.value) and path.name in str(e.value)
                with store.open("doc", FP) as r:  # other pages still read
                    other = (offset // PAGE + 1) % 3
                    r.read_pages(int(path.name[6:9]), other, 1)
            path.write_bytes(original)
    store.verify("doc")


def test_fingerprint_and_size_checked_on_open(tmp_path, io_backend):
    store = DocStore(tmp_path, io=io_backend)
    folder = _build(store, "doc")
    with pytest.raises(DocCacheCorrupt, match="fingerprint"):
        store.open("doc", "another model")
    with open(folder / "layer_000.kv", "ab") as f:
        f.write(b"x")
    with pytest.raises(DocCacheCorrupt, match="layer_000.kv has"):
        store.open("doc", FP)
    assert store.open("missing", FP) is None


def test_quarantine_and_gc(tmp_path, io_backend):
    store = DocStore(tmp_path, io=io_backend)
    _build(store, "doc")
    q = store.quarantine("doc")
    assert q is not None and not store.exists("doc") and store.open("doc", FP) is None
    assert q.name in store.clean_leftovers() and not q.exists()


class _Fail(DocStore):
    def __init__(self, root, phase, err):
        super().__init__(root)
        self.phase, self.err = phase, err

    def fault_hook(self, phase, path):
        if phase == self.phase:
            raise OSError(self.err, os.strerror(self.err), str(path))


@pytest.mark.parametrize("phase", ["write", "fsync", "manifest", "rename"])
def test_enospc_at_any_phase_removes_the_build_and_keeps_the_others(tmp_path, io_backend, phase):
    _build(DocStore(tmp_path, io=io_backend), "old")
    store = _Fail(tmp_path, phase, errno.ENOSPC)
    store.io = io_backend
    with pytest.raises(DocCacheNoSpace, match="no space left"):
        _build(store, "new")
    assert not store.exists("new") and not list(tmp_path.glob(BUILD_PREFIX + "*"))
    store.verify("old")


def test_other_write_errors_surface_and_clean_up(tmp_path):
    store = _Fail(tmp_path, "write", errno.EIO)
    with pytest.raises(OSError) as e:
        _build(store, "new")
    assert e.value.errno == errno.EIO and not list(tmp_path.glob(BUILD_PREFIX + "*"))


def test_clean_leftovers_spares_a_live_builder(tmp_path):
    store = DocStore(tmp_path)
    live = store.builder("live", PAGE)
    live.write_pages(0, _pages(0, 1))
    assert store.clean_leftovers() == [] and live.dir.exists()
    live.commit({"fingerprint": FP})
    assert store.exists("live")


CRASH_SCRIPT = textwrap.dedent("""
    import os, sys
    from storage.doc_store import DocStore
    store = DocStore(sys.argv[1])
    if sys.argv[2] == "cleanup":  # a dead build for the cleanup to remove
        os.makedirs(os.path.join(sys.argv[1], ".build-dead-1-x"))
        open(os.path.join(sys.argv[1], ".build-dead-1-x", "owner.lock"), "w").close()
        store.clean_leftovers()
    b = store.builder("doc", 512)
    for layer in range(3):
        b.write_pages(layer, bytes(512 * 4))
    b.commit({"fingerprint": "fingerprint-1"})
    if sys.argv[2] == "remove":
        store.remove("doc")
""")


@pytest.mark.parametrize("phase", ["write", "fsync", "manifest", "rename", "remove", "cleanup"])
def test_kill_at_named_phases_leaves_nothing_half_built(tmp_path, phase):
    """SIGKILL at each phase: no DocCache or a complete one; leftovers go at the next start;
    a DocCache valid before the kill is still valid after."""
    _build(DocStore(tmp_path), "before")
    env = {**os.environ, CRASH_ENV: phase, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(tmp_path), phase],
                          env=env, capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()
    store = DocStore(tmp_path)
    store.clean_leftovers()
    assert not list(tmp_path.glob(BUILD_PREFIX + "*")) and not list(tmp_path.glob(".quarantine-*"))
    if store.exists("doc"):  # killed after the rename (during the removal)
        store.verify("doc")
    store.verify("before")


def test_eviction_is_lru_and_skips_readers(tmp_path, io_backend):
    store = DocStore(tmp_path, io=io_backend)
    for name in ("a", "b", "c"):
        _build(store, name)
        os.utime(tmp_path / name / "last_used", (0, {"a": 100, "b": 200, "c": 300}[name]))
    size = store.list()[0].size_bytes
    reader = store.open("a", FP)  # touches a: now the most recent
    os.utime(tmp_path / "a" / "last_used", (0, 50))  # ... put it back to the oldest
    assert isinstance(reader, DocReader)
    removed = store.evict(limit_bytes=2 * size, incoming_bytes=size)
    assert removed == ["b", "c"] and store.exists("a")  # a, the oldest, is being read
    reader.close()
    assert store.evict(limit_bytes=0, keep=frozenset({"a"})) == [] and store.exists("a")
    assert store.evict(limit_bytes=0) == ["a"] and store.list() == []


HOLDER = textwrap.dedent("""
    import sys, time
    from storage.doc_store import DocStore
    store = DocStore(sys.argv[1])
    if sys.argv[2] == "read":
        r = store.open("a", "fingerprint-1")
    elif sys.argv[2] == "build":
        b = store.builder("b", 512)
        b.write_pages(0, bytes(512))
    else:
        ctx = store.exclusive("x"); ctx.__enter__()
    print("ready", flush=True)
    time.sleep(60)
""")


def _holder(tmp_path: Path, what: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path), what], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.slow  # (subprocesses)
def test_other_processes_reader_builder_and_lock_are_respected(tmp_path):
    """Two processes: eviction skips a DocCache another process reads; cleanup keeps a build
    another process owns; one document's build lock does not block another document."""
    store = DocStore(tmp_path)
    _build(store, "a")
    reader, builder, locker = (_holder(tmp_path, w) for w in ("read", "build", "lock"))
    try:
        assert store.evict(limit_bytes=0) == [] and store.exists("a")
        assert store.clean_leftovers() == [] and len(list(tmp_path.glob(BUILD_PREFIX + "b-*"))) == 1
        _build(store, "y")  # "x" is locked by another process; "y" builds
        assert store.exists("y")
    finally:
        for p in (reader, builder, locker):
            p.kill()
            p.wait()
    assert store.evict(limit_bytes=0) == ["a", "y"]  # least recently used first, now that no one reads
    assert store.clean_leftovers() and not list(tmp_path.glob(BUILD_PREFIX + "*"))  # the dead build goes


def test_unused_lock_files_are_removed_and_used_ones_kept(tmp_path):
    """A lock file whose document has no DocCache and that nobody holds goes; the lock file
    of a published DocCache, and one another holder has locked, stay."""
    store = DocStore(tmp_path)
    _build(store, "kept")
    store.open("kept", FP).close()  # a reader makes the DocCache's lock file
    with store.exclusive("gone"):
        pass  # an ingest that failed or whose DocCache was removed leaves its lock file
    assert store.remove("kept2") is True  # removing a DocCache that is not there: a lock file too
    holder = os.open(store.lock_path("busy"), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_SH)  # another open file description: conflicts like another process
    try:
        assert store.remove_unused_locks() == ["gone.lock", "kept2.lock"]
    finally:
        os.close(holder)
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == ["busy.lock", "kept.lock"]
    assert store.remove_unused_locks() == ["busy.lock"]
    store.verify("kept")


def test_a_lock_taken_on_a_removed_file_is_taken_again(tmp_path, monkeypatch):
    """A process that opened a lock file just before gc unlinked it gets its flock on the
    removed file; it must notice and lock the file at the path instead (else two processes
    could each think they hold the lock)."""
    from storage import doc_store

    store = DocStore(tmp_path)
    path = store.lock_path("doc")
    real_flock, calls = fcntl.flock, []

    def flock_after_gc(fd: int, op: int) -> None:
        if not calls:  # the first attempt: gc removes the file meanwhile, another process recreates it
            os.unlink(path)
            path.touch()
        calls.append(os.fstat(fd).st_ino)
        real_flock(fd, op)

    monkeypatch.setattr(doc_store.fcntl, "flock", flock_after_gc)
    with store.exclusive("doc"):
        assert len(calls) == 2 and calls[1] == os.stat(path).st_ino != calls[0]


def test_exclusive_says_when_it_must_wait_for_another_holder(tmp_path):
    """``on_wait`` is called once, before waiting, only when another holder has the lock (here
    another open file description, which flock treats as another process's)."""
    store = DocStore(tmp_path)
    waits: list[str] = []
    with store.exclusive("doc", on_wait=lambda: waits.append("free")):
        pass
    assert waits == []
    holder = os.open(store.lock_path("doc"), os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process building the document's DocCache

    def on_wait() -> None:
        waits.append("busy")
        os.close(holder)  # ... which then finishes

    with store.exclusive("doc", on_wait=on_wait):
        assert waits == ["busy"]
        other = os.open(store.lock_path("doc"), os.O_RDWR)
        try:
            with pytest.raises(BlockingIOError):  # held now: the next taker waits
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_a_doc_cache_evicted_while_open_waits_for_its_lock_is_none_not_corrupt(tmp_path, monkeypatch):
    """Another process evicts the DocCache between ``open``'s existence check and its shared
    lock: ``open`` finds none (a miss), never a "corrupt" DocCache (which would be quarantined,
    or refused with --no-rebuild)."""
    from storage import doc_store

    store = DocStore(tmp_path)
    _build(store, "a")
    real_lock_fd = doc_store._lock_fd

    def lock_after_an_eviction(path: Path, kind: int, *, blocking: bool = True):
        if kind == fcntl.LOCK_SH:
            monkeypatch.setattr(doc_store, "_lock_fd", real_lock_fd)
            assert DocStore(tmp_path).remove("a")  # the other process, just before our lock
        return real_lock_fd(path, kind, blocking=blocking)

    monkeypatch.setattr(doc_store, "_lock_fd", lock_after_an_eviction)
    assert store.open("a", FP) is None
    assert not store.exists("a") and not list(tmp_path.glob(".quarantine-*"))


def test_a_build_that_a_cleanup_took_for_dead_in_its_first_instant_starts_again(tmp_path, monkeypatch):
    """Another process's ``clean_leftovers`` runs between a builder's open of its owner lock
    and its flock, finds the lock free and removes the new build directory: the builder
    notices and builds in a new directory (it used to write into the removed one and fail)."""
    from storage import doc_store

    real_flock, cleaned = fcntl.flock, []

    def flock_after_a_cleanup(fd: int, op: int) -> None:
        if not cleaned:
            cleaned.append([])  # the cleanup's own flocks pass through
            cleaned[0] = DocStore(tmp_path).clean_leftovers()
        real_flock(fd, op)

    monkeypatch.setattr(doc_store.fcntl, "flock", flock_after_a_cleanup)
    store = DocStore(tmp_path)
    _build(store, "doc")
    assert len(cleaned[0]) == 1 and cleaned[0][0].startswith(".quarantine-doc-")  # the first directory went
    store.verify("doc")
    assert not list(tmp_path.glob(BUILD_PREFIX + "*"))
