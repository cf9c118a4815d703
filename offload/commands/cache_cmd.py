"""`offload cache`: manage the DocCache store (no model is loaded).

    offload cache list [--json]        DocCaches, least recently used first
    offload cache verify [ID ...]      read every byte and check it (all when no ID)
    offload cache remove ID ...        remove DocCaches (waits for readers)
    offload cache gc [--cache-limit S] remove leftovers of killed builds and quarantined
                                       DocCaches, evict least recently used ones down to S,
                                       then remove lock files no DocCache or process uses
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from offload.config import parse_size
from offload.errors import InputError
from offload.model.model_source import default_cache_dir

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="offload cache", description="Manage the DocCache store.")
    p.add_argument("action", choices=("list", "verify", "remove", "gc"))
    p.add_argument("ids", nargs="*", help="DocCache ids (verify, remove)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="the cache directory (default $OFFLOAD_CACHE or ~/.cache/offload)")
    p.add_argument("--cache-limit", default=None, help="gc: evict down to this size, e.g. 10GiB")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    from storage.doc_store import DocCacheCorrupt, DocStore

    root = (args.cache_dir or default_cache_dir()) / "docs"
    if not root.is_dir():
        print(f"no DocCache store at {root}" if not args.json else "[]")
        return 0
    store = DocStore(root)
    try:
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
        removed = store.clean_leftovers()
        evicted = store.evict(parse_size(args.cache_limit)) if args.cache_limit else []
        locks = store.remove_unused_locks()  # after eviction: the evicted ones' locks go too
        print(f"removed {len(removed)} leftovers and {len(locks)} unused lock files; evicted {len(evicted)} DocCaches"
              + (f" ({', '.join(evicted)})" if evicted else ""))
        return 0
    except (InputError, ValueError) as e:
        print(f"offload cache: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
