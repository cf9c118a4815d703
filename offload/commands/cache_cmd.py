"""`offload cache`: manage the DocCache store (no model is loaded).

    offload cache list [--json]        DocCaches, least recently used first
    offload cache verify [ID ...]      read every byte and check it (all when no ID)
    offload cache remove ID ...        remove DocCaches (waits for readers)
    offload cache gc [--cache-limit S] remove the DISK-tier files of runs that no longer run,
                                       leftovers of killed builds and quarantined
                                       DocCaches, evict least recently used ones down to S,
                                       then remove lock files no DocCache or process uses
"""
from __future__ import annotations

import errno
import json
import re
import sys
import time
from pathlib import Path

from offload.commands.args import OneLineParser, size_flag
from offload.errors import InputError
from offload.model.model_source import default_cache_dir

__all__ = ["main"]

_DOC_ID = re.compile(r"[0-9a-f]{32}")  # DocCache.doc_id: 32 hex digits


def _check_ids(action: str, ids: list[str]) -> None:
    """Raises InputError for ids an action does not take, before the store is touched."""
    if ids and action in ("list", "gc"):
        raise InputError(f"`offload cache {action}` takes no DocCache ids; drop {' '.join(ids)}")
    for doc_id in ids:
        if not _DOC_ID.fullmatch(doc_id):
            raise InputError(f"{doc_id!r} is not a DocCache id (32 hex digits, as `offload cache list` prints "
                             "them)")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="offload cache", description="Manage the DocCache store.")
    p.add_argument("action", choices=("list", "verify", "remove", "gc"))
    p.add_argument("ids", nargs="*", help="DocCache ids (verify, remove)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the cache directory (default $OFFLOAD_CACHE or ~/.cache/offload)")
    p.add_argument("--cache-limit", default=None, help="gc: evict down to this size, e.g. 10GiB")
    p.add_argument("--json", action="store_true")
    try:
        args = p.parse_args(argv)
        _check_ids(args.action, args.ids)
        size_flag("--cache-limit", args.cache_limit, minimum=1)
    except SystemExit as e:  # a usage error (one line printed) or --help
        return e.code if isinstance(e.code, int) else 2
    except InputError as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    from storage.doc_store import DocCacheCorrupt, DocStore

    cache = args.cache_dir or default_cache_dir()
    root = cache / "docs"
    if not root.is_dir() and args.action != "gc":
        if args.ids or args.action == "remove":  # named DocCaches cannot be in a store that does not exist
            print(f"offload: error: there is no DocCache store at {root}, so no DocCache "
                  f"{' '.join(args.ids) or 'to remove'}; check --cache-dir or $OFFLOAD_CACHE", file=sys.stderr)
            return 2
        print(f"no DocCache store at {root}" if not args.json else "[]")
        return 0
    try:
        if args.action == "gc":
            return _gc(cache, args.cache_limit)
        store = DocStore(root)
        if args.action == "list":
            infos = store.list()
            rows = [{"doc_id": i.doc_id, "bytes": i.size_bytes, "tokens": i.meta.get("num_tokens"),
                     "last_used": i.last_used} for i in infos]
            if args.json:
                print(json.dumps(rows))
            for r in rows if not args.json else []:
                used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used"]))
                print(f"{r['doc_id']}  {r['tokens']:>8} tokens  {r['bytes'] / 2**20:>9.1f} MiB  last used {used}")
            return 0
        if args.action == "verify":
            ids = args.ids or [i.doc_id for i in store.list()]
            bad = 0
            for doc_id in ids:
                if not store.exists(doc_id):
                    raise InputError(f"no DocCache {doc_id!r} in {root}; see `offload cache list`")
                try:
                    store.verify(doc_id)
                    print(f"{doc_id}  ok")
                except DocCacheCorrupt as e:
                    bad += 1
                    store.quarantine(doc_id)
                    print(f"{doc_id}  FAILED: {e} (quarantined)")
            return 1 if bad else 0
        if args.action == "remove":
            if not args.ids:
                raise InputError("name the DocCache ids to remove (offload cache list shows them)")
            for doc_id in args.ids:
                if not store.exists(doc_id):
                    raise InputError(f"no DocCache {doc_id!r} in {root}; see `offload cache list`")
                store.remove(doc_id)
                print(f"removed {doc_id}")
            return 0
    except (InputError, ValueError) as e:
        print(f"offload: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. gc or remove on a read-only cache dir (their locks are written)
        print(f"offload: error: {_write_error(e, args.action, cache)}", file=sys.stderr)
        return 2


def _gc(cache: Path, cache_limit: str | None) -> int:
    """`offload cache gc`: DISK-tier directories of runs that ended without removing them
    (SIGKILL), leftovers of killed builds, quarantined DocCaches, eviction down to the limit,
    unused lock files."""
    from storage.doc_store import DocStore
    from storage.run_dirs import remove_dead_run_dirs

    runs = remove_dead_run_dirs(cache / "kv")
    removed: list[str] = []
    evicted: list[str] = []
    locks: list[str] = []
    if (cache / "docs").is_dir():
        store = DocStore(cache / "docs")
        removed = store.clean_leftovers()
        evicted = store.evict(size_flag("--cache-limit", cache_limit, minimum=1)) if cache_limit else []
        locks = store.remove_unused_locks()  # after eviction: the evicted ones' locks go too
    print(f"removed {len(removed)} leftovers, {len(locks)} unused lock files and {len(runs)} DISK-tier directories "
          f"of runs that no longer run; evicted {len(evicted)} DocCaches"
          + (f" ({', '.join(evicted)})" if evicted else ""))
    return 0


def _write_error(e: OSError, action: str, cache: Path) -> str:
    """One line for an OSError of ``action`` on the cache dir: what failed and the fix."""
    what = f"{e.filename}" if e.filename else str(cache)
    reason = e.strerror or str(e)
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        readers = " (`offload cache list` and `verify` only read it)" if action in ("gc", "remove") else ""
        return (f"`offload cache {action}` changes the cache dir {cache} and cannot write {what} ({reason}); "
                f"run it where the cache dir is writable{readers}")
    return f"`offload cache {action}` failed on {what} ({reason}); check the cache dir {cache}"


if __name__ == "__main__":
    sys.exit(main())
