"""A DocCache hit that recomputes a prefix while the rest loads (Cake, ``offload.kv.cake``):
the same K/V bit for bit and the same answers as loading every page; what is not split says why."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from offload.api import LongDocQA
from offload.config import RuntimeConfig
from offload.errors import InputError
from offload.kv.cake import _measured_rates
from planner.profile import HardwareProfile

PROFILE = HardwareProfile.preset("cpu-2core")
DOC = " ".join(f"line {i}: the quick brown fox number {i * 7 % 13} jumps." for i in range(24))  # ~700 tokens
QUESTION = "Which number jumps?"


def _qa(cache: Path, model: str = "smollm2-135m", layers: int = 2, **kw) -> LongDocQA:
    device_mib = 10 if model.startswith("gemma3") else 2
    config = RuntimeConfig(device=kw.pop("device", "cpu"), device_memory_bytes=device_mib * 2**20, host_memory_bytes=12 * 2**20,
                           staging_chunk_pages=8, kv_dir=str(cache / "kv"), profile=PROFILE,
                           prefill_chunk_tokens=kw.pop("chunk", 128), **kw)
    return LongDocQA(model, config=config, cache_dir=cache, random_weights=True, num_layers=layers)


@torch.inference_mode()
def _kv(qa: LongDocQA, doc) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's K and V of the document, read back from wherever its pages live."""
    out = []
    for layer in range(qa.engine.model_config.num_layers):
        groups = list(qa.engine.kv.reader.layer_groups(doc._seq, layer, 1 << 30))
        out.append((torch.cat([g.k for g in groups], 1).cpu(), torch.cat([g.v for g in groups], 1).cpu()))
    return out


def _restored(cache: Path, share: float | None, model: str = "smollm2-135m", layers: int = 2, **kw):
    with _qa(cache, model, layers, restore_recompute=share, **kw) as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "hit"
        return doc.restore, doc.stats, _kv(qa, doc), qa.ask(doc, QUESTION, max_new_tokens=8).token_ids


@pytest.mark.parametrize("model, layers", [("smollm2-135m", 2),
                                           pytest.param("gemma3-270m", 6, marks=pytest.mark.slow)])
def test_a_forced_split_restores_the_same_kv_and_answers(tmp_path, model, layers):
    with _qa(tmp_path, model, layers) as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "miss"
        fresh = qa.ask(doc, QUESTION, max_new_tokens=8).token_ids
    manifest = next((tmp_path / "docs").rglob("manifest.json")).read_text()
    meta = json.loads(manifest.splitlines()[0])["meta"]  # (its second line: the manifest's hash)
    assert meta["prefill_chunk"] == 128 and len(meta["prefill_chunk_s"]) == -(-doc.num_tokens // 128)
    loaded, _, kv_loaded, tokens_loaded = _restored(tmp_path, 0.0, model, layers)
    split, stats, kv_split, tokens_split = _restored(tmp_path, 0.3, model, layers)
    assert loaded.recompute_tokens == 0 and "load every page (forced)" in loaded.plan
    # 0.3 of the document, on a multiple of the 128-token chunk
    assert split.recompute_tokens == round(0.3 * doc.num_tokens / 128) * 128 > 0
    assert stats.restore_recompute_tokens == split.recompute_tokens and "forced" in stats.restore_plan
    assert split.predicted_s > 0 and "this document's ingest" in split.plan
    for (k0, v0), (k1, v1) in zip(kv_loaded, kv_split, strict=True):  # (a sliding layer: its ring)
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert tokens_split == tokens_loaded == fresh


@pytest.mark.gpu
def test_a_forced_split_on_cuda_restores_the_same_kv_and_answers(tmp_path):
    """On CUDA (no chunk timings: the FLOP model prices it), pages spilled to HOST and DISK."""
    with _qa(tmp_path, device="cuda") as qa:
        fresh = qa.ask(qa.ingest(DOC), QUESTION, max_new_tokens=8).token_ids
    loaded, _, kv_loaded, tokens_loaded = _restored(tmp_path, 0.0, device="cuda")
    split, _, kv_split, tokens_split = _restored(tmp_path, 0.3, device="cuda")
    assert split.recompute_tokens > 0 and "matmul rate" in split.plan
    for (k0, v0), (k1, v1) in zip(kv_loaded, kv_split, strict=True):
        assert torch.equal(k0, k1) and torch.equal(v0, v1)
    assert tokens_split == tokens_loaded == fresh


def test_the_planner_loads_every_page_on_this_cpu(tmp_path):
    with _qa(tmp_path) as qa:
        qa.ingest(DOC)
    report, stats, _, _ = _restored(tmp_path, None)
    assert report.recompute_tokens == 0 and report.plan.startswith("load every page (chosen)")
    assert stats.to_dict()["restore_predicted_s"] == report.predicted_s > 0


@pytest.mark.slow  # four LongDocQA instances
def test_a_split_is_not_made_where_it_would_not_repeat_the_ingest(tmp_path):
    with _qa(tmp_path, chunk=128) as qa:
        qa.ingest(DOC)
    with _qa(tmp_path, chunk=256, restore_recompute=0.3) as qa:  # other chunks: other K/V bits
        doc = qa.ingest(DOC)
        assert doc.restore.recompute_tokens == 0 and "chunks of 128 tokens, this engine uses 256" in doc.restore.plan
    with _qa(tmp_path / "lsh", sparse="lsh") as qa:
        qa.ingest(DOC)
    with _qa(tmp_path / "lsh", sparse="lsh", restore_recompute=0.3) as qa:
        doc = qa.ingest(DOC)
        assert doc.restore.recompute_tokens == 0 and doc.restore.plan.startswith("lsh mode")


def test_a_damaged_page_past_the_split_is_never_used(tmp_path):
    """The loader verifies what it reads while the prefix is recomputed: a damaged page
    quarantines the DocCache and the document is prefilled again."""
    with _qa(tmp_path) as qa:
        fresh = qa.ask(qa.ingest(DOC), QUESTION, max_new_tokens=8).token_ids
    layer_file = sorted((tmp_path / "docs").rglob("layer_*.kv"))[-1]
    data = bytearray(layer_file.read_bytes())
    data[-100] ^= 0xFF  # the last page: past any split
    layer_file.write_bytes(bytes(data))
    with _qa(tmp_path, restore_recompute=0.3) as qa:
        doc = qa.ingest(DOC)
        assert doc.stats.doc_cache == "rebuilt" and doc.restore is None
        assert qa.ask(doc, QUESTION, max_new_tokens=8).token_ids == fresh


def test_recompute_rates_fitted_to_the_ingest_chunks():
    a, b, first = 2e-3, 4e-7, 1.5  # seconds per token, per query-key pair; the first chunk's extra
    tokens, chunk = 1000, 128
    starts = np.arange(0, tokens, chunk)
    sizes = np.minimum(chunk, tokens - starts)
    times = a * sizes + b * (sizes * starts + sizes * (sizes + 1) / 2)
    times[0] += first
    linear, quadratic, fixed = _measured_rates({"prefill_chunk_s": times.tolist()}, tokens, chunk)
    assert linear == pytest.approx(a) and quadratic == pytest.approx(b / 2) and fixed == pytest.approx(first)
    assert _measured_rates({"prefill_chunk_s": times.tolist()[:3]}, tokens, chunk) is None  # not this document's
    assert _measured_rates({"prefill_chunk_s": times.tolist()[:2]}, 2 * chunk, chunk) is None  # too few to fit
    assert _measured_rates({}, tokens, chunk) is None


@pytest.mark.parametrize("field, value, words", [
    ("restore_recompute", 1.0, "in [0, 1)"), ("restore_recompute", "half", "in [0, 1)"),
    ("recompute", "lowrank", "not executed by the engine yet"),
    ("recompute", "sometimes", "recompute"),
])
def test_config_refuses_bad_recompute_values(field, value, words):
    with pytest.raises(InputError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        RuntimeConfig(**{field: value})
    assert RuntimeConfig(recompute="auto", restore_recompute=0.5).restore_recompute == 0.5
