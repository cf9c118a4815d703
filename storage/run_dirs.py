"""Run directories: a process's private folder of DISK-tier files, locked for the run's life.

Mechanism only (the engine decides when a run needs one)::

    base/                               e.g. <cache dir>/kv
      run-<pid>-<hex>/                  one engine's DISK tier (layer files)
        owner.lock                      flock LOCK_EX, held by the owning process until
                                        ``RunDir.remove`` or its death
      .new-run-<pid>-<hex>/             being created (an instant: mkdir, lock, rename)
      .dead-run-<pid>-<hex>/            being removed by a cleaner (rename, then rmtree)

Why a lock and not the pid: the kernel drops a flock when its last descriptor closes, so
also when its process dies of SIGKILL, and a pid that a later process reuses holds no lock
on the dead run's file. A run directory is dead exactly when its ``owner.lock`` can be
taken; ``remove_dead_run_dirs`` takes it, renames the directory out of view (atomic: two
cleaners never both remove it) and removes it. The directory appears under its ``run-``
name only with its lock already held (created as ``.new-run-*`` and renamed), so a cleaner
never sees a live run without its lock.

Directories of older versions have no ``owner.lock``; for those only, the pid decides (no
process with that pid: dead), which errs toward keeping a directory whose pid was reused.

Descriptors are opened ``O_CLOEXEC``: a program the run starts (exec) does not keep the
lock after the run ends. A child made by a bare ``fork`` shares the lock, and the directory
then lives until the child exits too.
"""
from __future__ import annotations

import fcntl
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

__all__ = ["RunDir", "make_run_dir", "remove_dead_run_dirs", "RUN_PREFIX", "LOCK_NAME"]

logger = logging.getLogger(__name__)

RUN_PREFIX = "run-"
LOCK_NAME = "owner.lock"
NEW_PREFIX = ".new-"
DEAD_PREFIX = ".dead-"
NEW_DIR_GRACE_S = 60.0
"""A ``.new-run-*`` directory exists for an instant of its creation; one older than this
was left by a process killed in that instant."""


class RunDir:
    """A run directory whose ``owner.lock`` this process holds until ``remove``.

    Attributes:
        path: the directory (``base/run-<pid>-<hex>``).
    """

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd = lock_fd

    @property
    def is_held(self) -> bool:
        return self._lock_fd >= 0

    def remove(self) -> None:
        """Remove the directory and its files, then release the lock (idempotent). The lock
        is held until the files are gone, so no cleaner races the removal."""
        if self._lock_fd < 0:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = -1

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r}, held={self.is_held})"


def make_run_dir(base: Path) -> RunDir:
    """A new run directory under ``base`` (created if missing), its lock held by this process.

    Raises:
        OSError: ``base`` cannot be written.
    """
    base = Path(base)
    base.mkdir(parents=True, exist_ok=True)
    name = f"{RUN_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    new = base / f"{NEW_PREFIX}{name}"
    new.mkdir()
    try:
        fd = os.open(new / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except BaseException:
        new.rmdir()
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a file nobody else has opened: never busy
        new.rename(base / name)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        os.close(fd)
        raise
    return RunDir(base / name, fd)


def _pid_of(name: str) -> int | None:
    """The pid in ``run-<pid>-<hex>``, or None if the name has another form."""
    pid, _, rest = name[len(RUN_PREFIX):].partition("-")
    return int(pid) if pid.isdigit() and rest else None


def _pid_lives(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _is_dead(d: Path) -> tuple[bool, int | None]:
    """(dead, a descriptor holding the dead run's lock, or None). The caller keeps the lock
    until it has renamed the directory away: meanwhile another cleaner finds it busy."""
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDONLY | os.O_CLOEXEC)  # flock needs no write access
    except FileNotFoundError:
        pid = _pid_of(d.name)
        return (pid is not None and not _pid_lives(pid)), None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False, None
    except BaseException:
        os.close(fd)
        raise
    return True, fd


def _rmtree(d: Path) -> None:
    """Remove a tree; entries another cleaner removed meanwhile are not an error."""
    def onerror(func, path, exc_info):  # noqa: ARG001 - shutil's signature
        if not isinstance(exc_info[1], FileNotFoundError):
            raise exc_info[1]

    shutil.rmtree(d, onerror=onerror)


def remove_dead_run_dirs(base: Path) -> list[str]:
    """Remove the run directories under ``base`` whose owner is gone (their lock can be
    taken), leftovers of cleaners killed halfway and of creations killed in their instant;
    returns the names removed. A live run's directory is never touched.

    Raises:
        OSError: a dead directory cannot be removed (e.g. a read-only file system).
    """
    base = Path(base)
    if not base.is_dir():
        return []
    removed = []
    for d in sorted(base.iterdir()):
        name = d.name
        try:
            if name.startswith(RUN_PREFIX) and d.is_dir():
                dead, fd = _is_dead(d)
                if not dead:
                    continue
                try:
                    doomed = base / f"{DEAD_PREFIX}{name}"
                    d.rename(doomed)  # out of view before its lock is let go
                finally:
                    if fd is not None:
                        os.close(fd)
                d = doomed
            elif name.startswith(NEW_PREFIX + RUN_PREFIX):
                if time.time() - d.stat().st_mtime < NEW_DIR_GRACE_S:
                    continue
            elif not name.startswith(DEAD_PREFIX + RUN_PREFIX):
                continue
        except FileNotFoundError:
            continue  # removed meanwhile by another cleaner
        _rmtree(d)
        removed.append(name)
        logger.info("removed %s, the DISK-tier directory of a process that no longer runs", d)
    return removed
