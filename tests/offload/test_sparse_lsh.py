"""LSH sampling decode (``sparse="lsh"``): the sequence's SimHash tables, the selector's byte
budget and the engine's attention over the sampled tokens.

The engine's attention is checked against an independent float64 computation: the exact
pieces' tokens and the sampled tokens read back from their tiers directly (not through the
reader), each sampled token weighted by scipy's binomial tail (``cpu_kernels.reference_lsh``).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.reference_lsh import inclusion_probability_ref
from offload.api import LongDocQA
from offload.attention.lsh import LshSelector, lsh_params
from offload.attention.quest import QuestSelector, fixed_pages
from offload.commands.cli import main
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.kv.page_table import LayerKind, cdiv
from offload.kv.read_sets import PieceKind
from offload.stats import RunStats
from tests.offload.test_cli import _err
from tests.offload.test_read_sets import PAGE, _page_kv
from tests.offload.test_sparse_quest import DOC, _engine, _prompt


def _reference(engine: Engine, seq, reads, q: torch.Tensor) -> torch.Tensor:
    """float64 attention of q [1, heads, hd]: exact over the dense pieces' tokens, importance
    weighted over the sample's tokens, merged by log-sum-exp."""
    cfg = engine.model_config
    nkv, group, hd = cfg.num_kv_heads, cfg.group_size, cfg.head_dim
    qh = q.reshape(nkv * group, hd).double()
    dense = sorted(p for piece in reads.pieces if piece.kind != PieceKind.SAMPLED for p in piece.page_ids)
    kvs = [_page_kv(engine, seq, reads.layer, p) for p in dense]
    k = torch.cat([k for k, _ in kvs], 1).double()
    v = torch.cat([v for _, v in kvs], 1).double()
    sample = reads.sample
    cand = sample.candidates
    mean = torch.from_numpy(sample.mean).double()
    pages: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # page -> its K, V read from its tier, once
    out = torch.empty(nkv * group, hd, dtype=torch.float64)
    for g in range(nkv * group):
        h = g // group
        logits = [engine.runner.scale * (k[h] @ qh[g])]
        values = [v[h]]
        toks = cand.tokens[g, :cand.count[g]]
        if len(toks):
            for p in {int(t) // PAGE for t in toks} - pages.keys():
                pages[p] = _page_kv(engine, seq, reads.layer, p)
            rows = [pages[int(t) // PAGE] for t in toks]
            ks = torch.stack([r[0][h, int(t) % PAGE] for r, t in zip(rows, toks)]).double()
            vs = torch.stack([r[1][h, int(t) % PAGE] for r, t in zip(rows, toks)]).double()
            centred = ks - mean[h]
            cos = (centred @ qh[g]) / (centred.norm(dim=1) * qh[g].norm())
            prob = inclusion_probability_ref(cos.numpy(), bits=sample.bits, tables=sample.tables,
                                             min_hits=sample.min_hits)
            logits.append(engine.runner.scale * (ks @ qh[g]) - torch.from_numpy(np.log(prob))
                          + torch.from_numpy(cand.log_factor[g, :cand.count[g]].astype(np.float64)))
            values.append(vs)
        w = torch.softmax(torch.cat(logits), dim=0)
        out[g] = w @ torch.cat(values)
    return out.reshape(1, -1)


def _run(engine: Engine, monkeypatch, *, new: int = 5, check_layer: int = 1):
    seq = engine.new_sequence()
    checks = []
    real_call = engine.decode_attention.__call__

    def attend(reads, q):
        out = real_call(reads, q)
        if reads.layer == check_layer and reads.sample is not None:
            checks.append((out, _reference(engine, seq, reads, q), reads))
        return out
    monkeypatch.setattr(type(engine.decode_attention), "__call__", lambda self, r, q: attend(r, q))
    stats = RunStats()
    tokens = list(engine.generate(seq, _prompt(DOC), max_new_tokens=new, stats=stats))
    return seq, tokens, stats, checks


@pytest.mark.parametrize("spill", [False, True], ids=["device", "device-host-disk"])
def test_lsh_attends_the_sampled_tokens_within_its_budget(tmp_path, monkeypatch, spill):
    """Pages spread over DEVICE, HOST and DISK (or all on DEVICE, where every candidate is in
    the same arena as the exact pages): every step's read fraction stays within F; the exact
    pieces are the sink, window and tail pages, and no sampled token lies in them (no token is
    counted twice); each checked step's attention equals the float64 reference over the exact
    pages and the sampled tokens read back from their tiers."""
    engine = _engine(tmp_path, sparse="lsh", budget=0.2, spill=spill)
    try:
        seq, _, stats, checks = _run(engine, monkeypatch)
        d = stats.to_dict()
        assert d["sparse"] == "lsh" and d["sparse_fallback"] == ""
        assert 0.02 < d["kv_fraction_read"] <= d["kv_fraction_read_max"] <= 0.2
        assert d["lsh_table_bytes"] == seq.lsh.nbytes() > 0
        assert d["key_bounds_bytes_read_per_token"] > 0  # the bucket ids walked
        assert len(checks) == 4
        tiers = set()
        for out, ref, reads in checks:
            torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
            dense = {p for piece in reads.pieces if piece.kind != PieceKind.SAMPLED for p in piece.page_ids}
            assert dense == set(fixed_pages(cdiv(reads.length, PAGE)))
            cand = reads.sample.candidates
            sampled = {int(t) // PAGE for g in range(len(cand.count)) for t in cand.tokens[g, :cand.count[g]]}
            assert sampled and not sampled & dense
            tiers.update(p.tier for p in reads.pieces if p.kind == PieceKind.SAMPLED)
            assert reads.sample.candidates.count.sum() > 0
        assert len(tiers) == (3 if spill else 1)
    finally:
        engine.close()


def test_the_same_lsh_seed_gives_the_same_tokens_and_another_seed_other_tables(tmp_path):
    runs = {}
    for name, seed, new in (("a", 5, 4), ("b", 5, 4), ("c", 6, 1)):
        engine = _engine(tmp_path / name, sparse="lsh", budget=0.2, lsh_seed=seed)
        try:
            seq = engine.new_sequence()
            runs[name] = (list(engine.generate(seq, _prompt(DOC), max_new_tokens=new)), seq.lsh.get(1).planes.copy())
        finally:
            engine.close()
    assert runs["a"][0] == runs["b"][0]
    np.testing.assert_array_equal(runs["a"][1], runs["b"][1])
    assert not np.array_equal(runs["a"][1], runs["c"][1])


def test_a_fork_leaves_the_documents_tables_as_they_were(tmp_path):
    engine = _engine(tmp_path, sparse="lsh", budget=0.2)
    try:
        doc = engine.new_sequence()
        engine.prefill(doc, _prompt(DOC))
        built = {layer: doc.lsh.get(layer).num_tokens for layer in engine.global_layers}
        child = engine.fork(doc)
        engine.prefill(child, _prompt(20))
        for t in range(3):
            engine.decode_step(child, t)
        for layer in engine.global_layers:
            assert doc.lsh.get(layer).num_tokens == built[layer] == DOC
            assert child.lsh.get(layer).num_tokens == DOC + 23
            assert child.lsh.get(layer).ids is doc.lsh.get(layer).ids  # built tables shared
            assert doc.lsh.get(layer).planes is doc.lsh.get(0).planes  # one seed, one set of planes
        engine.release(child)
    finally:
        engine.close()


def test_too_few_candidates_take_quests_pages():
    """Sixteen bits in each of two tables retrieve next to nothing: the layer takes Quest's
    pages at the same F, and it is counted."""
    from offload.kv.lsh_index import LshIndex

    class Seq:  # the parts of a KVSequence the selectors read
        pass

    rng = np.random.default_rng(0)
    n_tok, nkv, hd = 40 * 16, 1, 32
    keys = torch.from_numpy(rng.standard_normal((n_tok, nkv, hd)).astype(np.float32))
    seq = Seq()
    seq.lsh = LshIndex([0], lsh_params(seed=0, bits=16, tables=2))
    seq.lsh.add(0, 0, keys)
    seq.prior = {}
    seq.bounds = None
    quest = QuestSelector(budget=0.3, page_size=16, kinds=(LayerKind.GLOBAL,), scale=0.2, use_prior=False)
    sel = LshSelector(budget=0.3, page_size=16, kinds=(LayerKind.GLOBAL,), params=seq.lsh.params, row_bytes=2 * hd * 4,
                      num_kv_heads=nkv, quest=quest)
    calls = []
    quest.choose = lambda s, layer, *, length, query: calls.append(query) or quest_choice(length)

    def quest_choice(length):
        from offload.kv.reads import PageChoice
        return PageChoice(pages=(0, 5, cdiv(length, 16) - 1), needs_query=False)

    before = sel.choose(seq, 0, length=n_tok, query=None)
    assert before.needs_query and before.sampled == ()
    after = sel.choose(seq, 0, length=n_tok, query=torch.from_numpy(rng.standard_normal((1, 2, hd)).astype(np.float32)))
    assert after.pages == (0, 5, 39) and after.sample is None and sel.quest_fallbacks == 1


# ----- the interface -------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, message", [
    ({"lsh_seed": -1}, "lsh_seed takes an int >= 0"),
    ({"lsh_seed": 1.5}, "lsh_seed takes an int >= 0"),
    ({"lsh_bits": 0}, "lsh_bits must be an int in 1..16"),
    ({"lsh_bits": 17}, "lsh_bits must be an int in 1..16"),
    ({"lsh_tables": 1}, "lsh_tables must be an int in 2..1024"),
    ({"sparse": "lsh", "kv_format": "4bit"}, "kv_format='4bit' with it is not built yet"),
])
def test_lsh_fields_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        RuntimeConfig(**fields)


def test_the_cli_takes_sparse_lsh(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.\n")
    assert main(["ask", "--doc", str(doc), "--question", "q", "--sparse", "lsh", "--sparse-budget", "2",
                 "--cache-dir", str(tmp_path / "cache")]) == 2
    err = _err(capsys)
    assert "--sparse-budget must be a number in (0, 1]" in err and "invalid choice" not in err


@pytest.mark.slow  # two model loads and two prefills
def test_a_doc_cache_hit_answers_lsh_like_a_fresh_ingest(tmp_path):
    """A hit hashes the restored keys (the same values the fresh prefill hashed), so the same
    seed gives the same answer token for token."""
    text = " ".join(f"Locker {i} holds item {i * 7 % 1000}." for i in range(160))
    kw = dict(random_weights=True, num_layers=2, cache_dir=tmp_path)
    config = RuntimeConfig(sparse="lsh", sparse_budget=0.2, lsh_seed=3)
    with LongDocQA("smollm2-135m", config=RuntimeConfig(sparse="exact"), **kw) as qa:
        assert qa.ingest(text).stats.doc_cache == "miss"
    answers = {}
    for cached in (True, False):
        with LongDocQA("smollm2-135m", config=config, doc_cache=cached, **kw) as qa:
            doc = qa.ingest(text)
            assert doc.stats.doc_cache == ("hit" if cached else "")
            answers[cached] = qa.ask(doc, "What does locker 12 hold?", max_new_tokens=6)
    assert answers[True].token_ids == answers[False].token_ids
    assert answers[True].stats.kv_fraction_read_max <= 0.2 and answers[True].stats.lsh_table_bytes > 0
