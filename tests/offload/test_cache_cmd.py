"""`offload cache`: gc removes dead runs' DISK-tier files; gc and remove on a read-only cache
dir give one clean error.

The tests run as root, where permission bits do not stop writes, so a read-only file system
is injected where it first bites: the ``open`` of a DocCache lock file (``EROFS``).
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from offload.commands.cli import main
from tests.offload.test_cli import _err as _one_error_line
from storage import doc_store
from storage.doc_store import DocStore
from storage.run_dirs import LOCK_NAME, make_run_dir

DOC_ID = "0123456789abcdef0123456789abcdef"




@pytest.fixture()
def read_only_cache(tmp_path, monkeypatch) -> Path:
    """A cache dir with one DocCache and one unused lock file, then made "read-only": from
    then on, opening any ``*.lock`` file fails with EROFS."""
    store = DocStore(tmp_path / "docs")
    b = store.builder(DOC_ID, 512)
    b.write_pages(0, bytes(512 * 3))
    b.commit({"fingerprint": "f", "num_tokens": 96})
    with store.exclusive("f" * 32):  # an ingest that failed leaves an unused lock file for gc
        pass
    real_open = os.open

    def open_(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(doc_store.os, "open", open_)
    return tmp_path


@pytest.mark.parametrize("argv", [["gc"], ["gc", "--cache-limit", "1KiB"], ["remove", DOC_ID]],
                         ids=["gc", "gc-evicting", "remove"])
def test_gc_and_remove_on_a_read_only_cache_dir_give_one_clean_error(capsys, read_only_cache, argv):
    assert main(["cache", *argv, "--cache-dir", str(read_only_cache)]) == 2
    line = _one_error_line(capsys)
    assert f"offload cache {argv[0]}" in line and "Read-only file system" in line and "writable" in line
    assert ".lock" in line  # names the file it could not write
    # list and verify still work there, and the DocCache is intact
    assert main(["cache", "list", "--cache-dir", str(read_only_cache)]) == 0
    assert DOC_ID in capsys.readouterr().out
    assert main(["cache", "verify", "--cache-dir", str(read_only_cache)]) == 0
    assert f"{DOC_ID}  ok" in capsys.readouterr().out


def test_gc_removes_dead_runs_disk_files_and_keeps_a_live_one(capsys, tmp_path):
    """A run killed by SIGKILL leaves kv/run-<pid>-<hex>/ with its lock file unlocked: gc
    removes it (also with no DocCache store there); a live run's directory stays."""
    kv = tmp_path / "kv"
    dead = kv / "run-1-deadbeef"
    dead.mkdir(parents=True)
    (dead / LOCK_NAME).touch()
    (dead / "layer_000.kv").write_bytes(bytes(65536))
    live = make_run_dir(kv)
    try:
        assert main(["cache", "gc", "--cache-dir", str(tmp_path)]) == 0
        assert "1 DISK-tier directories" in capsys.readouterr().out
        assert not dead.exists() and live.path.is_dir()
    finally:
        live.remove()
