"""Speculative sparse decode: the calibration's channel choice, the predicted query, and the
engine's one-layer-ahead reads against Quest's choice with the real query.

The predicted query is checked against the runner's own ``qkv`` (the reference); the engine
run against the Quest selector with the same budget split (the final sets must be the same
pages, so the same tokens), on pages spread over DEVICE, HOST and DISK.
"""
from __future__ import annotations

import types

import pytest
import torch

from offload.attention import speculative
from offload.attention.quest import QuestSelector
from offload.attention.speculative import QueryPredictor, SpeculativeSelector, kept_pairs, pair_importance
from offload.config import RuntimeConfig
from offload.model.model_source import ModelSource
from offload.stats import RunStats
from tests.offload.test_read_sets import PAGE
from tests.offload.test_sparse_quest import DOC, _engine, _prompt


def test_pair_importance_is_mean_q_pair_norm_times_mean_k_pair_norm():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 4, 8, generator=g), torch.randn(5, 2, 8, generator=g)
    got = pair_importance(q, k, group_size=2)
    for kv in range(2):
        for j in range(4):
            qn = sum(float(torch.hypot(q[t, h, j], q[t, h, j + 4])) for t in range(5) for h in (2 * kv, 2 * kv + 1)) / 5
            kn = sum(float(torch.hypot(k[t, kv, j], k[t, kv, j + 4])) for t in range(5)) / 5
            assert got[kv, j].item() == pytest.approx(qn * kn, rel=1e-5)


def test_calibration_keeps_whole_rope_pairs_of_the_strongest_channels(tmp_path):
    engine = _engine(tmp_path)
    try:
        cfg = engine.model_config
        half, pairs = cfg.head_dim // 2, kept_pairs(cfg.head_dim)
        kept = speculative.calibrate(engine, ModelSource("tiny", cfg, None, None), pairs=pairs, tokens=300)
        assert sorted(kept) == list(range(cfg.num_layers)) and engine.arena.num_used == 0  # released
        for per_kv in kept.values():
            assert len(per_kv) == cfg.num_kv_heads
            for chans in per_kv:
                low = [c for c in chans if c < half]
                assert len(low) == pairs and sorted(chans) == sorted([*low, *(c + half for c in low)])
    finally:
        engine.close()


def test_the_predicted_query_is_the_layers_own_query_in_the_kept_channels(tmp_path):
    """Predicting a layer from its own input gives its real query in the kept channels and zero
    elsewhere (the sliced query weights and RoPE per pair, against the runner's full ``qkv``)."""
    engine = _engine(tmp_path)
    try:
        cfg, runner = engine.model_config, engine.runner
        g = torch.Generator().manual_seed(1)
        channels = {layer: [sorted(torch.randperm(cfg.head_dim // 2, generator=g)[:2].tolist()) for _ in
                            range(cfg.num_kv_heads)] for layer in range(cfg.num_layers)}
        channels = {layer: [[*c, *(x + cfg.head_dim // 2 for x in c)] for c in per] for layer, per in channels.items()}
        numpy_path = QueryPredictor(runner, channels, group_size=cfg.group_size, head_dim=cfg.head_dim)
        torch_path = QueryPredictor(runner, channels, group_size=cfg.group_size, head_dim=cfg.head_dim)
        torch_path._numpy.clear()  # the path CUDA and other dtypes take
        # The Llama runner takes the sliced paths (numpy on a CPU in fp32).
        assert set(numpy_path._numpy) == set(torch_path._sliced) == set(channels)
        h = torch.randn(1, cfg.hidden_size, generator=g)
        for pos in (torch.tensor([777]), torch.tensor([3])):
            for layer in range(cfg.num_layers):
                q = runner.qkv(layer, h, pos)[0]  # [1, nq, hd]
                mask = numpy_path.masks[layer]
                assert int(mask.sum()) == cfg.num_heads * 4
                for pred in (numpy_path, torch_path):
                    got = pred.query(layer, h, pos)
                    torch.testing.assert_close(got[0][mask], q[0][mask], rtol=1e-5, atol=1e-6)
                    assert torch.count_nonzero(got[0][~mask]) == 0
    finally:
        engine.close()


def _run(engine, new: int = 6):
    seq = engine.new_sequence()
    stats = RunStats()
    logits: list[torch.Tensor] = []
    tokens = list(engine.generate(seq, _prompt(DOC), max_new_tokens=new, stats=stats, record_logits=logits))
    return tokens, stats, logits


def _speculative(engine, **kw) -> SpeculativeSelector:
    cfg = engine.model_config
    channels = speculative.calibrate(engine, ModelSource("tiny", cfg, None, None), pairs=kept_pairs(cfg.head_dim),
                                     tokens=300)
    return SpeculativeSelector(budget=engine.config.sparse_budget, page_size=PAGE, kinds=engine.kv.kinds,
                               scale=engine.runner.scale, **kw,
                               predictor=QueryPredictor(engine.runner, channels, group_size=cfg.group_size,
                                                        head_dim=cfg.head_dim))


@pytest.mark.parametrize("use_prior", [True, False])
def test_speculation_attends_quests_pages_and_reads_fewer_ahead(tmp_path, use_prior):
    """Same pages as Quest with the same split (its pool's bounds paid twice): same tokens and
    logits, on pages spread over DEVICE, HOST and DISK. The prediction is read ahead one layer
    before; what it missed is read on demand and counted; with the prior, the pool is not
    read whole, so fewer bytes are fetched than Quest's whole-pool read-ahead."""
    runs = {}
    for mode in ("quest", "speculative"):
        engine = _engine(tmp_path / mode, sparse="quest", budget=0.2, spill=True)
        try:
            if mode == "speculative":
                engine.selector = _speculative(engine, use_prior=use_prior)
            else:
                engine.selector = QuestSelector(budget=0.2, page_size=PAGE, kinds=engine.kv.kinds,
                                                scale=engine.runner.scale, use_prior=use_prior)
                engine.selector.scans = 2
            runs[mode] = _run(engine)
            runs[mode] += (engine.kv.reader.readahead.unplanned,)
        finally:
            engine.close()
    (tok_q, stats_q, logits_q, _), (tok_s, stats_s, logits_s, unplanned) = runs["quest"], runs["speculative"]
    assert tok_s == tok_q
    for a, b in zip(logits_s, logits_q):  # the same pages, in other pieces (merged in another order)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The pool's bounds are scanned twice (prediction, live query), both paid from F.
    assert stats_s.key_bounds_bytes_read_per_token == 2 * stats_q.key_bounds_bytes_read_per_token > 0
    assert stats_s.kv_fraction_read > stats_q.kv_fraction_read
    assert stats_s.kv_fraction_read_max <= 0.2
    assert stats_s.sparse == "speculative" or stats_s.sparse == "quest"  # the engine was built as quest
    rate = stats_s.speculation_hit_rate
    assert rate is not None and 0.0 <= rate <= 1.0 and stats_q.speculation_hit_rate is None
    assert unplanned == 0  # the one-layer-ahead sets join the plan in order: no read falls out of it
    if use_prior:  # Quest reads its whole pool ahead; speculation only the predicted part
        assert stats_q.sync_miss_bytes_per_token == 0
        assert stats_s.kv_fraction_fetched < stats_q.kv_fraction_fetched
    else:  # classic Quest names its pages only once the query exists: all on demand
        assert stats_q.sync_miss_bytes_per_token > stats_s.sync_miss_bytes_per_token
    if rate == 1.0:
        assert stats_s.sync_miss_bytes_per_token == 0


def test_the_engine_builds_a_calibrated_speculative_selector(tmp_path):
    engine = _engine(tmp_path, sparse="speculative", budget=0.2, spill=True)
    try:
        assert isinstance(engine.selector, SpeculativeSelector)
        tokens, stats, _ = _run(engine, new=3)
        assert len(tokens) == 3 and stats.sparse == "speculative" and stats.speculation_hit_rate is not None
        assert stats.kv_fraction_read_max <= 0.2
    finally:
        engine.close()


def test_the_calibration_is_cached_per_checkpoint_and_said_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "cache"))
    calls = []

    def fake(engine, source, *, pairs, tokens=speculative.CALIBRATION_TOKENS):
        calls.append(pairs)
        return {0: [[0, 2]], 2: [[1, 3]]}

    monkeypatch.setattr(speculative, "calibrate", fake)
    engine = types.SimpleNamespace(model_config=types.SimpleNamespace(head_dim=4))
    source = ModelSource("m", None, tmp_path / "models" / "m-0123", None)
    first = speculative.load_or_calibrate(engine, source, pairs=1)
    assert "calibrating the speculative query channels of m" in capsys.readouterr().err
    again = speculative.load_or_calibrate(engine, source, pairs=1)
    assert first == again == {0: [[0, 2]], 2: [[1, 3]]} and calls == [1]
    assert capsys.readouterr().err == ""
    speculative.load_or_calibrate(engine, source, pairs=2)  # another pair count: its own calibration
    (tmp_path / "cache" / "calibration" / "speculative-m-0123-p1.json").write_text("{not json")
    speculative.load_or_calibrate(engine, source, pairs=1)  # a damaged file: calibrated again
    assert calls == [1, 2, 1]
    random_weights = ModelSource("r", None, None, None)
    speculative.load_or_calibrate(engine, random_weights, pairs=1)
    speculative.load_or_calibrate(engine, random_weights, pairs=1)  # no checkpoint: nothing cached
    assert calls == [1, 2, 1, 1, 1]


def test_gemma3_predicts_from_its_full_query_and_attends_quests_pages(tmp_path):
    """Gemma 3 normalises each query head over all its channels: the predictor computes the
    whole query and keeps the calibrated channels; sliding layers are never speculated; the
    tokens equal Quest's at the same split."""
    from offload.model.gemma3 import Gemma3Config
    from tests.offload.test_gemma3_runner import SMALL

    cfg = Gemma3Config.from_hf({"model_type": "gemma3_text", **SMALL, "max_position_embeddings": 4096})
    source = ModelSource("tiny-gemma", cfg, None, None)
    ids = [(i * 29 + 5) % cfg.vocab_size for i in range(1500)]
    runs = {}
    for mode in ("quest", "speculative"):
        config = RuntimeConfig(device="cpu", dtype=torch.float32, page_size=16, device_memory_bytes=8 * 2**20,
                               kv_dir=str(tmp_path / mode), sparse=mode, sparse_budget=0.3)
        from offload.engine import Engine

        engine = Engine(source, config)
        try:
            if mode == "quest":
                engine.selector.scans = 2
            else:
                pred = engine.selector.predictor
                assert not pred._sliced and set(pred.masks) == set(cfg.global_layers)
                layer = cfg.global_layers[0]
                h, pos = torch.randn(1, cfg.hidden_size), torch.tensor([99])
                q = engine.runner.qkv(layer, h, pos)[0]
                mask = pred.masks[layer]
                torch.testing.assert_close(pred.query(layer, h, pos), q * mask, rtol=0, atol=0)
            stats = RunStats()
            toks = list(engine.generate(engine.new_sequence(), ids, max_new_tokens=5, stats=stats))
            runs[mode] = (toks, stats)
        finally:
            engine.close()
    assert runs["speculative"][0] == runs["quest"][0]
    stats = runs["speculative"][1]
    assert stats.speculation_hit_rate is not None and not stats.sparse_fallback


def test_the_calibration_never_reads_a_qa_essay():
    """The QA set's documents are made of the first ``QA_ESSAYS`` essays (name order); the
    calibration text starts after them, from the essays the product ships."""
    from bench.qa_set import QA_ESSAYS
    from offload.commands.needle import package_essays_dir

    assert speculative.FIRST_CALIBRATION_ESSAY == QA_ESSAYS
    names = sorted(p.name for p in package_essays_dir().glob("*.txt"))
    assert len(names) > QA_ESSAYS  # essays are left to calibrate on
