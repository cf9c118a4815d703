"""Quest sparse decode: key bounds, the byte budget, the selector and the engine's accounting.

The bounds are checked against the stored keys read back from their tiers (not through the
bounds code); the selection's attention against the read-set reference of
``test_read_sets``; a sparse run on spilled pages against the same run on DEVICE.
"""
from __future__ import annotations

import types

import pytest
import torch

from offload.api import LongDocQA
from offload.attention.prompt_prior import PageMass
from offload.attention.quest import QuestSelector, fixed_pages, pages_within_budget, split_within_budget
from offload.commands.cli import main
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.kv.key_bounds import KeyBounds
from offload.kv.page_table import LayerKind, cdiv
from offload.kv.placement import Placement
from offload.model.model_source import ModelSource
from offload.stats import RunStats
from planner import HardwareProfile
from tests.offload.test_cli import _err
from tests.offload.test_read_sets import PAGE, _config, _page_kv, _reference
from tests.tolerances import TOL

MiB = 2**20
DOC = 130 * PAGE + 7  # 131 pages per layer


def _engine(tmp_path, *, sparse: str = "exact", budget: float = 0.2, spill: bool = False, **fields) -> Engine:
    placement = (Placement(device_pages=(30, 50, 10), host_pages=(50, 30, 60), delegated_share=(0.5, 1.0, 0.0))
                 if spill else None)
    config = RuntimeConfig(device="cpu", dtype=torch.float32, page_size=PAGE, device_memory_bytes=8 * MiB,
                           host_memory_bytes=12 * MiB if spill else None, disk_space_bytes=32 * MiB if spill else 0,
                           kv_dir=str(tmp_path), placement=placement, staging_chunk_pages=4, staging_buffers=2,
                           profile=HardwareProfile.preset("cpu-2core"), shuffle_pages_seed=3 if spill else None,
                           sparse=sparse, sparse_budget=budget, **fields)
    return Engine(ModelSource("tiny-quest", _config(), None, None), config)


def _prompt(n: int) -> list[int]:
    return [(i * 37 + 11) % 256 for i in range(n)]


# ----- key bounds ---------------------------------------------------------------------------------
def test_key_bounds_are_the_min_and_max_of_the_stored_keys(tmp_path):
    """Prefill in chunks, decode steps across a page boundary, then a fork that diverges: each
    page's bounds equal the min and max of its keys as the tiers hold them."""
    engine = _engine(tmp_path, spill=True)
    try:
        seq = engine.new_sequence()
        ids = _prompt(DOC)
        engine.prefill(seq, ids[:700])
        engine.prefill(seq, ids[700:])
        for t in range(10):  # crosses the page boundary at 131 * PAGE
            engine.decode_step(seq, t)
        child = engine.fork(seq)
        for t in range(3):
            engine.decode_step(child, 100 + t)
        for s in (seq, child):
            for layer in range(engine.model_config.num_layers):
                lo, hi = s.bounds.get(layer)
                n = cdiv(s.lengths[layer], PAGE)
                assert lo.shape[1] == n
                # The first pages, both prefill chunks' seam (page 43), a sample, the decode pages.
                for p in sorted({0, 1, 43, 44, *range(5, n - 3, 17), n - 3, n - 2, n - 1}):
                    k, _ = _page_kv(engine, s, layer, p)  # [nkv, tokens, hd] read from its tier
                    torch.testing.assert_close(lo[:, p], k.amin(dim=1), rtol=0, atol=0)
                    torch.testing.assert_close(hi[:, p], k.amax(dim=1), rtol=0, atol=0)
        assert child.lengths[0] == seq.lengths[0] + 3
    finally:
        engine.close()


def test_key_bounds_refuse_keys_out_of_order():
    b = KeyBounds([0], num_layers=1, num_kv_heads=1, head_dim=4, page_size=4, dtype=torch.float32,
                  device=torch.device("cpu"))
    b.update(0, 0, torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match="keys arrive in order"):
        b.update(0, 5, torch.randn(1, 1, 4))


# ----- the budget ---------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0.05, 0.1, 0.2, 0.5, 0.99])
@pytest.mark.parametrize("page_size", [16, 32, 64])
def test_pages_within_budget_never_exceed_it(budget, page_size):
    for n in range(1, 3000, 7):
        allowed, why = pages_within_budget(n, budget, page_size)
        fixed = len(fixed_pages(n))
        if allowed is None:
            assert why
            continue
        # Pages attended plus the candidates' bounds stay within F of the layer's pages.
        assert allowed + (n - fixed) / page_size <= budget * n + 1e-9
        assert fixed < allowed < n


def test_budget_falls_back_with_its_reason():
    assert pages_within_budget(100, 1.0, 32)[1].startswith("the budget covers every page")
    assert pages_within_budget(64, 0.1, 32)[1].startswith("too few pages to choose from")
    assert pages_within_budget(256, 0.1, 32) == (17, "")


# ----- the selector --------------------------------------------------------------------------------
def test_quest_chooses_the_page_holding_the_querys_key():
    """Keys are random except one token of one page, which equals the query: that page's bound
    is the highest, and the selection holds it, the fixed pages and exactly the allowed count."""
    torch.manual_seed(0)
    nkv, group, hd, ps, n = 2, 3, 16, 16, 300
    keys = torch.randn(n * ps, nkv, hd) * 0.3
    q = torch.randn(1, nkv * group, hd)
    planted = 157
    keys[planted * ps + 5, 1] = q[0, group] * 4  # KV head 1's first query head
    bounds = KeyBounds([0], num_layers=1, num_kv_heads=nkv, head_dim=hd, page_size=ps, dtype=torch.float32,
                       device=torch.device("cpu"))
    bounds.update(0, 0, keys)
    seq = types.SimpleNamespace(bounds=bounds, prior={})
    sel = QuestSelector(budget=0.1, page_size=ps, kinds=(LayerKind.GLOBAL,), scale=hd ** -0.5)
    ahead = sel.choose(seq, 0, length=n * ps, query=None)
    assert ahead.needs_query and list(ahead.pages) == fixed_pages(n)
    final = sel.choose(seq, 0, length=n * ps, query=q)
    allowed, _ = pages_within_budget(n, 0.1, ps)
    assert planted in final.pages and set(fixed_pages(n)) <= set(final.pages)
    assert len(final.pages) == allowed and list(final.pages) == sorted(set(final.pages))
    assert sel.bounds_bytes == (n - len(fixed_pages(n))) * bounds.page_bytes and sel.selection_s > 0


def test_without_a_prior_every_candidate_is_scanned():
    torch.manual_seed(1)
    n, ps = 200, 16
    bounds = KeyBounds([0], num_layers=1, num_kv_heads=2, head_dim=16, page_size=ps, dtype=torch.float32,
                       device=torch.device("cpu"))
    bounds.update(0, 0, torch.randn(n * ps, 2, 16))
    sel = QuestSelector(budget=0.2, page_size=ps, kinds=(LayerKind.GLOBAL,), scale=0.25, use_prior=False)
    choice = sel.choose(types.SimpleNamespace(bounds=bounds, prior={0: torch.rand(n)}), 0, length=n * ps,
                        query=torch.randn(1, 4, 16))
    assert len(choice.pages) == pages_within_budget(n, 0.2, ps)[0]
    assert sel.bounds_bytes == (n - len(fixed_pages(n))) * bounds.page_bytes


@pytest.mark.parametrize("prefetch_pool", [True, False], ids=["pool-ahead", "pool-on-demand"])
def test_with_a_prior_its_best_pages_are_read_ahead_and_the_rest_chosen_by_bounds_over_a_pool(prefetch_pool):
    """The prior's best pages are known before the query; so is the pool the query chooses the
    rest from, read ahead whole with ``prefetch_pool`` (the query then only drops pages)."""
    torch.manual_seed(2)
    n, ps = 200, 16
    bounds = KeyBounds([0], num_layers=1, num_kv_heads=2, head_dim=16, page_size=ps, dtype=torch.float32,
                       device=torch.device("cpu"))
    keys = torch.randn(n * ps, 2, 16) * 0.3
    q = torch.randn(1, 4, 16)
    keys[150 * ps + 3, 0] = q[0, 0] * 4  # a page the prior ranks low but the live query needs
    bounds.update(0, 0, keys)
    prior = torch.linspace(0.001, 0.002, 190)
    prior[[7, 50, 90, 120]] = torch.tensor([0.4, 0.3, 0.2, 0.1])  # pages 190.. are newer than the prompt
    prior[150] = 0.0019  # among the prior's next best: in the scanned pool
    sel = QuestSelector(budget=0.2, page_size=ps, kinds=(LayerKind.GLOBAL,), scale=0.25, prefetch_pool=prefetch_pool)
    seq = types.SimpleNamespace(bounds=bounds, prior={0: prior})
    by_prior, live, scan = split_within_budget(n, 0.2, ps)
    assert by_prior == round(0.75 * (by_prior + live)) and scan == 2 * live
    assert len(fixed_pages(n)) + by_prior + live + scan / ps <= 0.2 * n
    ahead = sel.choose(seq, 0, length=n * ps, query=None)
    assert ahead.needs_query and {7, 50, 90, 120} <= set(ahead.pages)
    # the prior's pages are known before the query (and the pool, when read ahead)
    assert len(ahead.pages) == len(fixed_pages(n)) + by_prior + (scan if prefetch_pool else 0)
    scanned = []
    real = sel._bound_scores
    sel._bound_scores = lambda q_, lo, hi, cand: (scanned.append(cand.tolist()), real(q_, lo, hi, cand))[1]
    final = sel.choose(seq, 0, length=n * ps, query=q)
    assert len(scanned[0]) == scan and set(range(190, n - 3)) <= set(scanned[0])  # newer pages: always scanned
    if prefetch_pool:
        assert set(scanned[0]) <= set(ahead.pages) and set(final.pages) <= set(ahead.pages)
        assert len(set(ahead.pages) - set(final.pages)) == scan - live  # read ahead, not attended
    else:
        assert not set(scanned[0]) & set(ahead.pages)
        assert set(ahead.pages) <= set(final.pages)
    assert 150 in final.pages
    assert len(final.pages) == len(fixed_pages(n)) + by_prior + live
    assert sel.bounds_bytes == scan * bounds.page_bytes


def test_a_budget_too_small_to_scan_every_bound_still_chooses_by_the_prior():
    """At 4K tokens (128 pages) F = 0.05 leaves 6.4 pages: classic Quest, which pays every
    candidate's bounds, must fall back to exact; with a prior the step attends the fixed pages
    and the prior's best within F, and asks no query."""
    n, ps = 128, 32
    assert pages_within_budget(n, 0.05, ps)[0] is None
    prior = torch.full((n,), 0.001)
    prior[[40, 77, 90]] = torch.tensor([0.3, 0.5, 0.1])
    sel = QuestSelector(budget=0.05, page_size=ps, kinds=(LayerKind.GLOBAL,), scale=1.0)
    choice = sel.choose(types.SimpleNamespace(bounds=None, prior={0: prior}), 0, length=n * ps, query=None)
    assert choice.pages == tuple(sorted({*fixed_pages(n), 77, 40})) and not choice.needs_query
    assert len(choice.pages) <= 0.05 * n and sel.fallback == ""
    classic = QuestSelector(budget=0.05, page_size=ps, kinds=(LayerKind.GLOBAL,), scale=1.0, use_prior=False)
    assert classic.choose(types.SimpleNamespace(bounds=None, prior={0: prior}), 0, length=n * ps,
                          query=None).pages is None
    assert classic.fallback.startswith("too few pages to choose from")


def test_page_mass_is_the_share_of_attention_per_page():
    """Streamed over pieces cut off page boundaries, against softmax over all keys at once."""
    torch.manual_seed(3)
    nkv, group, m, hd, ps, t = 2, 3, 5, 8, 4, 37
    qg, k = torch.randn(nkv, group, m, hd), torch.randn(nkv, t, hd)
    q_pos = torch.arange(t - m, t)
    mass = PageMass(qg, q_pos, scale=0.3, page_size=ps, num_pages=cdiv(t, ps))
    for a, b in ((0, 6), (6, 19), (19, 30), (30, t)):
        mass.add(k[:, a:b], a)
    s = torch.einsum("hgmd,hkd->hgmk", qg, k) * 0.3
    s.masked_fill_(torch.arange(t)[None, :] > q_pos[:, None], float("-inf"))
    w = torch.softmax(s, -1)
    w = torch.cat([w, torch.zeros(nkv, group, m, cdiv(t, ps) * ps - t)], -1).reshape(nkv, group, m, -1, ps).sum(-1)
    want = w.reshape(nkv * group, m, -1).amax(0).mean(0)
    torch.testing.assert_close(mass.result(), want, atol=1e-6, rtol=1e-5)


def test_the_engine_keeps_the_prompt_prior_in_a_sparse_mode_only(tmp_path):
    for sparse in ("exact", "quest"):
        engine = _engine(tmp_path / sparse, sparse=sparse)
        try:
            seq = engine.new_sequence()
            engine.prefill(seq, _prompt(300))
            if sparse == "exact":
                assert seq.prior == {}
                continue
            assert sorted(seq.prior) == list(range(engine.model_config.num_layers))
            for prior in seq.prior.values():
                # Shares maxed over heads: at least one query's whole attention, each page at most all of it.
                assert prior.shape == (cdiv(300, PAGE),) and float(prior.sum()) > 0.99 and float(prior.max()) <= 1
            child = engine.fork(seq)
            engine.prefill(child, _prompt(40))  # a question: its own prior replaces the document's
            assert child.prior[0].shape == (cdiv(340, PAGE),) and seq.prior[0].shape == (cdiv(300, PAGE),)
        finally:
            engine.close()


def test_sliding_layers_are_not_selected():
    sel = QuestSelector(budget=0.1, page_size=16, kinds=(LayerKind.SLIDING,), scale=1.0)
    choice = sel.choose(types.SimpleNamespace(bounds=None), 0, length=100000, query=None)
    assert choice.pages is None and not choice.needs_query


# ----- the engine ----------------------------------------------------------------------------------
def _run(engine: Engine, new: int = 8, *, check_layer: int | None = None, monkeypatch=None):
    seq = engine.new_sequence()
    checks = []
    if check_layer is not None:  # attention over the chosen pages against an independent reference
        real_call = engine.decode_attention.__call__

        def attend(reads, q):
            out = real_call(reads, q)
            if reads.layer == check_layer:
                checks.append((out, _reference(engine, seq, reads.layer, tuple(reads.pages()), q)))
            return out
        monkeypatch.setattr(type(engine.decode_attention), "__call__", lambda self, r, q: attend(r, q))
    stats = RunStats()
    logits: list[torch.Tensor] = []
    tokens = list(engine.generate(seq, _prompt(DOC), max_new_tokens=new, stats=stats, record_logits=logits))
    return tokens, stats, logits, checks


def test_quest_reads_within_its_budget_and_attends_what_it_chose(tmp_path, monkeypatch):
    engine = _engine(tmp_path, sparse="quest", budget=0.2)
    try:
        _, stats, _, checks = _run(engine, check_layer=1, monkeypatch=monkeypatch)
        d = stats.to_dict()
        assert d["sparse"] == "quest" and d["sparse_budget"] == 0.2 and d["sparse_fallback"] == ""
        assert 0.15 < d["kv_fraction_read"] <= d["kv_fraction_read_max"] <= 0.2
        n = cdiv(DOC + 7, PAGE)
        # With the prompt prior: the fixed pages, the prior's best, and the live bounds' best of a pool.
        by_prior, take, scanned = split_within_budget(n, 0.2, PAGE)
        assert d["selected_pages_per_layer"] == len(fixed_pages(n)) + by_prior + take
        assert d["key_bounds_bytes_read_per_token"] == scanned * engine.model_config.num_layers * 2 * 2 * 16 * 4
        assert d["key_bounds_bytes_read_per_token"] > 0 and d["selection_s"] > 0
        assert checks
        for out, ref in checks:
            torch.testing.assert_close(out.double(), ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    finally:
        engine.close()


def test_quest_on_spilled_pages_matches_quest_on_device(tmp_path):
    """The selection depends on the keys, not on where the pages lie: spread over DEVICE, HOST
    and DISK, the same tokens come out, and the HOST/DISK pages read are counted as fetched."""
    runs = {}
    for spill in (False, True):
        engine = _engine(tmp_path / str(spill), sparse="quest", budget=0.2, spill=spill)
        try:
            runs[spill] = _run(engine)
        finally:
            engine.close()
    (tok_d, stats_d, logits_d, _), (tok_s, stats_s, logits_s, _) = runs[False], runs[True]
    assert tok_d == tok_s
    for a, b in zip(logits_d, logits_s):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert stats_s.kv_fraction_read == pytest.approx(stats_d.kv_fraction_read)
    # The live pool is read ahead whole: no chosen page waits for an on-demand read, the pool's
    # pages the query left are fetched and not attended (within 1.5 F).
    assert stats_d.kv_fraction_fetched == 0.0 and 0 < stats_s.kv_fraction_fetched <= 1.5 * 0.2
    assert stats_s.sync_miss_bytes_per_token == 0 and stats_s.wasted_prefetch_bytes_per_token > 0


def test_a_budget_covering_every_page_is_exact(tmp_path):
    runs = {}
    for sparse in ("exact", "quest"):
        engine = _engine(tmp_path / sparse, sparse=sparse, budget=1.0)
        try:
            runs[sparse] = _run(engine, new=4)
        finally:
            engine.close()
    assert runs["quest"][0] == runs["exact"][0]
    for a, b in zip(runs["quest"][2], runs["exact"][2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    stats = runs["quest"][1]
    assert stats.kv_fraction_read == stats.kv_fraction_read_max == 1.0
    assert "the budget covers every page" in stats.sparse_fallback
    assert runs["exact"][1].kv_fraction_read == 1.0 and runs["exact"][1].sparse_fallback == ""


def test_no_decode_step_leaves_the_fractions_null(tmp_path):
    engine = _engine(tmp_path, sparse="quest")
    try:
        _, stats, _, _ = _run(engine, new=1)
        assert stats.to_dict()["kv_fraction_read"] is None and stats.kv_fraction_read_max is None
    finally:
        engine.close()


@pytest.mark.slow  # three model loads and two prefills: about 15 s
@pytest.mark.parametrize("mode", ["quest", "speculative"])
def test_a_doc_cache_written_in_exact_mode_answers_quest_like_a_fresh_ingest(tmp_path, mode):
    """The DocCache holds pages only; a hit derives the bounds from its verified keys, so a
    sparse answer after an exact ingest's DocCache equals one after a fresh ingest in that mode."""
    text = " ".join(f"Locker {i} holds item {i * 7 % 1000}." for i in range(160))
    kw = dict(random_weights=True, num_layers=2, cache_dir=tmp_path)
    with LongDocQA("smollm2-135m", config=RuntimeConfig(sparse="exact"), **kw) as qa:
        assert qa.ingest(text).stats.doc_cache == "miss"
    answers = {}
    for cached in (True, False):
        with LongDocQA("smollm2-135m", config=RuntimeConfig(sparse=mode, sparse_budget=0.2), doc_cache=cached,
                       **kw) as qa:
            doc = qa.ingest(text)
            assert doc.stats.doc_cache == ("hit" if cached else "")
            answers[cached] = qa.ask(doc, "What does locker 12 hold?", max_new_tokens=6)
    assert answers[True].token_ids == answers[False].token_ids
    assert answers[True].stats.kv_fraction_read_max <= 0.2 and not answers[True].stats.sparse_fallback


# ----- the interface -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), float("inf"), "0.1", True])
def test_a_budget_outside_0_1_is_a_value_error(value):
    with pytest.raises(ValueError, match=r"sparse_budget must be a number in \(0, 1\]"):
        RuntimeConfig(sparse="quest", sparse_budget=value)


def test_unknown_modes_are_refused():
    with pytest.raises(ValueError, match="sparse must be one of exact, quest, speculative"):
        RuntimeConfig(sparse="sparse")
    assert RuntimeConfig().sparse.value == "exact" and RuntimeConfig().sparse_budget == 0.1


@pytest.mark.parametrize("command", ["ask", "generate", "ingest"])
@pytest.mark.parametrize("flags, message", [
    (["--sparse-budget", "0.2"], "--sparse-budget applies to a sparse mode; add --sparse quest"),
    (["--sparse", "exact", "--sparse-budget", "0.2"], "--sparse-budget applies to a sparse mode"),
    (["--sparse", "quest", "--sparse-budget", "0"], r"--sparse-budget must be a number in (0, 1]"),
    (["--sparse", "quest", "--sparse-budget", "2"], r"--sparse-budget must be a number in (0, 1]"),
    (["--sparse", "lsh-x"], "argument --sparse: invalid choice"),
    (["--sparse-cache", "64MiB"], "--sparse-cache keeps the DISK pages a sparse step read; add --sparse quest"),
    (["--sparse", "quest", "--sparse-cache", "lots"], "--sparse-cache 'lots' is not a size"),
])
def test_cli_sparse_flags_are_checked_before_the_model_loads(tmp_path, capsys, command, flags, message):
    doc = tmp_path / "doc.txt"
    doc.write_text("A short document.\n")
    argv = {"ask": ["ask", "--doc", str(doc), "--question", "q"], "generate": ["generate", "--prompt-file", str(doc)],
            "ingest": ["ingest", str(doc)]}[command]
    assert main([*argv, *flags, "--cache-dir", str(tmp_path / "cache")]) == 2
    assert message in _err(capsys)
    assert not (tmp_path / "cache" / "models").exists()  # refused before any model work


def test_bench_checks_its_sparse_flags_first(capsys):
    from offload.commands.bench import main as bench_main

    assert bench_main(["--sparse-budget", "0.2", "--no-hf", "--quiet"]) == 2
    assert "--sparse-budget applies to a sparse mode" in capsys.readouterr().err
    assert bench_main(["--sparse", "quest", "--sparse-budget", "0", "--no-hf", "--quiet"]) == 2
    assert "--sparse-budget must be a number in (0, 1]" in capsys.readouterr().err
    assert bench_main(["--sparse-cache", "64MiB", "--no-hf", "--quiet"]) == 2
    assert "--sparse-cache keeps the DISK pages a sparse step read" in capsys.readouterr().err
