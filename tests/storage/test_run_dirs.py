"""Run directories: a dead run's directory (its lock free) is removed, a live one's never.

The locks here are held by this process through their own open file descriptions, which
flock treats as it treats another process's (the subprocess kills are in
tests/offload/test_run_cleanup.py, under ``slow``).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from storage.run_dirs import LOCK_NAME, RUN_PREFIX, make_run_dir, remove_dead_run_dirs


def _dead_run(base: Path, pid: int, name: str = "deadbeef") -> Path:
    """What a killed run leaves: its directory, its files and its lock file, unlocked."""
    d = base / f"{RUN_PREFIX}{pid}-{name}"
    d.mkdir(parents=True)
    (d / LOCK_NAME).touch()
    (d / "layer_000.kv").write_bytes(bytes(8192))
    return d


def _unused_pid() -> int:
    """A pid no process can have (above the kernel's pid_max)."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def test_a_dead_runs_dir_is_removed_and_a_live_ones_kept(tmp_path):
    base = tmp_path / "kv"
    live = make_run_dir(base)
    assert live.path.name.startswith(f"{RUN_PREFIX}{os.getpid()}-") and (live.path / LOCK_NAME).is_file()
    (live.path / "layer_000.kv").write_bytes(bytes(4096))
    # A dead run whose pid is now this live process's (a reused pid): its lock is free, so it goes.
    reused = _dead_run(base, os.getpid())
    dead = _dead_run(base, _unused_pid(), "0badc0de")
    assert remove_dead_run_dirs(base) == sorted([reused.name, dead.name])
    assert sorted(p.name for p in base.iterdir()) == [live.path.name]
    assert (live.path / "layer_000.kv").stat().st_size == 4096
    assert remove_dead_run_dirs(base) == []  # the live one stays, again
    live.remove()
    assert not live.path.exists() and not live.is_held
    live.remove()  # idempotent


def test_a_run_locked_through_another_descriptor_is_kept(tmp_path):
    """A run directory whose lock someone holds (here another open file description of this
    process, as a process that opened it would) is live, whatever its pid says."""
    base = tmp_path / "kv"
    d = _dead_run(base, _unused_pid())
    holder = os.open(d / LOCK_NAME, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    try:
        assert remove_dead_run_dirs(base) == [] and d.is_dir()
    finally:
        os.close(holder)
    assert remove_dead_run_dirs(base) == [d.name] and not d.exists()


def test_lockless_dirs_of_older_versions_go_by_pid_and_other_files_stay(tmp_path):
    """A run directory from before the lock existed is dead when no process has its pid; a
    creation still in progress is kept (an old one was killed in that instant); half-removed
    ones go; files that are not run directories are never touched."""
    base = tmp_path / "kv"
    base.mkdir()
    old_dead = base / f"{RUN_PREFIX}{_unused_pid()}-1234abcd"
    old_live = base / f"{RUN_PREFIX}{os.getpid()}-1234abcd"
    new_young = base / f".new-{RUN_PREFIX}{os.getpid()}-aaaa0000"
    new_old = base / f".new-{RUN_PREFIX}{_unused_pid()}-bbbb0000"
    half_removed = base / f".dead-{RUN_PREFIX}{_unused_pid()}-cccc0000"
    for d in (old_dead, old_live, new_young, new_old, half_removed):
        d.mkdir()
        (d / "layer_000.kv").write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(new_old, (hour_ago, hour_ago))
    scratch = base / "profile-scratch-1-2.bin"
    scratch.write_bytes(b"x")
    (base / "other").mkdir()
    assert sorted(remove_dead_run_dirs(base)) == sorted([old_dead.name, new_old.name, half_removed.name])
    assert sorted(p.name for p in base.iterdir()) == sorted(["other", scratch.name, old_live.name, new_young.name])
    assert remove_dead_run_dirs(tmp_path / "missing") == []


def test_run_dirs_are_unique_and_their_locks_independent(tmp_path):
    """Two runs of one process: each holds its own lock; removing one leaves the other."""
    base = tmp_path / "kv"
    a, b = make_run_dir(base), make_run_dir(base)
    assert a.path != b.path
    a.remove()
    assert remove_dead_run_dirs(base) == [] and b.path.is_dir() and not a.path.exists()
    b.remove()
    assert list(base.iterdir()) == []
