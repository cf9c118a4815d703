"""Persistent DocCache: a document's KV written once at ingest, reused by any later process.

Policy over ``storage.doc_store`` (the mechanism: verified, crash-safe directories)::

    ingest(ids):
        doc_id = sha256(fingerprint, token ids)
        open doc_id  -> valid:  restore its pages into the engine's tiers        "hit"
                     -> failed: quarantine it; rebuild (or DocCacheError)        "rebuilt"
                     -> none:   under the doc's exclusive lock (a second
                                process waits here, then finds it: "hit"):
                                evict LRU DocCaches to fit --cache-limit,
                                prefill, write every layer's live pages,
                                publish by rename                                "miss"

The fingerprint is the SHA-256 of the checkpoint's files (cached by file identity: path,
size, mtime, inode), the compute and KV dtypes, the page size, the model shape and this
module's layout version; random-weight models include their seed, 4-bit DocCaches their
format and prefill chunk (later chunks attend earlier chunks' 4-bit pages). A DocCache built for
anything else never matches. What it holds: for each layer, its live pages in order (every
page of a global layer; a sliding layer's ring) as ``page_size`` tokens of K then V, head by
head, in the KV dtype; the meta records the tokens per layer and each ring's first page.
Restoring places the pages by the same placement the prefill would have used (the planner
when they spill), so a question after a hit computes exactly what it computes after a fresh
ingest.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from offload.config import format_size
from offload.errors import OffloadError
from offload.kv.doc_records import compact_records, packed_flags, stored_bytes
from offload.kv.doc_restore import RestoreReport, restore_document
from offload.kv.read_sets import PieceKind
from storage import Tier, make_io
from storage.doc_store import DocCacheCorrupt, DocCacheNoSpace, DocReader, DocStore
from offload.kv.page_table import cdiv

if TYPE_CHECKING:
    from offload.engine import Engine
    from offload.model.model_source import ModelSource
    from offload.kv.paged_kv import KVSequence

__all__ = ["DocCache", "DocCacheError", "LAYOUT_VERSION", "default_cache_limit"]

logger = logging.getLogger(__name__)

LAYOUT_VERSION = 1
# Default --cache-limit: this share of the file system's free space (plus what the store holds).
DEFAULT_LIMIT_SHARE = 0.25
# Free space a DocCache needs beyond its pages: the manifest (a CRC per page), file-system rounding.
SPACE_MARGIN_BYTES = 2**20


class DocCacheError(OffloadError):
    """A DocCache cannot be used or built (failed verification with rebuilding off, no space)."""


def default_cache_limit(root: Path, held_bytes: int) -> int:
    """``DEFAULT_LIMIT_SHARE`` of the free space where ``root`` lives, plus what the store holds."""
    return int(shutil.disk_usage(root).free * DEFAULT_LIMIT_SHARE) + held_bytes


def _files_hash(folder: Path, memo_path: Path) -> str:
    """SHA-256 over a checkpoint directory's files (names and bytes), cached by file identity."""
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256()
    changed = False
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = memo.get(key)
        if digest is None:
            fh = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    fh.update(block)
            digest = memo[key] = fh.hexdigest()
            changed = True
        h.update(path.name.encode() + b"\0" + digest.encode() + b"\0")
    if changed:
        tmp = memo_path.with_name(f"{memo_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo))
        tmp.replace(memo_path)
    return h.hexdigest()


def fingerprint(engine: "Engine", source: "ModelSource", memo_path: Path) -> str:
    """What a DocCache must have been built with to be reused here (see the module docstring)."""
    c = engine.config
    parts: dict[str, Any] = {
        "layout": LAYOUT_VERSION, "model": repr(source.config), "dtype": str(engine.dtype),
        "kv_dtype": str(engine.kv_dtype), "page_size": c.page_size,
    }
    if c.kv_format.value != "exact":  # (exact DocCaches keep the fingerprint they had before 4-bit pages)
        parts["kv_format"] = c.kv_format.value
        # A 4-bit prefill's later chunks attend the earlier chunks' 4-bit pages: the chunk
        # shapes the values stored.
        parts["prefill_chunk"] = engine.prefill_chunk
        parts["records"] = "compact"  # a packed page is stored as its blob (offload.kv.doc_records)
    if source.weights_dir is None:
        parts["random_weights_seed"] = c.seed
    else:
        parts["checkpoint"] = _files_hash(Path(source.weights_dir), memo_path)
    if source.tokenizer_dir is not None and source.tokenizer_dir != source.weights_dir:
        parts["tokenizer"] = _files_hash(Path(source.tokenizer_dir), memo_path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclasses.dataclass(slots=True)
class LoadResult:
    """What ``DocCache.ingest`` did: status ("hit", "miss", "rebuilt", "not saved"), timings,
    bytes, and for "not saved" the reason. On a hit, ``restore`` says how it was restored:
    the split (recomputed prefix tokens, predicted seconds) and why (``offload.kv.cake``)."""

    status: str
    doc_id: str
    seconds: float = 0.0
    verify_s: float = 0.0
    bytes: int = 0
    evicted: list[str] = dataclasses.field(default_factory=list)
    reason: str = ""
    restore: RestoreReport | None = None


class DocCache:
    """Documents' KV for one engine, persisted under ``<cache_dir>/docs``.

    Args:
        engine / source: the engine and the model it runs (for the fingerprint).
        cache_dir: the cache directory.
        limit_bytes: bound of the store (``--cache-limit``); None = ``default_cache_limit``.
        rebuild: rebuild a DocCache that fails verification (False: raise DocCacheError).
        notice: says a line to the user, e.g. on stderr (waiting for another process's
            build); None: the line is only logged.
    """

    def __init__(self, engine: "Engine", source: "ModelSource", cache_dir: Path, *,
                 limit_bytes: int | None = None, rebuild: bool = True,
                 notice: Callable[[str], None] | None = None) -> None:
        self.engine = engine
        self.notice = notice  # says a line to the user (None: only logged)
        try:
            io = engine.disk.io if engine.disk is not None else make_io(engine.config.disk_backend.value)
        except ValueError as e:
            raise DocCacheError(str(e)) from None
        self.store = DocStore(Path(cache_dir) / "docs", io=io)  # the DISK tier's backend
        removed = self.store.clean_leftovers()
        if removed:
            logger.info("DocCache: removed %d leftovers of interrupted builds", len(removed))
        locks = self.store.remove_unused_locks()
        if locks:
            logger.info("DocCache: removed %d lock files no DocCache or process uses", len(locks))
        self.fingerprint = fingerprint(engine, source, self.store.root / ".file-hashes.json")
        self.limit_bytes = limit_bytes
        self.rebuild = rebuild
        cfg = engine.model_config
        elem = torch.empty((), dtype=engine.kv_dtype).element_size()
        self.page_bytes = 2 * cfg.num_kv_heads * engine.config.page_size * cfg.head_dim * elem
        self.records = compact_records(engine, self.page_bytes)  # 4-bit pages: a record is a blob

    def doc_id(self, ids: list[int]) -> str:
        h = hashlib.sha256(self.fingerprint.encode() + b"\0")
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    def ingest(self, ids: list[int], prefill, *, required: bool = False) -> tuple["KVSequence", LoadResult]:
        """The document's sequence: restored from its DocCache, or ``prefill(ids)``'s
        (a ``KVSequence``) saved as a new DocCache.

        Whether a new DocCache can be saved (``refusal``: the cache limit, the free space) is
        known from the token count, so it is decided before the prefill: with ``required`` a
        DocCache that cannot be saved raises then; without it the document is prefilled and
        not saved (status "not saved", ``LoadResult.reason`` says why), as it is when the disk
        fills up during the save.

        Raises:
            DocCacheError: verification failed and rebuilding is off; or, with ``required``,
                the DocCache cannot be saved (raised before the prefill when that is known).
        """
        doc_id = self.doc_id(ids)
        status = "miss"
        seq, result = self._try_load(doc_id, ids)
        if seq is not None:
            return seq, result
        if result is not None:
            status = "rebuilt"
        refusal = self.refusal(self.kv_bytes(len(ids)))
        if refusal is not None:
            if required:
                raise DocCacheError(refusal)
            t0 = time.perf_counter()
            seq = prefill(ids)
            return seq, self._not_saved(doc_id, refusal, time.perf_counter() - t0)
        with self.store.exclusive(doc_id, on_wait=lambda: self._say_waiting(doc_id)):
            if status == "miss":  # another process may have built it while we waited
                seq, again = self._try_load(doc_id, ids, locked=True)
                if seq is not None:
                    return seq, again
                status = "rebuilt" if again is not None else "miss"
            t0 = time.perf_counter()
            seq = prefill(ids)
            timing = {"prefill_s": round(time.perf_counter() - t0, 6),
                      "prefill_chunk_s": [round(x, 6) for x in self.engine.prefill_chunk_s]}
            try:
                evicted = self._save(doc_id, ids, seq, timing)
            except DocCacheError as e:  # no space after all: the prefill is kept unless the DocCache was required
                if required:
                    self.engine.release(seq)
                    raise
                return seq, self._not_saved(doc_id, str(e), time.perf_counter() - t0)
            except BaseException:
                self.engine.release(seq)
                raise
            return seq, LoadResult(status, doc_id, time.perf_counter() - t0, 0.0, 0, evicted)

    def _not_saved(self, doc_id: str, reason: str, seconds: float) -> LoadResult:
        logger.info("DocCache %s not saved: %s", doc_id, reason)
        return LoadResult("not saved", doc_id, seconds, reason=reason)

    # ----- sizes --------------------------------------------------------------------------
    def kv_bytes(self, num_tokens: int) -> int:
        """Bytes of the pages the DocCache of a ``num_tokens``-token document holds (what
        ``_save`` writes): every page of a global layer, a sliding layer's ring; with 4-bit
        pages, as ``offload.kv.doc_records`` lays them out."""
        return stored_bytes(self.engine, self.records, num_tokens, self.page_bytes)

    def _bounds(self) -> tuple[int, int, int]:
        """(limit, free, held): the store's bound (``limit_bytes``, else
        ``default_cache_limit``), the free bytes of its file system, the bytes it holds."""
        held = self.store.size_bytes()
        free = shutil.disk_usage(self.store.root).free
        limit = self.limit_bytes if self.limit_bytes is not None else default_cache_limit(self.store.root, held)
        return limit, free, held

    def refusal(self, incoming: int) -> str | None:
        """Why a new DocCache of ``incoming`` bytes cannot be saved now, or None when it can:
        it exceeds the cache limit, or the file system's free space plus the DocCaches that
        eviction could remove (``SPACE_MARGIN_BYTES`` kept for the manifest and rounding)."""
        limit, free, held = self._bounds()
        kv = f"the document's KV ({format_size(incoming)})"
        skip = "or pass --no-doc-cache (doc_cache=False) not to use the DocCache"
        if incoming > limit and self.limit_bytes is not None:
            return (f"{kv} exceeds --cache-limit (cache_limit_bytes), {format_size(limit)}; raise it above "
                    f"{format_size(incoming)}, {skip}")
        if incoming > limit:
            return (f"{kv} exceeds the default DocCache limit, {format_size(limit)} ({DEFAULT_LIMIT_SHARE:.0%} of the "
                    f"{format_size(free)} free on the disk of {self.store.root}, plus the {format_size(held)} that "
                    f"DocCaches hold); pass a larger --cache-limit (cache_limit_bytes) or --cache-dir (cache_dir) on "
                    f"a larger disk, {skip}")
        if incoming + SPACE_MARGIN_BYTES > free + held:
            return (f"{kv} does not fit the {format_size(free)} free on the disk of {self.store.root} (with the "
                    f"{format_size(held)} of DocCaches eviction could remove); free some space or pass --cache-dir "
                    f"(cache_dir) on a larger disk, {skip}")
        return None

    def _say_waiting(self, doc_id: str) -> None:
        """Another holder has the document's exclusive lock: most often a process building
        its DocCache, which can take as long as a prefill; say so rather than hang silently."""
        line = (f"offload: waiting for another process to finish building (or removing) the DocCache of this "
                f"document ({doc_id[:12]}) ...")
        if self.notice is not None:
            self.notice(line)
        else:
            logger.info("%s", line)

    def _try_load(self, doc_id: str, ids: list[int], *, locked: bool = False):
        """(sequence, result) on a hit; (None, result) after quarantining a failed DocCache;
        (None, None) when there is none."""
        t0 = time.perf_counter()
        try:
            reader = self.store.open(doc_id, self.fingerprint) if not locked else self._open_locked(doc_id)
        except DocCacheCorrupt as e:
            return None, self._failed(doc_id, e)
        if reader is None:
            return None, None
        try:
            with reader:
                if reader.meta.get("token_ids_sha256") != _ids_hash(ids):
                    raise DocCacheCorrupt(f"DocCache {doc_id} holds other tokens")
                seq, report = restore_document(self.engine, reader, ids, self.page_bytes)
        except DocCacheCorrupt as e:
            return None, self._failed(doc_id, e)
        return seq, LoadResult("hit", doc_id, time.perf_counter() - t0, reader.verify_s, reader.bytes_read,
                               restore=report)

    def _open_locked(self, doc_id: str) -> DocReader | None:
        """Open while holding the exclusive lock (a shared one would wait on ourselves)."""
        from storage.doc_store import MANIFEST

        if not (self.store.root / doc_id / MANIFEST).is_file():
            return None
        manifest = self.store._read_manifest(doc_id)
        if manifest.get("meta", {}).get("fingerprint") != self.fingerprint:
            raise DocCacheCorrupt(f"DocCache {doc_id} fingerprint mismatch")
        return DocReader(self.store, doc_id, manifest, -1)

    def _failed(self, doc_id: str, error: DocCacheCorrupt) -> LoadResult:
        self.store.quarantine(doc_id)
        if not self.rebuild:
            raise DocCacheError(f"{error}; it was quarantined and not used (run without --no-rebuild to "
                                "rebuild it)") from None
        logger.warning("%s; quarantined, rebuilding", error)
        return LoadResult("rebuilt", doc_id)

    # ----- pages <-> files ----------------------------------------------------------------
    def _save(self, doc_id: str, ids: list[int], seq: "KVSequence", timing: dict[str, Any] | None = None) -> list[str]:
        """Write the sequence's pages as the document's DocCache; the meta also keeps the
        prefill's chunk, its seconds and its seconds per chunk (``timing``: what a split
        restore must repeat and is priced from, ``offload.kv.cake``)."""
        eng, kv = self.engine, self.engine.kv
        ps = eng.config.page_size
        layers = []
        for layer in range(eng.model_config.num_layers):
            layers.append({"first_page": seq.table.first_live(layer), "tokens": seq.lengths[layer]})
        incoming = self.kv_bytes(len(ids))
        refusal = self.refusal(incoming)
        if refusal is not None:
            raise DocCacheError(refusal)
        # Evicted down to the limit, and to the free space as well.
        limit, free, held = self._bounds()
        evicted = self.store.evict(min(limit, free + held - SPACE_MARGIN_BYTES), incoming_bytes=incoming,
                                   keep=frozenset({doc_id}))
        builder = self.store.builder(doc_id, self.page_bytes if self.records is None else self.records.record_bytes)
        try:
            for layer in range(eng.model_config.num_layers):
                if eng.packed_layout is not None:
                    builder.write_pages(layer, self._records_4bit(seq, layer))
                    continue
                for g in kv.reader.layer_groups(seq, layer, 1 << 30):
                    builder.write_pages(layer, self._pages_bytes(g.k, g.v))
            meta = {"fingerprint": self.fingerprint, "token_ids_sha256": _ids_hash(ids), "num_tokens": len(ids),
                    "page_size": ps, "kv_dtype": str(eng.kv_dtype), "layers": layers,
                    "kv_format": eng.config.kv_format.value, "prefill_chunk": eng.prefill_chunk, **(timing or {})}
            if self.records is not None:
                meta["record_bytes"] = self.records.record_bytes
            builder.commit(meta)
        except DocCacheNoSpace as e:
            raise DocCacheError(e.strerror or str(e)) from None
        except BaseException:
            builder.abort()
            raise
        # Another process may have published a DocCache while ours was built (its build ran
        # beside ours, uncounted above): evict again, so the store ends within the limit (two
        # concurrent builds otherwise left it above for good: later asks only hit).
        evicted += self.store.evict(limit, keep=frozenset({doc_id}))
        return evicted

    def _pages_bytes(self, k: torch.Tensor, v: torch.Tensor) -> memoryview:
        """K, V [nkv, n, hd] (n tokens from a page boundary) as whole pages [pages, 2, nkv, ps, hd]."""
        ps = self.engine.config.page_size
        nkv, n, hd = k.shape
        pages = cdiv(n, ps)
        kv = torch.zeros(2, nkv, pages * ps, hd, dtype=k.dtype)  # the last page's tail is zero padding
        kv[0, :, :n] = k.cpu()
        kv[1, :, :n] = v.cpu()
        out = kv.view(2, nkv, pages, ps, hd).permute(2, 0, 1, 3, 4).contiguous()
        return memoryview(out.view(torch.uint8).numpy()).cast("B")

    def _records_4bit(self, seq: "KVSequence", layer: int) -> memoryview:
        """A layer's pages as ``offload.kv.doc_records`` lays them out: an exact page's K and V
        (a partly filled tail padded with zeros), a packed page's blob."""
        kv, ps = self.engine.kv, self.engine.config.page_size
        assert self.records is not None
        first, n = seq.table.first_live(layer), cdiv(seq.lengths[layer], ps)
        out = torch.zeros(n - first, self.page_bytes, dtype=torch.uint8)
        for piece in kv.reader.layer_reads(seq, layer).pieces:
            rows = [p - first for p in piece.page_ids]
            if piece.kind == PieceKind.PACKED4:
                blobs = kv.reader.packed_blobs(piece)
                out[rows, : blobs.shape[1]] = blobs
                continue
            assert piece.tier == Tier.DEVICE, "with 4-bit pages the exact pages live on DEVICE"
            index = torch.tensor(list(piece.slots), dtype=torch.int64, device=kv.arena.device)
            pages = torch.stack((kv.arena.k.index_select(1, index), kv.arena.v.index_select(1, index)))
            pages = pages.permute(2, 0, 1, 3, 4).cpu().contiguous()  # [m, 2, nkv, ps, hd]
            if piece.page_ids[-1] == n - 1 and seq.lengths[layer] % ps:
                pages[-1, :, :, seq.lengths[layer] % ps:] = 0  # the tail page's unused rows
            out[rows] = pages.view(len(rows), -1).view(torch.uint8)
        flags = seq.table.packed(layer)[first:n]
        if flags != packed_flags(self.engine, layer, first, n - first, seq.lengths[layer]):
            raise RuntimeError(f"layer {layer}'s packed pages differ from the 4-bit rule the DocCache's records follow")
        return memoryview(self.records.pack(out, flags)).cast("B")

def _ids_hash(ids: list[int]) -> str:
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()
