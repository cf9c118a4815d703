"""DocCache reliability: kills during ingest, corrupted bytes, concurrent ingests, a full disk.

    python bench/doc_cache_reliability.py [--kills 20] [--corruptions 20] [--seed 0]

Every worker is a separate process running the Python API on a random-weight SmolLM2 shape
(4 layers: the mechanism under test does not depend on the weights) and a ~3K-token document,
with budgets that spill its KV to DISK. It prints counts:

1. kill -9 of an ingest: at each named phase (pages written, fsync, manifest, rename, a
   removal, a cleanup) and at ``--kills`` random moments; after each, a new process ingests
   again: a DocCache it uses must give the reference answer (an invalid one used = a wrong
   answer or a "hit" on bad bytes), and no build leftovers may remain. Another document's
   DocCache, valid before every kill, must still verify after it, and a new process asking
   about that document at the end must report a "hit" (the eviction phase evicts it on
   purpose: it is built again after that trial).
2. ``--corruptions`` random single-byte flips in a DocCache's files (pages or manifest): each
   must be detected ("rebuilt") and never used; the answer stays the reference one.
3. two processes ingesting one document at once: one builds ("miss"), the other waits and
   reuses ("hit"); both answers equal the single-process answer.
4. a full disk: a real size-limited tmpfs when this machine lets us mount one (root), else a
   fault injected at the storage layer (said in the output): a clear reason the document was
   not saved (an error with ``require_doc_cache``), no partial files,
   the DocCache that was there before still verifies.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS = 4
DOC = "\n".join(f"Entry {i}: the lighthouse keeper logged {i * 37 % 101} ships and {i % 7} storms." for i in range(48))
QUESTION = "How many storms did the keeper log?"
NEW_TOKENS = 8
LIMIT_ENV = "OFFLOAD_RELIABILITY_LIMIT"  # a worker's --cache-limit (the eviction phase)
KEEP_DOC = DOC + "\nThe keeper's log ends here."  # a second document, its DocCache kept across kills
DOC_ENV = "OFFLOAD_RELIABILITY_DOC"  # "keep": the worker ingests KEEP_DOC

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from bench.doc_cache_reliability import make_qa, DOC, KEEP_DOC, DOC_ENV, QUESTION, NEW_TOKENS
from offload.errors import OffloadError
import os, time
try:
    with make_qa(Path(sys.argv[1])) as qa:
        print("ingesting", flush=True)
        t0 = time.perf_counter()
        doc = qa.ingest(KEEP_DOC if os.environ.get(DOC_ENV) == "keep" else DOC)
        ingest_s = time.perf_counter() - t0
        ans = qa.ask(doc, QUESTION, max_new_tokens=NEW_TOKENS)
        print(json.dumps({"status": doc.stats.doc_cache, "answer": ans.token_ids, "ingest_s": ingest_s}))
except OffloadError as e:
    print(json.dumps({"error": str(e)}))
"""


def make_qa(cache: Path, *, doc_cache: bool = True, kv_dir: Path | None = None, limit: int | None = None):
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig
    from planner.profile import HardwareProfile

    # The DISK tier lives in kv_dir (the full-disk case keeps it off the small file system,
    # which only the DocCache store fills). A fixed profile: where the planner puts pages does
    # not matter to the DocCache, and no worker then measures one (a measurement in a worker
    # killed on purpose, or on the full disk, would only add time and noise).
    config = RuntimeConfig(device="cpu", device_memory_bytes=2 * 2**20, host_memory_bytes=12 * 2**20,
                           staging_chunk_pages=8, kv_dir=str(kv_dir or cache / "kv"),
                           profile=HardwareProfile.preset("cpu-2core"))
    if limit is None and os.environ.get(LIMIT_ENV):
        limit = int(os.environ[LIMIT_ENV])
    return LongDocQA("smollm2-135m", config=config, cache_dir=cache, random_weights=True, num_layers=LAYERS,
                     doc_cache=doc_cache, cache_limit_bytes=limit)


def spawn(cache: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, str(cache), str(ROOT)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env})


def result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=600)
    lines = out.strip().splitlines()
    if p.returncode != 0 or not lines:
        raise RuntimeError(f"worker failed ({p.returncode}): {err[-2000:]}")
    return json.loads(lines[-1])


def leftovers(cache: Path) -> list[str]:
    docs = cache / "docs"
    return [d.name for d in docs.iterdir() if d.name.startswith((".build-", ".quarantine-"))] if docs.is_dir() else []


def kills(cache: Path, reference: list[int], n_random: int, rng: random.Random) -> dict:
    """Named phases, then random moments; after each kill a fresh process ingests again."""
    from storage.doc_store import CRASH_ENV, DocStore

    store = DocStore(cache / "docs")
    ingest_s = result(spawn(cache))["ingest_s"]  # a miss: how long a building ingest takes

    def build_keeper() -> str:
        with make_qa(cache) as qa:  # a DocCache valid before every kill
            return qa.ingest(KEEP_DOC).doc_id

    keeper = build_keeper()
    trials = [("phase", p) for p in ("write", "fsync", "manifest", "rename", "remove", "cleanup")]
    # Random moments within the ingest: from the worker's "ingesting" line to its end.
    trials += [("random", f"{rng.uniform(0.0, ingest_s):.3f}") for _ in range(n_random)]
    out = {"trials": 0, "killed": 0, "invalid_used": 0, "leftovers_after_restart": 0, "hits_after": 0,
           "kept_checked": 0, "kept_valid": 0}
    for kind, what in trials:
        for info in store.list():
            if info.doc_id != keeper:
                store.remove(info.doc_id)
        env = {CRASH_ENV: what} if kind == "phase" else {}
        if kind == "phase" and what == "cleanup":
            dead = cache / "docs" / ".build-dead-0-x"  # a dead build for the cleanup to remove
            dead.mkdir(parents=True, exist_ok=True)
            (dead / "owner.lock").touch()
        if kind == "phase" and what == "remove":
            with make_qa(cache) as qa:  # another document's DocCache, evicted by the worker's tiny limit
                qa.ingest(DOC + "\nAppendix.")
            env[LIMIT_ENV] = "1"
        p = spawn(cache, **env)
        if kind == "random":
            assert p.stdout is not None
            p.stdout.readline()  # "ingesting"
            time.sleep(float(what))
            p.kill()
        p.communicate(timeout=600)
        out["trials"] += 1
        out["killed"] += p.returncode == -9
        after = result(spawn(cache))  # the restart
        out["leftovers_after_restart"] += len(leftovers(cache))
        out["invalid_used"] += after.get("answer") != reference
        out["hits_after"] += after.get("status") == "hit"
        if kind == "phase" and what == "remove":  # this trial's tiny cache limit evicted it on purpose
            keeper = build_keeper()
            continue
        out["kept_checked"] += 1
        try:
            store.verify(keeper)
            out["kept_valid"] += 1
        except Exception as e:  # noqa: BLE001 - any failure counts against it
            print(f"the DocCache valid before the kill fails after it ({kind} {what}): {e}", flush=True)
    final = result(spawn(cache, **{DOC_ENV: "keep"}))
    out["kept_hit_at_end"] = final.get("status") == "hit"
    return out


def corruptions(cache: Path, reference: list[int], n: int, rng: random.Random) -> dict:
    """Single-byte flips at random places of a valid DocCache; one process ingests after each."""
    out = {"corruptions": 0, "detected": 0, "used": 0}
    with make_qa(cache) as qa:
        for _ in range(n):
            qa.forget(qa.ingest(DOC))  # a valid DocCache (rebuilt if the last flip broke it)
            folder = next(d for d in (cache / "docs").iterdir() if not d.name.startswith(".") and d.is_dir())
            files = sorted(f for f in folder.iterdir() if f.name.startswith("layer_") or f.name == "manifest.json")
            path = rng.choice(files)
            data = bytearray(path.read_bytes())
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
            doc = qa.ingest(DOC)
            out["corruptions"] += 1
            out["detected"] += doc.stats.doc_cache == "rebuilt"
            used = doc.stats.doc_cache == "hit"
            out["used"] += used or qa.ask(doc, QUESTION, max_new_tokens=NEW_TOKENS).token_ids != reference
            qa.forget(doc)
    return out


def concurrent(cache: Path, reference: list[int]) -> dict:
    procs = [spawn(cache) for _ in range(2)]
    outs = [result(p) for p in procs]
    return {"statuses": sorted(o["status"] for o in outs), "answers_equal_reference": all(
        o["answer"] == reference for o in outs)}


def full_disk(reference_cache: Path) -> dict:
    """ENOSPC on a real small tmpfs if mounting works here, else injected at the storage layer."""
    from offload.kv.doc_cache import DocCacheError
    from storage.doc_store import DocStore

    mount = Path(tempfile.mkdtemp(prefix="doccache-tmpfs-"))
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)],
                             capture_output=True).returncode == 0
    out: dict = {"mode": "real tmpfs of 8 MiB" if mounted else "ENOSPC injected at the storage layer (mount refused)"}
    try:
        kv = Path(tempfile.mkdtemp(prefix="doccache-kv-"))
        small = DOC[:300]
        with make_qa(mount, kv_dir=kv, limit=2**30) as qa:  # a limit above the disk: the disk fills first
            qa.forget(qa.ingest(small))  # its DocCache fits
            before = [i.doc_id for i in qa.doc_cache.store.list()]
            if not mounted:
                def no_space(phase: str, path: Path) -> None:
                    if phase == "write" and "layer_002" in str(path):
                        raise OSError(28, "No space left on device", str(path))
                qa.doc_cache.store.fault_hook = no_space
            try:  # the API ingests all the same and says why it was not saved (the CLI's ingest exits 2)
                doc = qa.ingest(DOC * 2)
                out["error"] = (f"not saved: {doc.stats.doc_cache_reason}"
                                if doc.stats.doc_cache == "not saved" and doc.stats.doc_cache_reason else None)
            except DocCacheError as e:
                out["error"] = str(e)
            store = DocStore(mount / "docs")
            out["partial_files_left"] = len(leftovers(mount))
            intact = 0
            for doc_id in before:
                store.verify(doc_id)
                intact += 1
            out["other_doccaches_intact"] = f"{intact}/{len(before)}"
    finally:
        if mounted:
            subprocess.run(["umount", str(mount)], capture_output=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20, help="random kill moments (the named phases come on top)")
    p.add_argument("--corruptions", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-full-disk", action="store_true", help="skip the full-disk case")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="doccache-rel-") as tmp:
        base = Path(tmp)
        with make_qa(base / "reference", doc_cache=False) as qa:
            reference = qa.ask(qa.ingest(DOC), QUESTION, max_new_tokens=NEW_TOKENS).token_ids
        print(f"DocCache reliability: random-weight smollm2-135m shape, {LAYERS} layers, "
              f"{len(DOC)}-byte document, KV spilling to DISK; seed {args.seed}", flush=True)
        k = kills(base / "kills", reference, args.kills, rng)
        print(f"1. kill -9 during ingest: {k['trials']} trials (6 named phases + {args.kills} random moments), "
              f"{k['killed']} killed; after restart: invalid DocCaches used {k['invalid_used']}, "
              f"leftovers {k['leftovers_after_restart']}, reused (hit) {k['hits_after']}; another document's "
              f"DocCache valid before the kill still verifies after it in {k['kept_valid']}/{k['kept_checked']} "
              f"trials, reported as hit by a new process at the end: {k['kept_hit_at_end']}", flush=True)
        c = corruptions(base / "corrupt", reference, args.corruptions, rng)
        print(f"2. single-byte corruptions: {c['corruptions']}; detected {c['detected']}; used {c['used']}", flush=True)
        cc = concurrent(base / "concurrent", reference)
        print(f"3. two concurrent ingests: statuses {cc['statuses']} (one build), both answers equal the "
              f"single-process answer: {cc['answers_equal_reference']}", flush=True)
        ok = (k["invalid_used"] == 0 and k["leftovers_after_restart"] == 0 and k["kept_valid"] == k["kept_checked"]
              and k["kept_hit_at_end"] and c["detected"] == c["corruptions"]
              and c["used"] == 0 and cc["statuses"] == ["hit", "miss"] and cc["answers_equal_reference"])
        if not args.no_full_disk:
            f = full_disk(base)
            print(f"4. full disk ({f['mode']}): error: {f['error']!r}; partial files left {f['partial_files_left']}; "
                  f"other DocCaches intact {f['other_doccaches_intact']}", flush=True)
            ok = ok and f["error"] is not None and f["partial_files_left"] == 0
    print("all counts as required" if ok else "FAILED: see the counts above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
