"""KVPR (``offload.kv.kvpr``): HOST pages that keep the layer's input activations and have
their K/V recomputed when read give transformers' tokens on a tiny random MHA model, move
half the HOST bytes there, and are refused (or skipped by "auto") where they cannot pay."""
from __future__ import annotations

import pytest
import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.errors import InputError
from offload.kv.placement import Placement
from offload.model.model_source import resolve_model
from offload.tuning.planning import engine_problem, plan_placement
from planner import HardwareProfile, plan
from storage import Tier
from tests.offload.arch_pairs import hf_greedy, hf_logits, ours_teacher_forced, save_tiny
from tests.tolerances import MODEL_LOGITS_FP32_ATOL

MHA = dict(num_key_value_heads=8, head_dim=8)  # 8 query and 8 KV heads of 8: hidden 64 = K (or V) per token
NEW_TOKENS = 16


def _engine(folder, share: float, **kw) -> Engine:
    """Page 0 on DEVICE, every other full page on HOST, ``share`` of them kept as activations."""
    config = dict(device="cpu", dtype=torch.float32, device_memory_bytes=64 * 2**20, page_size=16,
                  prefill_chunk_tokens=128, host_memory_bytes=16 * 2**20, recompute="kvpr",
                  placement=Placement(device_pages=1, host_pages=None, recomputed_share=share)) | kw
    return Engine(resolve_model(str(folder), cache_dir=folder / "cache"), RuntimeConfig(**config))


@pytest.fixture(scope="module")
def tiny_mha(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-mha")
    hf = save_tiny("llama3", folder, **MHA)
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    return folder, hf, ids, hf_greedy(hf, ids, NEW_TOKENS)


@pytest.mark.parametrize("share", [pytest.param(0.5, marks=pytest.mark.slow), 1.0])
def test_kvpr_pages_give_transformers_tokens(tiny_mha, share):
    folder, hf, ids, ref = tiny_mha
    engine = _engine(folder, share)
    seq = engine.new_sequence()
    try:
        assert list(engine.generate(seq, ids, max_new_tokens=NEW_TOKENS)) == ref
        # 300 prompt tokens: pages 1..17 are full HOST pages in each of the 3 layers
        assert len(engine.kv.acts.slots) == 3 * round(17 * share)
        held = sum(len(seq.table.slots(layer)) for layer in range(3))  # 19 pages per layer
        assert len(engine.kv.acts.slots) / held >= (0.5 if share == 1.0 else 0.4)  # of every page held
    finally:
        engine.release(seq)
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=32)
    want = hf_logits(hf, ids + ref[:-1], 32 + NEW_TOKENS - 1)
    assert (ours - want).abs().max().item() <= MODEL_LOGITS_FP32_ATOL


def test_kvpr_moves_the_activations_bytes(tiny_mha):
    """A decode step reads an activation page's 16 x 64 values instead of its 2 x 8 x 16 x 8."""
    folder, _, ids, _ = tiny_mha
    host_read = {}
    for share in (0.0, 1.0):
        engine = _engine(folder, share)
        seq = engine.new_sequence()
        engine.prefill(seq, ids)
        before = engine.kv.io.bytes_read[Tier.HOST]
        engine.decode_step(seq, 5)
        host_read[share] = engine.kv.io.bytes_read[Tier.HOST] - before
        engine.release(seq)
    assert host_read[1.0] * 2 == host_read[0.0] > 0


def test_a_host_slot_allocated_again_holds_kv(tiny_mha):
    folder, _, ids, _ = tiny_mha
    engine = _engine(folder, 1.0)
    seq = engine.new_sequence()
    engine.prefill(seq, ids)
    held = set(engine.kv.acts.slots)
    engine.release(seq)
    assert engine.kv.acts.slots == held  # freed slots are forgotten when taken again
    again = engine.kv._allocate(Tier.HOST, 0, engine.kv.host_arena.num_slots - engine.kv.host_arena.num_used, 16)
    assert held <= set(again) and not engine.kv.acts.slots


def test_kvpr_is_refused_where_it_cannot_pay(tmp_path):
    """SmolLM2's shape (9 query heads on 3 KV heads of 64): 576 input values against 384 K/V values."""
    gqa = dict(device="cpu", device_memory_bytes=8 * 2**20, host_memory_bytes=32 * 2**20, staging_chunk_pages=8)
    src = resolve_model("smollm2-135m", cache_dir=tmp_path, random_weights=True, num_layers=1)
    with pytest.raises(InputError, match=r"input activations \(576 values\) outnumber its K/V \(384\)"):
        Engine(src, RuntimeConfig(recompute="kvpr", **gqa))
    assert Engine(src, RuntimeConfig(recompute="auto", **gqa)).kv.acts is None  # auto: none
    with pytest.raises(InputError, match="lsh mode reads HOST rows in place"):
        Engine(src, RuntimeConfig(recompute="kvpr", sparse="lsh", **gqa))
    assert Engine(src, RuntimeConfig(**gqa)).kv.acts is None  # recompute="none", the default


def test_the_planner_shares_execute_as_a_placement():
    """Llama-2-7B's shape under rtx4090-pcie4 with KVPR allowed: the LP keeps HOST pages as
    activations, and the placement marks that share of each layer's HOST pages."""
    from offload.model.model_source import config_from_hf
    from offload.model.shapes import NAMED_SHAPES

    cfg = config_from_hf(NAMED_SHAPES["llama-2-7b"])
    problem = engine_problem(cfg, new_pages=1024, page_size=32, dtype_bytes=2, kv_dtype_bytes=2,
                             device_room_pages=300 * 32, host_room_pages=800 * 32, disk_room_pages=0,
                             staging_chunk_pages=64, allow_delegation=False, allow_recompute=True)
    result = plan(problem, HardwareProfile.preset("rtx4090-pcie4"))
    assert any(result.recomputed_pages) and not any(result.delegated_pages)
    placement = plan_placement(result, first_page=0)
    for layer in range(cfg.num_layers):
        host, rc = result.host_pages[layer], result.recomputed_pages[layer]
        first = result.device_pages[layer]
        marked = sum(placement.recomputed(p, layer) for p in range(first, first + host))
        assert abs(marked - rc) <= 1 and not placement.recomputed(first - 1, layer)


@pytest.mark.slow
def test_a_doc_cache_saved_from_activation_pages_holds_their_kv(tiny_mha, tmp_path):
    """Saving reads the activation pages as K/V (recomputed): a later engine without KVPR
    restores them and continues the document as the KVPR engine does."""
    from offload.kv.doc_cache import DocCache

    folder, _, ids, _ = tiny_mha
    doc, question = ids[:280], ids[280:]

    def continuation(engine: Engine) -> list[int]:
        def prefill(i: list[int]):
            seq = engine.new_sequence()
            engine.prefill(seq, i, document=True)
            return seq

        seq, result = DocCache(engine, resolve_model(str(folder), cache_dir=folder / "cache"), tmp_path).ingest(
            doc, prefill)
        fork = engine.fork(seq)
        try:
            return [result.status] + list(engine.generate(fork, question, max_new_tokens=NEW_TOKENS))
        finally:
            engine.release(fork)
            engine.release(seq)

    kvpr = _engine(folder, 1.0)
    saved = continuation(kvpr)
    assert saved[0] == "miss" and kvpr.kv.acts.slots
    restored = continuation(_engine(folder, 0.0, recompute="none"))
    assert restored == ["hit"] + saved[1:]


@pytest.mark.gpu
def test_kvpr_on_cuda_gives_the_tokens_of_kv_pages(tiny_mha):
    """On CUDA the activation rows cross from pinned HOST memory and K/V are rebuilt on the GPU."""
    folder, _, ids, _ = tiny_mha
    runs = {}
    for share in (0.0, 1.0):
        engine = _engine(folder, share, device="cuda")
        seq = engine.new_sequence()
        try:
            runs[share] = list(engine.generate(seq, ids, max_new_tokens=NEW_TOKENS)), engine.kv.io.bytes_read[Tier.HOST]
        finally:
            engine.release(seq)
    assert runs[1.0][0] == runs[0.0][0] and runs[1.0][1] < runs[0.0][1]
