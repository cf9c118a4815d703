"""The DocCache store: documents' KV pages as verified, crash-safe directories on disk.

Mechanism only (``offload`` decides what a document is and when to build or reuse one)::

    root/
      <doc_id>/                     a published DocCache (never modified after the rename)
        layer_000.kv ...            one file per layer: its pages back to back, page_bytes each
        manifest.json               written last: meta, per-file sizes, per-page CRC32s, and
                                    the SHA-256 of everything above it (last line)
        last_used                   touched on every open (LRU eviction order)
      <doc_id>.lock                 flock: exclusive while building or removing, shared while reading
      .build-<doc_id>-<pid>-<rand>/ a build in progress; its owner.lock is flocked by the builder

Publishing: pages are written into a ``.build-*`` directory, every file is fsynced, the
manifest is written and fsynced, the directory is renamed to ``<doc_id>`` and the root is
fsynced (durable against power loss). A kill at any point leaves either no ``<doc_id>`` or a
complete one; ``clean_leftovers`` removes build directories whose owner is gone (their
owner lock can be taken), never one a live process owns.

Verification: ``open`` checks the manifest's own hash and the caller's fingerprint; each
page's CRC32 is checked when the page is first read through ``DocReader.read_pages`` (reads
happen in pages, so reading one page never forces reading a whole file). Any mismatch raises
``DocCacheCorrupt``; the caller quarantines the DocCache (``quarantine``) and never uses it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from storage.disk_store import PosixIO

__all__ = ["DocStore", "DocBuilder", "DocReader", "DocCacheCorrupt", "DocCacheNoSpace", "DocInfo",
           "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_PREFIX = ".build-"
QUARANTINE_PREFIX = ".quarantine-"
CRASH_ENV = "OFFLOAD_DOC_CRASH_AT"


class DocCacheCorrupt(RuntimeError):
    """A DocCache failed verification (manifest hash, fingerprint, size or a page checksum)."""


class DocCacheNoSpace(OSError):
    """The file system ran out of space while a DocCache was built (the build was removed)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _touch_used(folder: Path) -> None:
    """Stamp a DocCache as used now, to the nanosecond (a plain touch takes the kernel's
    coarse clock: two uses within a few milliseconds would tie in the LRU order)."""
    path = folder / "last_used"
    path.touch()
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.kv"


def _crc(data: bytes | memoryview) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _names_file_of(path: Path, fd: int) -> bool:
    """True when ``path`` names the file open at ``fd`` (not removed or replaced since)."""
    held = os.fstat(fd)
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)


def _lock_fd(path: Path, kind: int, *, blocking: bool = True) -> int | None:
    """A descriptor holding ``fcntl.flock(kind)`` on the file ``path`` names (created if
    needed), or None when ``blocking`` is off and the lock is held elsewhere.

    ``DocStore.remove_unused_locks`` unlinks lock files under LOCK_EX, so a process that
    opened the file before the unlink may get its lock on a file no longer at ``path``: the
    lock is kept only if ``path`` still names the locked file, else it is taken again on
    the file there now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, kind | (0 if blocking else fcntl.LOCK_NB))
            held = os.fstat(fd)
            try:
                now = os.stat(path)
                same = (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
            except FileNotFoundError:
                same = False
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same:
            return fd
        os.close(fd)  # removed or replaced while we waited: lock the file there now


@contextlib.contextmanager
def _flock(path: Path, kind: int, *, blocking: bool = True) -> Iterator[bool]:
    """Hold ``fcntl.flock(kind)`` on ``path`` (``_lock_fd``); yields False when ``blocking``
    is off and the lock is held elsewhere."""
    fd = _lock_fd(path, kind, blocking=blocking)
    if fd is None:
        yield False
        return
    try:
        yield True
    finally:
        os.close(fd)  # closing releases the lock


@dataclasses.dataclass(frozen=True, slots=True)
class DocInfo:
    """One published DocCache as ``DocStore.list`` reports it."""

    doc_id: str
    path: Path
    size_bytes: int
    last_used: float
    meta: dict[str, Any]


class DocBuilder:
    """Writes one DocCache into a private build directory; ``commit`` publishes it.

    Args:
        store: the owning store.
        doc_id: the name it will be published under.
        page_bytes: bytes of one page (every layer's pages have this size).
    """

    def __init__(self, store: "DocStore", doc_id: str, page_bytes: int) -> None:
        self.store, self.doc_id, self.page_bytes = store, doc_id, page_bytes
        while True:
            self.dir = store.root / f"{BUILD_PREFIX}{doc_id}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.dir.mkdir(parents=True)
            self._owner = os.open(self.dir / "owner.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._owner, fcntl.LOCK_EX)  # held until commit/abort or death
            # Between the open and the flock, another process's clean_leftovers could take
            # the lock, find the build dead and remove it: start again in a new directory then.
            if _names_file_of(self.dir / "owner.lock", self._owner):
                break
            os.close(self._owner)
        self._files: dict[int, int] = {}
        self._offsets: dict[int, int] = {}  # bytes written so far per layer file
        self._crcs: dict[int, list[int]] = {}
        self.bytes_written = 0
        self.done = False

    def write_pages(self, layer: int, data: bytes | memoryview) -> None:
        """Append whole pages of ``layer`` (``len(data)`` a multiple of ``page_bytes``).

        Raises:
            DocCacheNoSpace: the file system is full (the build is removed).
            OSError: another write error (the build is removed).
        """
        view = memoryview(data).cast("B")
        if len(view) % self.page_bytes:
            raise ValueError(f"{len(view)} bytes is not a whole number of {self.page_bytes}-byte pages")
        io = self.store.io
        fd = self._files.get(layer)
        if fd is None:
            fd = self._files[layer] = io.open(str(self.dir / _layer_file(layer)),
                                              os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            self._offsets[layer] = 0
            self._crcs[layer] = []
        crcs = self._crcs[layer]
        for off in range(0, len(view), self.page_bytes):
            crcs.append(_crc(view[off: off + self.page_bytes]))
        try:
            self.store.fault_hook("write", self.dir / _layer_file(layer))
            done, at = 0, self._offsets[layer]
            while done < len(view):
                n = io.pwritev(fd, [view[done:]], at + done)
                if n <= 0:
                    raise OSError(errno.EIO, f"write of {self.dir / _layer_file(layer)} made no progress")
                done += n
            self._offsets[layer] = at + done
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise DocCacheNoSpace(errno.ENOSPC, f"no space left on the device while writing DocCache "
                                      f"{self.doc_id} into {self.store.root}; free space, lower --cache-limit "
                                      "or pass --cache-dir on a larger disk (the partial DocCache was removed)") from None
            raise
        self.bytes_written += len(view)

    def commit(self, meta: dict[str, Any]) -> Path:
        """Fsync the pages, write the manifest (with ``meta``) last, rename into place.

        Returns the published directory. If ``doc_id`` was published meanwhile by another
        process, this build is dropped and theirs is kept (same content by construction).
        """
        try:
            files = {}
            for layer, fd in sorted(self._files.items()):
                self.store.fault_hook("fsync", self.dir / _layer_file(layer))
                os.fsync(fd)
                self.store.io.close(fd)
                files[_layer_file(layer)] = {"layer": layer, "pages": len(self._crcs[layer]),
                                             "bytes": len(self._crcs[layer]) * self.page_bytes,
                                             "page_crc32": self._crcs[layer]}
            self._files = {}
            body = json.dumps({"format_version": FORMAT_VERSION, "doc_id": self.doc_id, "page_bytes": self.page_bytes,
                               "created": time.time(), "meta": meta, "files": files}, sort_keys=True)
            self.store.fault_hook("manifest", self.dir / MANIFEST)
            with open(self.dir / MANIFEST, "w") as f:
                f.write(body + "\n" + hashlib.sha256(body.encode()).hexdigest() + "\n")
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(self.dir)
            self.store.fault_hook("rename", self.dir)
            final = self.store.root / self.doc_id
            try:
                self.dir.rename(final)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                self.abort()  # published by another process meanwhile
                return final
            _fsync_dir(self.store.root)
            (final / "owner.lock").unlink(missing_ok=True)  # not part of the DocCache (not in the manifest)
            _touch_used(final)
            self.done = True
            return final
        except OSError as e:
            self.abort()
            if e.errno == errno.ENOSPC:
                raise DocCacheNoSpace(errno.ENOSPC, f"no space left on the device while publishing DocCache "
                                      f"{self.doc_id}; free space or lower --cache-limit (the partial DocCache "
                                      "was removed)") from None
            raise
        finally:
            self._release_owner()

    def abort(self) -> None:
        """Remove the build directory (idempotent)."""
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                self.store.io.close(fd)
        self._files = {}
        shutil.rmtree(self.dir, ignore_errors=True)
        self._release_owner()

    def _release_owner(self) -> None:
        if self._owner >= 0:
            os.close(self._owner)
            self._owner = -1


class DocReader:
    """Reads pages of a published DocCache, checking each page's CRC32 the first time it is read.

    Holds a shared lock on the DocCache (eviction and removal skip it) until ``close``.
    """

    def __init__(self, store: "DocStore", doc_id: str, manifest: dict[str, Any], lock_fd: int) -> None:
        self.store, self.doc_id, self.manifest = store, doc_id, manifest
        self.dir = store.root / doc_id
        self.page_bytes = int(manifest["page_bytes"])
        self.meta: dict[str, Any] = manifest["meta"]
        self._by_layer = {int(v["layer"]): (name, v) for name, v in manifest["files"].items()}
        self._verified: dict[int, set[int]] = {layer: set() for layer in self._by_layer}
        self._lock_fd = lock_fd
        self.verify_s = 0.0
        self.bytes_read = 0

    def num_pages(self, layer: int) -> int:
        return int(self._by_layer[layer][1]["pages"]) if layer in self._by_layer else 0

    def read_pages(self, layer: int, first: int, count: int, into: memoryview | None = None) -> memoryview:
        """Pages [first, first + count) of ``layer``, checked against their CRC32s (once):
        read into ``into`` (a writable byte view at least that long) or a new buffer; returns
        the view of the bytes read.

        Raises:
            DocCacheCorrupt: a short file or a checksum mismatch (names the file and page).
        """
        name, entry = self._by_layer[layer]
        path = self.dir / name
        nbytes = count * self.page_bytes
        self.store.fault_hook("read", path)
        io = self.store.io
        if into is not None and (into.nbytes < nbytes or into.readonly):
            raise ValueError(f"read_pages needs a writable buffer of {nbytes} bytes, got {into.nbytes}")
        buf = memoryview(bytearray(nbytes)) if into is None else into.cast("B")[:nbytes]
        fd = io.open(str(path), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, first * self.page_bytes, nbytes, os.POSIX_FADV_DONTNEED)
            got = 0
            while got < nbytes:  # a regular file returns short only at its end
                n = io.preadv(fd, [buf[got:]], first * self.page_bytes + got)
                if n <= 0:
                    break
                got += n
        finally:
            io.close(fd)
        if got != nbytes:
            raise DocCacheCorrupt(f"DocCache {self.doc_id}: {path.name} is short ({got} of {nbytes} bytes at "
                                  f"page {first})")
        t0 = time.perf_counter()
        seen, crcs = self._verified[layer], entry["page_crc32"]
        view = buf
        for i in range(count):
            page = first + i
            if page in seen:
                continue
            if _crc(view[i * self.page_bytes: (i + 1) * self.page_bytes]) != crcs[page]:
                raise DocCacheCorrupt(f"DocCache {self.doc_id}: page {page} of {path.name} fails its checksum")
            seen.add(page)
        self.verify_s += time.perf_counter() - t0
        self.bytes_read += nbytes
        return buf

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def __enter__(self) -> "DocReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DocStore:
    """The DocCache directory: build, open (verified), list, remove, quarantine, evict, clean.

    Args:
        root: the store's directory (created).
        io: the file I/O backend of page files (``storage.kvikio_io.make_io``; default POSIX).
    """

    def __init__(self, root: Path, *, io: PosixIO | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.io = io if io is not None else PosixIO()  # file I/O backend (storage.kvikio_io)

    def fault_hook(self, phase: str, path: Path) -> None:  # noqa: ARG002 - a seam for fault injection
        """Called before each write, fsync, manifest write, rename, read and removal. Tests
        override it to inject errors; with ``OFFLOAD_DOC_CRASH_AT=<phase>`` in the environment
        the process kills itself (SIGKILL) there (crash tests of named phases)."""
        if os.environ.get(CRASH_ENV) == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    def lock_path(self, doc_id: str) -> Path:
        return self.root / f"{doc_id}.lock"

    @contextlib.contextmanager
    def exclusive(self, doc_id: str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
        """Hold the DocCache's exclusive lock (one builder at a time; waits for readers).

        Args:
            on_wait: called once, before waiting, when another holder has the lock (the
                caller says that it waits; a wait of a whole build is otherwise silent).
        """
        path = self.lock_path(doc_id)
        fd = _lock_fd(path, fcntl.LOCK_EX, blocking=False)
        if fd is None:
            if on_wait is not None:
                on_wait()
            fd = _lock_fd(path, fcntl.LOCK_EX)
        assert fd is not None  # a blocking lock always comes
        try:
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def builder(self, doc_id: str, page_bytes: int) -> DocBuilder:
        return DocBuilder(self, doc_id, page_bytes)

    def exists(self, doc_id: str) -> bool:
        return (self.root / doc_id / MANIFEST).is_file()

    def open(self, doc_id: str, fingerprint: str) -> DocReader | None:
        """A reader of the published DocCache, or None if there is none.

        Raises:
            DocCacheCorrupt: the manifest fails its hash, the fingerprint differs, or a file
                has the wrong size.
        """
        path = self.root / doc_id / MANIFEST
        if not path.is_file():
            return None
        fd = _lock_fd(self.lock_path(doc_id), fcntl.LOCK_SH)
        assert fd is not None  # a blocking lock always comes
        if not path.is_file():  # removed (evicted by another process) before we got the lock
            os.close(fd)
            return None
        try:
            manifest = self._read_manifest(doc_id)
            if manifest.get("meta", {}).get("fingerprint") != fingerprint:
                raise DocCacheCorrupt(f"DocCache {doc_id} was built for another model, tokenizer, dtype or layout "
                                      "(fingerprint mismatch)")
            _touch_used(self.root / doc_id)
        except BaseException:
            os.close(fd)
            raise
        return DocReader(self, doc_id, manifest, fd)

    def _read_manifest(self, doc_id: str) -> dict[str, Any]:
        folder = self.root / doc_id
        self.fault_hook("read", folder / MANIFEST)
        try:
            text = (folder / MANIFEST).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise DocCacheCorrupt(f"DocCache {doc_id}: manifest unreadable ({e})") from None
        body, _, digest = text.removesuffix("\n").rpartition("\n")
        if not text.endswith("\n") or hashlib.sha256(body.encode()).hexdigest() != digest:
            raise DocCacheCorrupt(f"DocCache {doc_id}: manifest fails its hash")
        try:
            manifest = json.loads(body)
        except ValueError:
            raise DocCacheCorrupt(f"DocCache {doc_id}: manifest is not JSON") from None
        if manifest.get("format_version") != FORMAT_VERSION:
            raise DocCacheCorrupt(f"DocCache {doc_id}: format {manifest.get('format_version')} "
                                  f"(this version reads {FORMAT_VERSION})")
        for name, entry in manifest["files"].items():
            try:
                size = (folder / name).stat().st_size
            except OSError:
                raise DocCacheCorrupt(f"DocCache {doc_id}: {name} is missing") from None
            if size != entry["bytes"]:
                raise DocCacheCorrupt(f"DocCache {doc_id}: {name} has {size} bytes, the manifest says {entry['bytes']}")
        return manifest

    def verify(self, doc_id: str) -> None:
        """Read and check every byte of a DocCache (manifest, sizes, every page's checksum).

        Raises:
            DocCacheCorrupt: the first failure found.
        """
        manifest = self._read_manifest(doc_id)
        reader = DocReader(self, doc_id, manifest, -1)
        for layer in list(reader._by_layer):
            n = reader.num_pages(layer)
            for first in range(0, n, 256):
                reader.read_pages(layer, first, min(256, n - first))

    def quarantine(self, doc_id: str) -> Path | None:
        """Move a failed DocCache out of the way (never used again; ``gc`` removes it)."""
        src = self.root / doc_id
        if not src.exists():
            return None
        dst = self.root / f"{QUARANTINE_PREFIX}{doc_id}-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            src.rename(dst)
            _fsync_dir(self.root)
            logger.warning("quarantined DocCache %s (failed verification) as %s", doc_id, dst.name)
            return dst
        return None

    def list(self) -> list[DocInfo]:
        """Published DocCaches, least recently used first."""
        out = []
        for d in self.root.iterdir():
            if d.name.startswith(".") or not d.is_dir() or not (d / MANIFEST).is_file():
                continue
            try:
                size = sum(f.stat().st_size for f in d.iterdir())
                used = ((d / "last_used").stat().st_mtime_ns if (d / "last_used").exists()
                        else (d / MANIFEST).stat().st_mtime_ns) / 1e9
                body = (d / MANIFEST).read_text().rstrip("\n").rpartition("\n")[0]
                meta = json.loads(body).get("meta", {})
            except (OSError, ValueError):
                meta, size, used = {}, 0, 0.0
            out.append(DocInfo(d.name, d, size, used, meta))
        return sorted(out, key=lambda i: i.last_used)

    def size_bytes(self) -> int:
        return sum(i.size_bytes for i in self.list())

    def remove(self, doc_id: str, *, wait: bool = True) -> bool:
        """Remove a DocCache; False if a reader holds it and ``wait`` is off."""
        with _flock(self.lock_path(doc_id), fcntl.LOCK_EX, blocking=wait) as got:
            if not got:
                return False
            folder = self.root / doc_id
            if folder.exists():
                self.fault_hook("remove", folder)
                doomed = self.root / f"{QUARANTINE_PREFIX}{doc_id}-{uuid.uuid4().hex[:8]}"
                folder.rename(doomed)  # gone from view atomically; the bytes go next
                shutil.rmtree(doomed, ignore_errors=True)
            return True

    def evict(self, limit_bytes: int, *, incoming_bytes: int = 0, keep: frozenset[str] = frozenset()) -> list[str]:
        """Remove least-recently-used DocCaches (never one in ``keep`` or being read) until the
        store plus ``incoming_bytes`` fits ``limit_bytes``; returns the removed ids."""
        removed = []
        infos = self.list()
        total = sum(i.size_bytes for i in infos) + incoming_bytes
        for info in infos:
            if total <= limit_bytes:
                break
            if info.doc_id in keep or not self.remove(info.doc_id, wait=False):
                continue
            total -= info.size_bytes
            removed.append(info.doc_id)
        return removed

    def clean_leftovers(self) -> list[str]:
        """Remove build directories whose builder is gone and quarantined DocCaches; returns
        the names removed. A build whose owner lock is held (a live builder) is kept. A dead
        build is first renamed into the quarantine (atomic), so a cleanup killed halfway
        leaves only quarantine that the next one removes."""
        removed = []
        for d in sorted(self.root.iterdir()):
            if d.name.startswith(BUILD_PREFIX) and d.is_dir():
                if not self._build_is_dead(d):
                    continue
                doomed = self.root / f"{QUARANTINE_PREFIX}{d.name[len(BUILD_PREFIX):]}"
                try:
                    d.rename(doomed)
                except OSError:
                    continue
                d = doomed
            elif not d.name.startswith(QUARANTINE_PREFIX):
                continue
            self.fault_hook("cleanup", d)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        return removed

    def remove_unused_locks(self) -> list[str]:
        """Remove the lock files of documents that have no DocCache and that nobody holds
        (one is left behind by every document ever ingested, and by every removed or evicted
        DocCache); returns their names. Each is unlinked while this process holds its
        exclusive lock, and every lock taker checks that it locked the file its path still
        names (``_lock_fd``), so a process that opened the file just before keeps a valid lock."""
        removed = []
        for path in sorted(self.root.glob("*.lock")):
            doc_id = path.name[: -len(".lock")]
            if (self.root / doc_id).exists():
                continue  # a published DocCache: its readers and builders use this file
            fd = _lock_fd(path, fcntl.LOCK_EX, blocking=False)
            if fd is None:
                continue  # held: a build or a wait is under way
            try:
                if not (self.root / doc_id).exists():  # published just before we locked?
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
            finally:
                os.close(fd)
        return removed

    @staticmethod
    def _build_is_dead(d: Path) -> bool:
        """True when no process holds the build's owner lock (a live builder always does,
        except for an instant after creating the directory: such a lockless one is dead only
        once a minute old)."""
        try:
            fd = os.open(d / "owner.lock", os.O_RDWR)
        except FileNotFoundError:
            return time.time() - d.stat().st_mtime > 60
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)
        return True
