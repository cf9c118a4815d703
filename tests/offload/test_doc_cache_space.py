"""A DocCache that cannot be saved is found before the prefill (issue 17, item 5).

The DocCache's size follows from the token count, so the cache limit and the free space are
checked before the prefill: ``offload ask`` answers anyway and says on one stderr line that
the document was not cached and why; ``offload ingest`` (whose only job is the DocCache) exits
2 before the prefill. A disk that fills up during the save keeps the prefill for the answer.
The CLI runs in process on the SmolLM2 checkpoint with random weights and two layers.
"""
from __future__ import annotations

import collections
import errno
import json
import shutil

import pytest

from offload.commands.cli import main
from offload.engine import Engine
from storage.doc_store import DocCacheNoSpace, DocStore, DocBuilder

NOTE = "offload: the document was not cached: "
Usage = collections.namedtuple("Usage", "total used free")


@pytest.fixture()
def run(smollm2_source, tmp_path, monkeypatch, capsys):
    """(command, *flags) -> (exit status, stdout, stderr lines, prefill token counts) of
    ``offload <command>`` on a ~200-token document with its own cache dir."""
    doc = tmp_path / "doc.txt"
    doc.write_text("The ferry leaves at seven. " * 30)
    calls: list[int] = []
    prefill = Engine.prefill

    def counted(self, seq, ids, **kw):
        calls.append(len(ids))
        return prefill(self, seq, ids, **kw)

    monkeypatch.setattr(Engine, "prefill", counted)
    common = ["--model", str(smollm2_source.tokenizer_dir), "--random-weights", "--num-layers", "2",
              "--cache-dir", str(tmp_path / "cache"), "--quiet", "--json", "--device", "cpu"]

    def go(command: str, *flags: str):
        calls.clear()
        where = ["--doc", str(doc), "--question", "When?", "--max-new-tokens", "4"] if command == "ask" else [str(doc)]
        status = main([command, *where, *common, *flags])
        out = capsys.readouterr()
        assert "Traceback" not in out.err
        return status, out.out, out.err.strip().splitlines(), list(calls)

    return go


def _saved(tmp_path) -> list:
    return DocStore(tmp_path / "cache" / "docs").list()


def _small_disk(monkeypatch, free: int) -> None:
    """The cache dir's file system reports ``free`` bytes free (the DocCache asks shutil)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 * free, 9 * free, free))


def test_ask_over_the_cache_limit_answers_and_says_why(run, tmp_path):
    status, out, err, prefills = run("ask", "--cache-limit", "1KiB")
    assert status == 0
    answer = json.loads(out)
    assert 1 <= len(answer["token_ids"]) <= 4
    assert answer["stats"]["ingest"]["doc_cache"] == "not saved"
    assert err == [NOTE + answer["stats"]["ingest"]["doc_cache_reason"]]
    assert "--cache-limit (cache_limit_bytes), 1.0 KiB" in err[0] and "--no-doc-cache" in err[0]
    assert "KiB" in err[0].split("(")[1] or "MiB" in err[0].split("(")[1]  # the document's size, in a unit
    assert len(prefills) == 2  # the document once, then the question: the prefill was used
    assert _saved(tmp_path) == []


def test_ingest_over_the_cache_limit_fails_before_the_prefill(run, tmp_path):
    status, out, err, prefills = run("ingest", "--cache-limit", "1KiB")
    assert status == 2 and out == ""
    assert len(err) == 1 and err[0].startswith("offload: error: the document's KV (")
    assert "exceeds --cache-limit (cache_limit_bytes), 1.0 KiB; raise it above" in err[0]
    assert prefills == [] and _saved(tmp_path) == []
    status, out, err, prefills = run("ingest")  # the default limit: saved
    assert status == 0 and json.loads(out)["stats"]["doc_cache"] == "miss" and len(_saved(tmp_path)) == 1


@pytest.mark.parametrize("limit, words", [(None, "exceeds the default DocCache limit, 16.0 KiB (25% of the "
                                                 "64.0 KiB free on the disk of"),
                                          pytest.param("1GiB", "does not fit the 64.0 KiB free on the disk of",
                                                       marks=pytest.mark.slow)])
def test_a_small_disk_is_found_before_the_prefill(run, tmp_path, monkeypatch, limit, words):
    _small_disk(monkeypatch, 64 * 2**10)
    flags = ["--cache-limit", limit] if limit else []
    status, out, err, prefills = run("ingest", *flags)
    assert status == 2 and prefills == [] and len(err) == 1 and words in err[0]
    status, out, err, prefills = run("ask", *flags)
    assert status == 0 and json.loads(out)["token_ids"]
    assert len(err) == 1 and err[0].startswith(NOTE) and words in err[0] and len(prefills) == 2
    assert _saved(tmp_path) == []


def test_a_disk_full_during_the_save_keeps_the_prefill(run, tmp_path, monkeypatch):
    """ENOSPC while writing (the space went between the check and the write): ask answers
    from the prefill it has and says why; ingest fails."""
    def full(self, layer, data):
        self.abort()
        raise DocCacheNoSpace(errno.ENOSPC, "no space left on the device while writing DocCache x")

    monkeypatch.setattr(DocBuilder, "write_pages", full)
    status, out, err, prefills = run("ask")
    assert status == 0 and json.loads(out)["token_ids"] and len(prefills) == 2
    assert err == [NOTE + "no space left on the device while writing DocCache x"]
    status, out, err, prefills = run("ingest")
    assert status == 2 and err == ["offload: error: no space left on the device while writing DocCache x"]
    assert _saved(tmp_path) == []


def test_the_api_ingests_without_saving_or_refuses_when_the_doc_cache_is_required(smollm2_source, tmp_path):
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig
    from offload.kv.doc_cache import DocCacheError

    with LongDocQA(str(smollm2_source.tokenizer_dir), config=RuntimeConfig(device="cpu"), cache_dir=tmp_path,
                   random_weights=True, num_layers=2, cache_limit_bytes=1024) as qa:
        with pytest.raises(DocCacheError, match=r"cache_limit_bytes\), 1.0 KiB"):
            qa.ingest("The ferry leaves at seven. " * 30, require_doc_cache=True)
        assert qa.engine.arena.num_used == 0  # before the prefill: nothing was held
        doc = qa.ingest("The ferry leaves at seven. " * 30)
        assert doc.stats.doc_cache == "not saved" and "cache_limit_bytes" in doc.stats.doc_cache_reason
        assert doc.stats.prefill_tokens == doc.num_tokens
        assert qa.ask(doc, "When?", max_new_tokens=2).token_ids
