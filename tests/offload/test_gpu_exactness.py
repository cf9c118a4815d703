"""Exactness on CUDA (runs on a lent GPU; skipped without CUDA).

Real weights cannot travel to the GPU machine, so small random-weight models are loaded into
both this runner and transformers (same tensors):
- fp32 with TF32 off: greedy tokens identical and logits within the fp32 model tolerance;
- bf16 on both sides: measured against transformers in fp32 (teacher-forced on the bf16
  reference's tokens), our bf16 logits err at most 2x as much as transformers' own bf16
  logits do (plus 1e-3); greedy tokens are compared and printed (16-bit rounding may flip
  a near-tie, after which the sequences legitimately diverge).
"""
from __future__ import annotations

import copy

import pytest
import torch

from tests.offload.arch_pairs import (hf_greedy, hf_logits, make_engine, ours_greedy,
                                      ours_teacher_forced, save_tiny)
from tests.tolerances import MODEL_LOGITS_FP32_ATOL
from offload.kv.page_table import cdiv

pytestmark = pytest.mark.gpu

ARCHS = ["llama3", "qwen2", "mistral"]
SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32, initializer_range=0.05)
PROMPT = 2000
NEW = 32
# bf16: both sides round to 8-bit mantissas in different places (fused SDPA vs our matmul
# + fp32 softmax), so the yardstick is transformers' own bf16 error against fp32.
BF16_ERROR_RATIO = 2.0
BF16_ERROR_SLACK = 1e-3


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(arch, tmp_path, dtype):
    hf = save_tiny(arch, tmp_path, **SMALL).to(device="cuda", dtype=dtype)
    engine = make_engine(tmp_path, "cuda", dtype, prefill_chunk_tokens=512)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    return hf, engine, ids


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_fp32_matches_transformers(arch, tmp_path):
    hf, engine, ids = _pair(arch, tmp_path, torch.float32)
    ref = hf_greedy(hf, ids, NEW)
    got = ours_greedy(engine, ids, NEW)
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=64)
    want = hf_logits(hf, ids + ref[:-1], 64 + NEW - 1)
    err = (ours - want).abs().max().item()
    print(f"[gpu fp32 {arch}] greedy identical: {got == ref}; max |logit diff| {err:.2e}")
    assert got == ref
    assert err <= MODEL_LOGITS_FP32_ATOL


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_bf16_close_to_transformers(arch, tmp_path):
    hf32, _, ids = _pair(arch, tmp_path, torch.float32)
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    engine = make_engine(tmp_path, "cuda", torch.bfloat16, prefill_chunk_tokens=512)
    ref = hf_greedy(hf16, ids, NEW)
    got = ours_greedy(engine, ids, NEW)
    forced = ids + ref[:-1]
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=64)
    exact = hf_logits(hf32, forced, 64 + NEW - 1)
    theirs = hf_logits(hf16, forced, 64 + NEW - 1)
    err_ours = (ours - exact).abs().max().item()
    err_hf = (theirs - exact).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    same = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), len(ref))
    print(f"[gpu bf16 {arch}] first {same}/{NEW} greedy tokens identical to transformers bf16; "
          f"max |logit - fp32 logit|: ours {err_ours:.3e}, transformers bf16 {err_hf:.3e}; "
          f"ours vs transformers bf16: max |diff| {(ours - theirs).abs().max().item():.3e}, "
          f"top-1 agreement {agree:.1%}")
    assert err_ours <= BF16_ERROR_RATIO * err_hf + BF16_ERROR_SLACK


def test_cuda_paged_kv_lives_on_the_gpu(tmp_path):
    _, engine, ids = _pair("llama3", tmp_path, torch.bfloat16)
    assert engine.arena.k.is_cuda
    seq = engine.new_sequence()
    engine.forward(seq, ids[:100])
    assert engine.arena.num_used == 4 * cdiv(100, 32)
    engine.release(seq)


def _tiered_fp32(tmp_path, **engine_kw):
    """A small llama3 on CUDA in fp32 with the given engine options, beside transformers:
    (engine, our greedy tokens, transformers' greedy tokens, max |logit difference|) over the
    last 64 prompt positions and every generated one (teacher-forced)."""
    hf = save_tiny("llama3", tmp_path, **SMALL).to(device="cuda")
    engine = make_engine(tmp_path, "cuda", torch.float32, prefill_chunk_tokens=512, kv_dir=str(tmp_path / "kv"),
                         **engine_kw)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = hf_greedy(hf, ids, NEW)
    got = ours_greedy(engine, ids, NEW)
    ours = ours_teacher_forced(engine, ids, ref, prompt_logits=64)
    want = hf_logits(hf, ids + ref[:-1], 64 + NEW - 1)
    return engine, got, ref, (ours - want).abs().max().item()


@pytest.mark.parametrize("overlap", [True, False], ids=["fetch-ahead", "serial"])
@pytest.mark.parametrize("placement", ["host", "disk", "mixed", "half-delegated"])
def test_cuda_tiered_placements_match_transformers_fp32(placement, overlap, tmp_path):
    """Pinned HOST pages copied to the GPU, DISK pages staged through host memory: the same
    greedy tokens and logits as transformers in fp32, with the next layer's pages copied on
    the side stream (fetch-ahead: every piece attention uses came from it) or without."""
    from offload.kv.placement import Placement
    from storage import Tier

    placements = {"host": Placement.all_on(Tier.HOST), "disk": Placement.all_on(Tier.DISK),
                  "mixed": Placement(device_pages=8, host_pages=16),
                  # half of each layer's HOST pages attended by the CPU where they lie, half fetched
                  "half-delegated": Placement(device_pages=8, host_pages=16,
                                              delegated_share=(0.5,) * SMALL["num_hidden_layers"])}
    engine, got, ref, err = _tiered_fp32(tmp_path, placement=placements[placement],
                                         host_memory_bytes=256 * 2**20, overlap=overlap)
    assert engine.host_arena is not None and engine.host_arena.k.is_pinned()
    assert engine.host_arena.pinned_by == "register"  # exactly its bytes locked, no power-of-two rounding
    assert (engine.kv.fetcher is not None) == overlap
    f = engine.kv.fetcher
    pieces = f"; fetched ahead {f.fetched_pieces} pieces, taken {f.taken_pieces}" if f is not None else ""
    print(f"[gpu fp32 tiers {placement} {'fetch-ahead' if overlap else 'serial'}] greedy identical: "
          f"{got == ref}; max |logit diff| {err:.2e}; bytes read {engine.kv.io.bytes_read}{pieces}")
    engine.close()
    assert got == ref
    assert err <= MODEL_LOGITS_FP32_ATOL
    if f is not None:  # a layer's HOST/DISK pages fit the allowance (256 pages) and nothing is
        # evicted (the DEVICE budget is the default): every piece fetched ahead is taken
        assert f.taken_pieces > 0 and f.taken_pieces == f.fetched_pieces


def test_cuda_disk_tier_through_kvikio_matches_transformers_fp32(tmp_path):
    """The DISK tier read and written by NVIDIA KvikIO (compat mode without GPUDirect
    Storage): the same greedy tokens and logits as transformers in fp32."""
    from offload.kv.placement import Placement
    from storage import Tier, kvikio_status

    if (why := kvikio_status()) is not None:
        pytest.skip(f"kvikio backend: {why}")
    engine, got, ref, err = _tiered_fp32(tmp_path, placement=Placement.all_on(Tier.DISK), disk_backend="kvikio")
    assert engine.disk is not None and engine.disk.backend == "kvikio"
    io = engine.disk.io
    print(f"[gpu fp32 disk via kvikio] greedy identical: {got == ref}; max |logit diff| {err:.2e}; "
          f"compat mode {io.compat_mode}; files served by POSIX instead: {io.fallbacks}; "
          f"bytes read {engine.kv.io.bytes_read}")
    assert io.fallbacks == 0, "every file should go through KvikIO, none through POSIX"
    engine.close()
    assert got == ref
    assert err <= MODEL_LOGITS_FP32_ATOL


@pytest.mark.parametrize("placement", ["device", "host", "disk"])
def test_cuda_4bit_pages_attend_the_same_values_wherever_they_live(placement, tmp_path):
    """--kv-format 4bit on CUDA: the Triton kernels quantize the pages and attend the DEVICE
    ones in place; HOST and DISK ones are dequantized where they are read. Teacher-forced on
    the all-DEVICE run's tokens, every placement's argmax is the same, and the tokens stay
    close to exact fp32 (printed)."""
    from offload.kv.placement import Placement
    from storage import Tier

    save_tiny("llama3", tmp_path, **SMALL)
    ids = torch.randint(0, SMALL["vocab_size"], (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    exact = make_engine(tmp_path, "cuda", torch.float32, prefill_chunk_tokens=512)
    ref = ours_greedy(exact, ids, NEW)
    exact.close()
    placements = {"device": None, "host": Placement.all_on(Tier.HOST), "disk": Placement.all_on(Tier.DISK)}
    base = make_engine(tmp_path, "cuda", torch.float32, prefill_chunk_tokens=512, kv_format="4bit")
    want = ours_teacher_forced(base, ids, ref, prompt_logits=1).argmax(-1)
    base.close()
    engine = make_engine(tmp_path, "cuda", torch.float32, prefill_chunk_tokens=512, kv_format="4bit",
                         placement=placements[placement], host_memory_bytes=256 * 2**20, kv_dir=str(tmp_path / "kv"))
    got = ours_teacher_forced(engine, ids, ref, prompt_logits=1).argmax(-1)
    agree = (want == torch.tensor(ref)).float().mean().item()
    print(f"[gpu fp32 4bit {placement}] argmax equal to all-DEVICE 4-bit: {bool((got == want).all())}; "
          f"top-1 agreement with exact {agree:.3f}; bytes read {engine.kv.io.bytes_read}")
    engine.close()
    assert torch.equal(got, want)
