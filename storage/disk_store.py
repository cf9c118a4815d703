"""The DISK tier: one file per layer, KV pages in 4 KiB-aligned slots, async I/O by a pool.

On-disk layout (``disk_page_bytes = round_up(page_bytes, 4096)``)::

    root/layer_000.kv   root/layer_001.kv   ...   root/layer_{L-1:03d}.kv

    layer_003.kv (dpb = disk_page_bytes):
    0                  1*dpb              2*dpb              3*dpb
    |--- page 0 -------|--- page 1 -------|--- page 2 -------|--- page 3 ...
    |<-page_bytes->|pad|<-page_bytes->|pad|                  |
                       \\________ extent: pages 1..2 _________/
                       one preadv/pwritev at offset 1*dpb, length 2*dpb

Page ``p`` of layer ``l`` lives at offset ``p * disk_page_bytes`` of layer ``l``'s file, so a
run of consecutive page ids is one contiguous, aligned extent and moves in one call. Calls
longer than ``MAX_IO_BYTES`` (8 MiB) are split into 8 MiB pieces (still aligned), issued one
after another by the same worker: one call's latency stays bounded and far below Linux's
2 GiB per-call cap. The padding bytes of a slot are written and read back as they are in the
caller's buffer. Existing layer files are reused, not truncated: their old bytes count as
never written (see below) and are overwritten page by page.

Cold reads (``cold_read_mode``), so that measured disk bandwidth is honest:
- ``"o_direct"``: files are opened with ``O_DIRECT``; reads and writes bypass the page cache.
- ``"fadvise_dontneed"``: for file systems that refuse O_DIRECT. Buffered I/O; every write is
  followed by ``fdatasync`` and ``posix_fadvise(DONTNEED)`` of its range (DONTNEED drops only
  clean pages, hence the sync), and every read is preceded by ``DONTNEED`` of its range.

Threading rule:
- The store owns the file descriptors (opened in the constructor, closed by ``close()`` after
  the pool has drained) and a ``ThreadPoolExecutor`` whose workers do all file I/O. Positioned
  I/O (``preadv``/``pwritev``) never moves a shared file offset, so workers share the fds.
- The caller owns the buffers. A buffer passed to ``submit_*`` must stay untouched until
  the handle's ``wait()`` returns; the store holds a view of it until then, so an
  ``AlignedBuffer`` cannot be unmapped under a transfer (its ``close()`` raises BufferError).
- One lock guards the byte counters, the written-page bitmaps and the closed flag.
- Ordering between transfers of the same pages is the caller's job (policy lives outside
  ``storage``): the pool may run two handles in any order.

Written pages: a page becomes readable when its write handle has completed successfully
(the worker marks it before the handle reports done). A failed write unmarks its pages
(their bytes are undefined). ``submit_read`` of a page that is not marked raises ValueError,
so a read must be submitted after the write's ``wait()`` returned.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from storage.aligned import DISK_ALIGNMENT, AlignedBuffer, round_up
from storage.errors import StorageIOError, describe_pages

__all__ = ["DiskExtentStore", "PosixIO", "TransferHandle", "TransferResult", "MAX_IO_BYTES"]

logger = logging.getLogger(__name__)

MAX_IO_BYTES = 8 * 2**20
"""Longest single preadv/pwritev; longer extents are split into pieces of this size."""

_UNSUPPORTED_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_READ, _WRITE = "read", "write"


class PosixIO:
    """The file I/O backend: the system calls the disk store and the DocCache store make, as
    methods so another backend (``storage.kvikio_io.KvikioIO``) can take the reads and writes
    and tests can inject faults.

    A subclass may raise ``OSError`` or return a short count from any of them. ``open``
    returns an OS file descriptor (``fadvise``, ``fdatasync`` and ``fsync`` act on it).
    """

    name = "posix"

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        return os.open(path, flags, mode)

    def close(self, fd: int) -> None:
        os.close(fd)

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return os.preadv(fd, buffers, offset)

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return os.pwritev(fd, buffers, offset)

    def fdatasync(self, fd: int) -> None:
        os.fdatasync(fd)

    def fadvise(self, fd: int, offset: int, length: int, advice: int) -> None:
        os.posix_fadvise(fd, offset, length, advice)


@dataclasses.dataclass(frozen=True, slots=True)
class TransferResult:
    """What one completed transfer moved.

    Attributes:
        nbytes: bytes moved (``num_pages * disk_page_bytes``).
        seconds: time the worker spent on the I/O (queueing before it started not included).
    """

    nbytes: int
    seconds: float


class TransferHandle:
    """An in-flight read or write of one extent (or, ``submit_read_extents``, of several);
    ``wait()`` gives its result or its error.

    Attributes:
        op: ``"read"`` or ``"write"``.
        layer: the layer.
        extents: every extent, ``(first_page, num_pages)`` each (a write: one).
        first_page, num_pages: the first extent's first page, and the pages of all.
    """

    def __init__(self, future: cf.Future[TransferResult], *, op: str, layer: int,
                 extents: tuple[tuple[int, int], ...]) -> None:
        self._future = future
        self.op = op
        self.layer = layer
        self.extents = extents
        self.first_page = extents[0][0]
        self.num_pages = sum(n for _, n in extents)

    def done(self) -> bool:
        """True once the transfer finished, successfully or not (non-blocking)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> TransferResult:
        """Blocks until the transfer finished.

        Raises:
            StorageIOError: the I/O failed (OS error, short read or short write).
            TimeoutError: ``timeout`` seconds passed first (the transfer goes on).
        """
        return self._future.result(timeout)

    def __repr__(self) -> str:
        pages = describe_pages([p for first, n in self.extents for p in range(first, first + n)])
        state = "done" if self.done() else "pending"
        return f"TransferHandle({self.op} {pages} of layer {self.layer}, {state})"


class DiskExtentStore:
    """KV pages of every layer in per-layer files; async reads and writes of page extents.

    Args:
        root: folder of the layer files (created if missing).
        num_layers: number of layers (>= 1), one file each.
        page_bytes: bytes of one page (>= 1); its disk slot is rounded up to 4 KiB.
        num_threads: I/O worker threads (>= 1).
        direct: None tries O_DIRECT and falls back to buffered I/O with cache dropping if
            the file system refuses it; True requires O_DIRECT; False never uses it.
        io: the system-call object (tests pass a fault-injecting subclass).

    Raises:
        ValueError: a bad argument, or ``direct=True`` where O_DIRECT is not supported.
    """

    def __init__(self, root: Path, *, num_layers: int, page_bytes: int, num_threads: int = 4,
                 direct: bool | None = None, io: PosixIO | None = None) -> None:
        for name, value in (("num_layers", num_layers), ("page_bytes", page_bytes),
                            ("num_threads", num_threads)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.root = Path(root)
        self.num_layers = num_layers
        self.page_bytes = page_bytes
        self.disk_page_bytes = round_up(page_bytes, DISK_ALIGNMENT)
        self._io = io if io is not None else PosixIO()
        self.root.mkdir(parents=True, exist_ok=True)
        self._direct = self._choose_direct(direct)
        self._lock = threading.Lock()
        self._closed = False
        self._bytes_read = 0
        self._bytes_written = 0
        self._written = [bytearray() for _ in range(num_layers)]  # 1 per written page
        self.paths = [self.root / f"layer_{layer:03d}.kv" for layer in range(num_layers)]
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        flags |= _O_DIRECT if self._direct else 0
        self._fds: list[int] = []
        try:
            for path in self.paths:
                self._fds.append(self._io.open(str(path), flags, 0o644))
        except BaseException:
            for fd in self._fds:
                self._io.close(fd)
            raise
        self._pool = cf.ThreadPoolExecutor(num_threads, thread_name_prefix="disk-io")
        logger.info("disk store at %s: %d layers, %d-byte slots (page %d bytes), %d threads, "
                    "cold reads via %s", self.root, num_layers, self.disk_page_bytes,
                    page_bytes, num_threads, self.cold_read_mode)

    # -- setup -------------------------------------------------------------------------

    def _choose_direct(self, direct: bool | None) -> bool:
        if direct is False:
            return False
        problem = self._probe_direct()
        if problem is None:
            return True
        if direct:
            raise ValueError(f"direct=True, but O_DIRECT is not supported under {self.root} "
                             f"({problem}); pass direct=None to fall back to buffered I/O")
        logger.info("O_DIRECT unsupported under %s (%s): buffered I/O with "
                    "posix_fadvise(DONTNEED)", self.root, problem)
        return False

    def _probe_direct(self) -> str | None:
        """One aligned O_DIRECT write and read in a scratch file; None if both work."""
        if not _O_DIRECT:
            return "this OS has no O_DIRECT"
        handle, probe = tempfile.mkstemp(prefix=".o_direct_probe-", dir=self.root)
        os.close(handle)
        try:
            fd = self._io.open(probe, os.O_RDWR | _O_DIRECT, 0o644)
            try:
                with AlignedBuffer(DISK_ALIGNMENT) as buf:
                    view = buf.memoryview()
                    try:
                        self._io.pwritev(fd, [view], 0)
                        self._io.preadv(fd, [view], 0)
                    finally:
                        view.release()
            finally:
                self._io.close(fd)
        except OSError as e:
            if e.errno in _UNSUPPORTED_DIRECT:
                return f"[Errno {e.errno}] {e.strerror}"
            raise
        finally:
            os.unlink(probe)
        return None

    # -- properties --------------------------------------------------------------------

    @property
    def io(self) -> PosixIO:
        """The file I/O backend (``PosixIO`` or ``storage.kvikio_io.KvikioIO``)."""
        return self._io

    @property
    def backend(self) -> str:
        """The I/O backend's name (``"posix"`` or ``"kvikio"``)."""
        return self._io.name

    @property
    def cold_read_mode(self) -> str:
        """``"o_direct"`` or ``"fadvise_dontneed"`` (see the module docstring)."""
        return "o_direct" if self._direct else "fadvise_dontneed"

    @property
    def bytes_read(self) -> int:
        """Bytes read from disk so far (counted per completed call, including split pieces)."""
        with self._lock:
            return self._bytes_read

    @property
    def bytes_written(self) -> int:
        """Bytes written to disk so far (counted per completed call)."""
        with self._lock:
            return self._bytes_written

    def is_written(self, layer: int, page: int) -> bool:
        """True if the page's last write completed successfully (readable)."""
        self._check_layer(layer)
        with self._lock:
            bitmap = self._written[layer]
            return 0 <= page < len(bitmap) and bitmap[page] == 1

    # -- two-phase API ------------------------------------------------------------------

    def submit_write(self, layer: int, first_page: int, buf: memoryview,
                     num_pages: int) -> TransferHandle:
        """Starts writing ``num_pages`` pages from ``buf`` to page ids ``first_page...`` (async).

        Args:
            layer: layer index.
            first_page: page id of the first page.
            buf: bytes ``[num_pages * disk_page_bytes]``, page ``i`` at ``i * disk_page_bytes``,
                C-contiguous, address 4 KiB-aligned (e.g. an ``AlignedBuffer`` view). Must not
                change until ``wait()`` returns.
            num_pages: pages to write (>= 1).

        Raises:
            ValueError: bad layer/page range, a wrong length or a misaligned buffer, or the
                store is closed.
        """
        view = self._check_extent(layer, first_page, num_pages, buf, writable=False)
        return self._submit(_WRITE, layer, ((first_page, num_pages),), view)

    def submit_read(self, layer: int, first_page: int, num_pages: int,
                    out: memoryview) -> TransferHandle:
        """Starts reading ``num_pages`` pages from page ids ``first_page...`` into ``out`` (async).

        Args:
            layer: layer index.
            first_page: page id of the first page.
            num_pages: pages to read (>= 1); every one must have been written (a completed
                write handle).
            out: writable bytes ``[num_pages * disk_page_bytes]``, same stride and alignment
                rules as ``submit_write``. Undefined until ``wait()`` returns.

        Raises:
            ValueError: as ``submit_write``, or pages that were never written.
        """
        return self.submit_read_extents(layer, ((first_page, num_pages),), out)

    def submit_read_extents(self, layer: int, extents: tuple[tuple[int, int], ...],
                            out: memoryview) -> TransferHandle:
        """Starts reading extents ``(first_page, num_pages)`` of one layer into consecutive
        places of ``out`` (async), as one task: its worker makes one call per extent. Scattered
        pages (a sparse step's) then cost one task, not one each. ``out`` holds their pages,
        in order; rules and errors as ``submit_read``."""
        if not extents:
            raise ValueError("extents must name at least one extent")
        for first_page, num_pages in extents[1:]:
            self._check_pages(layer, first_page, num_pages)
        view = self._check_extent(layer, extents[0][0], sum(n for _, n in extents), out, writable=True)
        with self._lock:
            bitmap = self._written[layer]
            missing = [p for first, n in extents for p in range(first, first + n)
                       if p >= len(bitmap) or not bitmap[p]]
        if missing:
            raise ValueError(f"cannot read {describe_pages(missing)} of layer {layer}: never "
                             "written (or their write has not completed: wait() for it first)")
        return self._submit(_READ, layer, tuple(extents), view)

    def _submit(self, op: str, layer: int, extents: tuple[tuple[int, int], ...],
                view: memoryview) -> TransferHandle:
        with self._lock:
            if self._closed:
                raise ValueError(f"DiskExtentStore at {self.root} is closed")
            future = self._pool.submit(self._transfer, op, layer, extents, view)
        return TransferHandle(future, op=op, layer=layer, extents=extents)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")

    def _check_pages(self, layer: int, first_page: int, num_pages: int) -> None:
        self._check_layer(layer)
        if first_page < 0:
            raise ValueError(f"first_page must be >= 0, got {first_page}")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")

    def _check_extent(self, layer: int, first_page: int, num_pages: int, buf: Any,
                      *, writable: bool) -> memoryview:
        """Validates an extent and its buffer; returns the buffer as a flat byte view."""
        self._check_pages(layer, first_page, num_pages)
        view = memoryview(buf)
        if not view.c_contiguous:
            raise ValueError("buffer must be C-contiguous")
        if writable and view.readonly:
            raise ValueError("out buffer is read-only; pass a writable one")
        view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        expected = num_pages * self.disk_page_bytes
        if view.nbytes != expected:
            raise ValueError(f"buffer length is {view.nbytes} bytes, expected {expected} "
                             f"({num_pages} pages x {self.disk_page_bytes}-byte slots)")
        address = int(np.frombuffer(view, dtype=np.uint8, count=1).ctypes.data)
        if address % DISK_ALIGNMENT:
            raise ValueError(f"buffer address 0x{address:x} is not {DISK_ALIGNMENT}-byte "
                             "aligned; use an AlignedBuffer")
        return view

    # -- worker side ----------------------------------------------------------------------

    def _transfer(self, op: str, layer: int, extents: tuple[tuple[int, int], ...],
                  view: memoryview) -> TransferResult:
        """Runs on a pool thread: each extent in turn, in pieces of at most MAX_IO_BYTES, laid
        one after another in ``view`` (a write has one extent). The bytes of the calls that
        completed are counted once at the end, also when a later call failed."""
        start_s = time.perf_counter()
        dpb, at, moved = self.disk_page_bytes, 0, 0
        try:
            for first_page, num_pages in extents:
                nbytes = num_pages * dpb
                for start in range(0, nbytes, MAX_IO_BYTES):
                    with view[at + start:at + min(start + MAX_IO_BYTES, nbytes)] as piece:
                        moved += self._transfer_piece(op, layer, first_page, start, piece)
                at += nbytes
        except BaseException:
            if op == _WRITE:
                self._mark_written(layer, extents[0][0], extents[0][1], value=0)
            raise
        finally:
            # The error kept by the handle references these frames: release the caller's
            # memory now, so its buffer can be closed while the handle lives on.
            view.release()
            with self._lock:
                if op == _READ:
                    self._bytes_read += moved
                else:
                    self._bytes_written += moved
        if op == _WRITE:
            self._mark_written(layer, extents[0][0], extents[0][1], value=1)
        return TransferResult(nbytes=at, seconds=time.perf_counter() - start_s)

    def _transfer_piece(self, op: str, layer: int, first_page: int, start: int,
                        piece: memoryview) -> int:
        """One system call at file offset ``first_page * dpb + start``; returns its bytes.
        (Kept lean: a sparse step makes hundreds, one per scattered page.)"""
        fd, length = self._fds[layer], piece.nbytes
        offset = first_page * self.disk_page_bytes + start
        try:
            if op == _READ:
                if not self._direct:
                    self._io.fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
                done = self._io.preadv(fd, [piece], offset)
            else:
                done = self._io.pwritev(fd, [piece], offset)
                if not self._direct and done == length:
                    self._io.fdatasync(fd)
                    self._io.fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
        except OSError as e:
            raise StorageIOError.from_os_error(e, op=op, path=str(self.paths[layer]), layer=layer,
                                               pages=self._pages(first_page, start, length)) from e
        if done != length:
            what = f"short read (got {done}" if op == _READ else f"short write (wrote {done}"
            raise StorageIOError(op, str(self.paths[layer]), layer, self._pages(first_page, start, length), None,
                                 f"{what} of {length} bytes)")
        return length

    def _pages(self, first_page: int, start: int, length: int) -> list[int]:
        """The page ids of a call's bytes ``start .. start + length`` of an extent."""
        dpb = self.disk_page_bytes
        return list(range(first_page + start // dpb, first_page + (start + length - 1) // dpb + 1))

    def _mark_written(self, layer: int, first_page: int, num_pages: int, *, value: int) -> None:
        with self._lock:
            bitmap = self._written[layer]
            end = first_page + num_pages
            if len(bitmap) < end:
                bitmap.extend(bytes(end - len(bitmap)))
            bitmap[first_page:end] = bytes([value]) * num_pages

    # -- lifetime -----------------------------------------------------------------------

    def close(self) -> None:
        """Waits for in-flight transfers, stops the workers and closes the files (idempotent).

        Handles stay valid: their ``wait()`` still returns the result or raises the error.
        """
        with self._lock:
            self._closed = True  # no submit after this point
        self._pool.shutdown(wait=True)  # idempotent; a second close() also waits
        with self._lock:
            fds, self._fds = self._fds, []
        for fd in fds:
            self._io.close(fd)

    def delete(self) -> None:
        """Closes the store and removes its layer files (``root`` itself is kept)."""
        self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)

    def __enter__(self) -> DiskExtentStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"DiskExtentStore(root={str(self.root)!r}, num_layers={self.num_layers}, "
                f"page_bytes={self.page_bytes}, cold_read_mode={self.cold_read_mode!r})")
