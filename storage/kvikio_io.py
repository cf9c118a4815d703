"""File I/O backends: POSIX system calls from a thread pool, or NVIDIA's KvikIO.

``make_io("auto")`` picks KvikIO when CUDA and the ``kvikio`` package are both present (its
C++ thread pool splits each read and write into parallel tasks; with GPUDirect Storage
installed it can move data between NVMe and GPU memory without a host copy, and without it,
in its compatibility mode, it reads and writes through POSIX calls of its own), else
``PosixIO``. Both serve the DISK tier (``DiskExtentStore``) and the DocCache store
(``DocStore``) through the same methods, and the storage tests run against each backend
present.

``KvikioIO`` keeps reads cold like the POSIX path: the page cache of each range is dropped
(``posix_fadvise(DONTNEED)``) before it is read, and KvikIO is asked to use O_DIRECT for
aligned transfers (``auto_direct_io_read``/``_write``). The OS file descriptor that ``open``
returns stays the handle the stores use; KvikIO opens the same path for itself beside it. A
file KvikIO cannot open (a file system it refuses, such as some tmpfs mounts for O_DIRECT) is
served by the POSIX calls, and ``fallbacks`` counts those files.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from typing import Any

import numpy as np

from storage.disk_store import PosixIO

__all__ = ["KvikioIO", "make_io", "kvikio_status", "BACKENDS"]

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "posix", "kvikio")
INSTALL_HINT = "pip install kvikio-cu12 (or kvikio-cu13, matching your CUDA)"
# Threads of KvikIO's pool when KVIKIO_NTHREADS is not set: the DISK tier's reader pool (4)
# and the read-ahead's split transfers each keep a few tasks in flight (NVMe wants depth).
KVIKIO_THREADS = 8


def kvikio_status() -> str | None:
    """None when the KvikIO backend can run here, else why not (for errors and test skips)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return "CUDA is not available (KvikIO needs the CUDA driver, libcuda)"
    except ImportError:
        return "torch is not installed"
    try:
        import kvikio  # noqa: F401
    except ImportError as e:
        return f"the kvikio package is not installed ({e}); {INSTALL_HINT}"
    return None


def make_io(name: str = "auto") -> PosixIO:
    """The backend called ``name``: ``"posix"``, ``"kvikio"`` or ``"auto"`` (KvikIO where it
    can run, else POSIX).

    Raises:
        ValueError: an unknown name, or ``"kvikio"`` where it cannot run (says why).
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown disk backend {name!r}; use one of {', '.join(BACKENDS)}")
    if name == "posix":
        return PosixIO()
    problem = kvikio_status()
    if problem is None:
        try:
            return KvikioIO()
        except Exception as e:  # noqa: BLE001 - a KvikIO this adapter cannot drive: say why, or fall back
            problem = f"KvikIO failed to start ({type(e).__name__}: {e})"
            logger.warning("%s; the disk backend is POSIX", problem)
    if name == "kvikio":
        raise ValueError(f"the kvikio disk backend cannot run here: {problem}; use --disk-backend posix")
    return PosixIO()


class KvikioIO(PosixIO):
    """Reads and writes through ``kvikio.CuFile`` (see the module docstring)."""

    name = "kvikio"

    def __init__(self) -> None:
        import kvikio
        import kvikio.defaults

        self._kvikio = kvikio
        for key in ("auto_direct_io_read", "auto_direct_io_write"):  # older KvikIO: no such setting,
            _set_default(kvikio, key, True)  # cold reads then rely on posix_fadvise
        # KvikIO's own pool runs each transfer's tasks; it has one thread unless told (its
        # KVIKIO_NTHREADS), which would queue every reader thread of the store behind one.
        if "KVIKIO_NTHREADS" not in os.environ:
            _set_default(kvikio, "num_threads", KVIKIO_THREADS)
        self._files: dict[int, Any] = {}
        self._lock = threading.Lock()
        self.fallbacks = 0
        self.compat_mode = _get_default(kvikio, "compat_mode")
        self.num_threads = _get_default(kvikio, "num_threads")

    def open(self, path: str, flags: int, mode: int = 0o644) -> int:
        fd = os.open(path, flags, mode)
        try:
            handle = self._kvikio.CuFile(path, "r" if (flags & os.O_ACCMODE) == os.O_RDONLY else "r+")
        except Exception as e:  # noqa: BLE001 - any refusal: this file goes through POSIX calls
            logger.info("KvikIO cannot open %s (%s): POSIX calls serve it", path, e)
            with self._lock:
                self.fallbacks += 1
            return fd
        with self._lock:
            self._files[fd] = handle
        return fd

    def close(self, fd: int) -> None:
        with self._lock:
            handle = self._files.pop(fd, None)
        try:
            if handle is not None:
                handle.close()
        finally:
            os.close(fd)

    def _handle(self, fd: int) -> Any:
        with self._lock:
            return self._files.get(fd)

    def preadv(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return self._transfer(fd, buffers, offset, "read")

    def pwritev(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        return self._transfer(fd, buffers, offset, "write")

    def _transfer(self, fd: int, buffers: list[memoryview], offset: int, what: str) -> int:
        """The buffers in turn from ``offset`` through KvikIO (POSIX for a file it refused);
        stops at the first short transfer, like preadv/pwritev."""
        handle = self._handle(fd)
        if handle is None:
            return (super().preadv if what == "read" else super().pwritev)(fd, buffers, offset)
        total = 0
        for buf in buffers:
            arr = np.frombuffer(buf, dtype=np.uint8)
            if what == "read":
                os.posix_fadvise(fd, offset + total, arr.nbytes, os.POSIX_FADV_DONTNEED)  # cold, as POSIX reads
            elif not arr.flags.writeable:  # KvikIO takes writable buffers only
                arr = arr.copy()
            n = _call(handle.pread if what == "read" else handle.pwrite, arr, offset + total, what)
            total += n
            if n < arr.nbytes:
                break
        return total

def _get_default(kvikio: Any, key: str) -> Any:
    """A KvikIO setting: ``defaults.get(key)`` (KvikIO 25.x) or ``defaults.<key>()`` (older)."""
    d = kvikio.defaults
    try:
        if hasattr(d, "get"):
            return d.get(key)
        getter = getattr(d, key, None)
        return getter() if callable(getter) else None
    except (KeyError, ValueError, AttributeError, TypeError):  # a setting this KvikIO lacks
        return None


def _set_default(kvikio: Any, key: str, value: Any) -> None:
    """``defaults.set(key, value)`` (KvikIO 25.x) or ``defaults.<key>_reset(value)`` (older)."""
    d = kvikio.defaults
    try:
        if hasattr(d, "set"):
            d.set(key, value)
        else:
            getattr(d, f"{key}_reset")(value)
    except (KeyError, ValueError, AttributeError, TypeError) as e:
        logger.info("KvikIO setting %s=%r not applied (%s)", key, value, e)


def _call(op: Any, arr: np.ndarray, offset: int, what: str) -> int:
    """One KvikIO transfer; its failures (RuntimeError) become OSError like a system call's."""
    try:
        return int(op(arr, arr.nbytes, offset).get())
    except RuntimeError as e:
        raise OSError(errno.EIO, f"KvikIO {what} of {arr.nbytes} bytes at offset {offset} failed: {e}") from None
