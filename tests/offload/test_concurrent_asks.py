"""Processes sharing one cache dir: a second ask of a document says that it waits for the
first one's DocCache build; two asks about different documents under a --cache-limit that
holds only one of them both answer right (eviction respects the other's reader lock).

Subprocesses of `python -m offload`, so these are ``slow``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from storage.doc_store import DocStore

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ROUNDS = 4
STAGGER_S = 2.0  # round r starts the second process r * STAGGER_S seconds after the first

# Invented facts, each inside its own filler text, and the question that finds it.
FACTS = [("blue lighthouse", "7319"), ("red windmill", "4826")]
_TOWNS = ["Arnsby", "Coldmere", "Farrow Hill", "Lenton", "Marsk", "Oxbury", "Pellham", "Quarry End"]
_THINGS = ["bakery", "ferry", "library", "market", "orchard", "post office", "school", "tram"]


def _document(place: str, code: str, shift: int) -> str:
    """About 600 tokens of plain filler with one sentence holding ``code`` in its middle."""
    lines = [f"In {_TOWNS[(i + shift) % 8]}, the {_THINGS[(i * 3 + shift) % 8]} opens at {6 + (i + shift) % 5} "
             f"o'clock and closes at {16 + (i * 7 + shift) % 6} o'clock." for i in range(24)]
    lines.insert(12, f"The secret code of the {place} is {code}.")
    return "\n".join(lines) + "\n"


def _question(place: str) -> str:
    return f"What is the secret code of the {place}?"


def _offload(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "offload", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def _ask_args(model: Path, cache: Path, doc: Path, place: str, *extra: str) -> list[str]:
    return ["ask", "--doc", str(doc), "--question", _question(place), "--model", str(model), "--cache-dir",
            str(cache), "--device", "cpu", "--max-new-tokens", "24", "--json", "--quiet", *extra]


def _finish(proc: subprocess.Popen, timeout_s: float = 600) -> tuple[int, dict, str]:
    out, err = proc.communicate(timeout=timeout_s)
    result = json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 else {}
    return proc.returncode, result, err


@pytest.mark.slow  # two fresh interpreters load the real SmolLM2 each round: a few minutes
def test_two_processes_asking_about_different_documents_under_a_small_cache_limit(tmp_path, smollm2_source):
    model = Path(smollm2_source.weights_dir)
    docs = []
    for i, (place, code) in enumerate(FACTS):
        path = tmp_path / f"doc{i}.txt"
        path.write_text(_document(place, code, shift=3 * i))
        docs.append(path)
    # The right answers: each asked alone, from its prefill (a miss), which also measures the
    # DocCaches; then a limit that holds either alone, never both, and an empty store.
    cache = tmp_path / "shared"
    expected = []
    for doc, (place, code) in zip(docs, FACTS):
        rc, result, err = _finish(_offload(*_ask_args(model, cache, doc, place)))
        assert rc == 0, err
        assert result["stats"]["doc_cache"] == "miss"
        assert code in result["text"], result["text"]  # the model finds the fact
        expected.append(result["text"])
    store = DocStore(cache / "docs")
    infos = store.list()
    sizes = sorted(info.size_bytes for info in infos)
    assert len(sizes) == 2
    limit = sizes[1] + sizes[0] // 2
    for info in infos:
        assert store.remove(info.doc_id)
    print(f"\nlimit {limit} bytes (DocCaches of {sizes} bytes); expected answers {expected}")
    evictions = 0
    for r in range(ROUNDS):
        t0 = time.perf_counter()
        procs = []
        for i, (doc, (place, _)) in enumerate(zip(docs, FACTS)):
            if i:  # the second starts a little later each round: its steps meet the first's at other points
                time.sleep(STAGGER_S * r)
            procs.append(_offload(*_ask_args(model, cache, doc, place, "--cache-limit", str(limit))))
        done = [_finish(p) for p in procs]
        evicted = [len(d[1].get("stats", {}).get("ingest", {}).get("doc_cache_evicted", [])) for d in done]
        evictions += sum(evicted)
        print({"round": r, "seconds": round(time.perf_counter() - t0, 1), "status": [d[0] for d in done],
               "doc_cache": [d[1].get("stats", {}).get("doc_cache") for d in done], "evicted": evicted,
               "right": [d[1].get("text") == want for d, want in zip(done, expected)]})
        for rc, result, err in done:
            assert rc == 0 and "Traceback" not in err, err
        for (_, result, _), want in zip(done, expected):
            assert result["text"] == want
        store = DocStore(cache / "docs")
        for info in store.list():
            store.verify(info.doc_id)  # what survived is intact
    assert evictions > 0  # the limit did force evictions while the other process ran


@pytest.mark.slow  # a fresh interpreter, waiting on a lock this test holds
def test_an_ingest_waiting_for_another_build_says_so_on_stderr(tmp_path, capsys):
    """The lock of a document's build held elsewhere (here by this test, as another process
    building it would): `offload ingest` says on stderr that it waits, then builds once the
    lock is free."""
    import fcntl

    from offload.commands.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("The ferry leaves at seven. " * 30)
    common = ["--model", "smollm2-135m", "--random-weights", "--num-layers", "2", "--cache-dir", str(tmp_path),
              "--device", "cpu"]
    assert main(["ingest", str(doc), *common, "--quiet", "--json"]) == 0
    doc_id = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["doc_id"]
    assert main(["cache", "remove", doc_id, "--cache-dir", str(tmp_path)]) == 0
    store = DocStore(tmp_path / "docs")
    holder = os.open(store.lock_path(doc_id), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(holder, fcntl.LOCK_EX)
    err_path = tmp_path / "ingest.err"
    try:
        with open(err_path, "w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "offload", "ingest", str(doc), *common],
                                    stdout=subprocess.PIPE, stderr=err, text=True, env=ENV)
        deadline = time.monotonic() + 180
        while "waiting for another process" not in err_path.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.2)
        assert proc.poll() is None  # it waits
    finally:
        os.close(holder)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.strip().splitlines()[0] == doc_id
    lines = [line for line in err_path.read_text().splitlines() if "waiting for another process" in line]
    assert len(lines) == 1 and lines[0].startswith("offload: waiting") and doc_id[:12] in lines[0]
    assert "Traceback" not in err_path.read_text()
