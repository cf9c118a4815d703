"""Engine behaviour beyond exactness: KV dtype separate from compute dtype, up-front capacity
refusal, chunking invariance, decode appends to a tail page."""
from __future__ import annotations

import pytest
import torch

from offload.errors import CapacityError
from tests.offload.arch_pairs import hf_logits, make_engine, ours_teacher_forced, save_tiny
from tests.tolerances import TOL


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf = save_tiny("llama3", folder)
    ids = torch.randint(0, 512, (200,), generator=torch.Generator().manual_seed(5)).tolist()
    return folder, hf, ids


def test_kv_dtype_is_separate_from_compute_dtype(tiny):
    folder, hf, ids = tiny
    engine = make_engine(folder, "cpu", torch.float32, kv_dtype=torch.bfloat16)
    assert engine.dtype == torch.float32 and engine.arena.k.dtype == torch.bfloat16
    forced = [1, 2, 3, 4]
    ours = ours_teacher_forced(engine, ids, forced, prompt_logits=8)
    want = hf_logits(hf, ids + forced[:-1], 8 + 3)
    err = (ours - want).abs().max().item()
    # bf16 KV rounds K and V to 8-bit mantissas: close to, but not at, fp32 exactness.
    assert 1e-6 < err < 0.05 * want.abs().max().item()


def test_chunking_and_page_size_do_not_change_results(tiny):
    folder, _, ids = tiny
    forced = [7, 8, 9]
    a = ours_teacher_forced(make_engine(folder, "cpu", torch.float32, page_size=32, prefill_chunk_tokens=1024),
                            ids, forced, prompt_logits=16)
    b = ours_teacher_forced(make_engine(folder, "cpu", torch.float32, page_size=7, prefill_chunk_tokens=33),
                            ids, forced, prompt_logits=16)
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(a, b, atol=10 * atol, rtol=10 * rtol)  # summation order differs


def test_too_small_device_budget_is_refused_up_front(tiny):
    from offload.config import RuntimeConfig
    from offload.engine import Engine
    from offload.model.model_source import resolve_model

    folder, _, ids = tiny
    small = Engine(resolve_model(str(folder), cache_dir=folder / "cache"),
                   RuntimeConfig(device="cpu", device_memory_bytes=40_000))
    seq = small.new_sequence()
    with pytest.raises(CapacityError,
                       match=r"--device-memory \(RuntimeConfig.device_memory_bytes\) of at least \d+MiB"):
        small.check_request(seq, len(ids), 4)
    assert small.arena.num_used == 0


def test_decode_appends_to_a_tail_page(tiny):
    folder, _, ids = tiny
    engine = make_engine(folder, "cpu", torch.float32, page_size=16)
    seq = engine.new_sequence()
    toks = list(engine.generate(seq, ids[:30], max_new_tokens=5))
    # 30 prompt tokens + 4 fed-back generated tokens = 34 tokens = 3 pages per layer.
    assert seq.num_tokens == 34 and len(toks) == 5
    assert all(seq.table.num_pages(layer) == 3 for layer in range(engine.model_config.num_layers))
    engine.release(seq)
    assert engine.arena.num_used == 0
