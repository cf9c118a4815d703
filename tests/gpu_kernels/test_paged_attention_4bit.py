"""Decode attention over 4-bit pages: the reference against a float64 attention over the
dequantized keys gathered by hand (tests/attention_naive.py), and the Triton kernel
(interpreted on CPU, compiled on CUDA) against the reference.

All arithmetic is fp32 whatever q's dtype: q is upcast exactly and K/V are dequantized to
fp32, so the fp32 tolerances apply to every dtype (KERNEL_TOL_LONG past 1024 keys).
"""
from __future__ import annotations

import itertools

import pytest
import torch

from gpu_kernels.paged_attention_4bit import paged_decode_attention_4bit
from gpu_kernels.quant4 import Quant4Pages
from gpu_kernels.reference_sparse import (dequantize_pages_4bit_ref, paged_decode_attention_4bit_ref,
                                          quantize_pages_4bit_ref)
from tests.attention_naive import naive_attention
from tests.tolerances import KERNEL_TOL, LSE_ATOL, kernel_tol

HEAD_DIMS = [64, 80, 128, 256]
GROUPS = [1, 3, 4, 7]
PAGE_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_KV_HEADS = 2
FP32 = torch.float32
# (head_dim, group, page_size, dtype, seq_lens of the batch, window). Default cases: every
# value of each list at least once, tail pages, an empty sequence, windows, 4096 keys twice.
CASES = [
    (64, 1, 16, torch.float32, (1, 15, 97), None),
    (80, 3, 32, torch.float16, (31, 32, 33), None),
    (128, 4, 16, torch.bfloat16, (16, 17, 0), None),
    (256, 7, 32, torch.float32, (97,), None),
    (128, 4, 16, torch.float32, (97, 33, 16), 40),
    (80, 7, 16, torch.bfloat16, (97, 1), 16),
    (64, 4, 32, torch.float16, (4096,), None),
    (128, 1, 16, torch.bfloat16, (4096, 97), 1000),
]


def seq_len_batches(page_size: int) -> list[tuple[int, ...]]:
    return [(1, page_size - 1, page_size), (page_size + 1, 97)]


FULL_CASES = [(hd, g, ps, dt, lens, win)
              for hd, g, ps, dt in itertools.product(HEAD_DIMS, GROUPS, PAGE_SIZES, DTYPES)
              for lens in seq_len_batches(ps) for win in (None, 33)]
LONG_CASES = [(hd, 4, 32, torch.bfloat16, (4096,), None) for hd in HEAD_DIMS]
CUDA_CASES = [(hd, g, 16, dt, (4096, 1000, 17), win) for hd, g, dt, win in
              [(64, 1, torch.float32, None), (80, 3, torch.float16, 512), (128, 4, torch.bfloat16, None),
               (256, 7, torch.bfloat16, None)]] + [(128, 4, 32, torch.bfloat16, (32768,), None)]


def make_case(head_dim, group, page_size, dtype, seq_lens, *, device="cpu", extra_slots=3):
    """q [B, NUM_KV_HEADS*group, head_dim], a 4-bit arena with spare slots, a shuffled block
    table (distinct slots) and seq_lens."""
    batch = len(seq_lens)
    max_pages = max(1, -(-max(seq_lens) // page_size))
    num_slots = batch * max_pages + extra_slots
    k = torch.randn(NUM_KV_HEADS, num_slots, page_size, head_dim).to(dtype)
    v = torch.randn(NUM_KV_HEADS, num_slots, page_size, head_dim).to(dtype)
    qp = Quant4Pages(*(t.to(device) for t in quantize_pages_4bit_ref(k, v).tensors()))
    table = torch.randperm(num_slots)[: batch * max_pages].view(batch, max_pages)
    q = torch.randn(batch, NUM_KV_HEADS * group, head_dim).to(dtype)
    return (q.to(device), qp, table.to(torch.int32).to(device),
            torch.tensor(seq_lens, dtype=torch.int32, device=device))


def float64_attention(q, qp, block_table, seq_lens, scale, window):
    """The oracle: dequantized keys gathered position by position, float64 attention."""
    k_all, v_all = dequantize_pages_4bit_ref(Quant4Pages(*(t.cpu() for t in qp.tensors())))
    batch, num_heads, head_dim = q.shape
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float64)
    lse = torch.full((batch, num_heads), float("-inf"), dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        lo = 0 if window is None else max(0, n - window)
        if n <= lo:
            continue
        pos = torch.arange(lo, n)
        slots = block_table[b].cpu().long()[pos // qp.page_size]
        rows = pos % qp.page_size
        k, v = k_all[:, slots, rows], v_all[:, slots, rows]  # [nkv, L, hd]
        qb = q[b].cpu().float().view(NUM_KV_HEADS, -1, 1, head_dim)
        o, s = naive_attention(qb, k, v, scale=scale)
        out[b], lse[b] = o.reshape(num_heads, head_dim), s.reshape(num_heads)
    return out, lse


def check_close(out, lse, want_out, want_lse, num_keys):
    atol, rtol = kernel_tol(FP32, num_keys)
    lse_atol = LSE_ATOL[FP32] if num_keys <= 1024 else atol  # long sums: the long entry
    assert out.dtype == FP32 and lse.dtype == FP32
    want_out, want_lse = want_out.cpu(), want_lse.cpu()
    torch.testing.assert_close(out.cpu().to(want_out.dtype), want_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().to(want_lse.dtype), want_lse, atol=lse_atol,
                               rtol=KERNEL_TOL[FP32][1])


def run_reference_case(case):
    *shape, seq_lens, window = case
    q, qp, table, lens = make_case(*shape, seq_lens)
    scale = shape[0] ** -0.5
    out, lse = paged_decode_attention_4bit_ref(q, qp, table, lens, scale=scale, window=window)
    check_close(out, lse, *float64_attention(q, qp, table, lens, scale, window), max(seq_lens))


def run_triton_case(case, device="cpu"):
    *shape, seq_lens, window = case
    q, qp, table, lens = make_case(*shape, seq_lens, device=device)
    scale = shape[0] ** -0.5
    out, lse = paged_decode_attention_4bit(q, qp, table, lens, scale=scale, window=window)
    want = paged_decode_attention_4bit_ref(q, qp, table, lens, scale=scale, window=window)
    check_close(out, lse, *want, max(seq_lens))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_float64(case):
    run_reference_case(case)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    run_triton_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES + LONG_CASES, ids=str)
def test_triton_and_reference_full(case):
    run_reference_case(case)
    run_triton_case(case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CUDA_CASES, ids=str)
def test_triton_matches_reference_cuda(case):
    run_triton_case(case, device="cuda")


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_num_splits_give_the_same_result(num_splits):
    q, qp, table, lens = make_case(80, 3, 16, torch.float16, (97, 5, 64))
    out, lse = paged_decode_attention_4bit(q, qp, table, lens, scale=0.1, num_splits=num_splits)
    want = float64_attention(q, qp, table, lens, 0.1, None)
    check_close(out, lse, *want, 97)


def test_strided_inputs_out_destinations_and_no_mutation():
    q, qp, table, lens = make_case(128, 4, 16, torch.bfloat16, (97, 40))
    # q as a view of head-major storage; the arena as a slot range of a bigger one.
    q_view = q.transpose(0, 1).contiguous().transpose(0, 1)
    big = Quant4Pages.empty(NUM_KV_HEADS, qp.num_slots + 4, 16, 128)
    qp_view = big.slot_range(4, 4 + qp.num_slots)
    for dst, src in zip(qp_view.tensors(), qp.tensors()):
        dst.copy_(src)
    out_store = torch.full((2, 8, 256), 7.0)
    lse_store = torch.full((8, 2), 7.0)
    out_view, lse_view = out_store[..., ::2], lse_store.t()
    saved = [t.clone() for t in (q_view, table, lens, *qp_view.tensors())]
    out, lse = paged_decode_attention_4bit(q_view, qp_view, table, lens, scale=0.09,
                                           out=out_view, lse=lse_view)
    assert out.data_ptr() == out_view.data_ptr() and lse.data_ptr() == lse_view.data_ptr()
    assert bool((out_store[..., 1::2] == 7.0).all())  # nothing written between the columns
    check_close(out_view, lse_view, *float64_attention(q, qp, table, lens, 0.09, None), 97)
    assert all(torch.equal(a, b) for a, b in zip((q_view, table, lens, *qp_view.tensors()), saved))


def test_tokens_after_the_end_of_a_partial_page_are_ignored():
    q, qp, table, lens = make_case(64, 4, 16, torch.float32, (37, 20))
    out, lse = paged_decode_attention_4bit(q, qp, table, lens, scale=0.125)
    # Scramble the codes and value scales of every row past each sequence's end.
    for b, n in enumerate(lens.tolist()):
        slot = int(table[b, n // 16])
        for t in (qp.k_q, qp.v_q, qp.v_scale, qp.v_min):
            t[:, slot, n % 16:] = t[:, slot, n % 16:].flip(-1) + 3
    out2, lse2 = paged_decode_attention_4bit(q, qp, table, lens, scale=0.125)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)


@pytest.mark.parametrize("impl", [paged_decode_attention_4bit, paged_decode_attention_4bit_ref],
                         ids=["triton", "ref"])
def test_extreme_logits(impl):
    """Scores around +-1e4: no overflow, still the float64 answer."""
    q, qp, table, lens = make_case(64, 3, 16, torch.float32, (97, 33))
    q = q * 3000.0
    out, lse = impl(q, qp, table, lens, scale=0.125)
    assert bool(torch.isfinite(out).all()) and float(lse.abs().max()) > 1e3
    check_close(out, lse, *float64_attention(q, qp, table, lens, 0.125, None), 97)


def _bad(name):
    """Argument overrides that must be rejected, by name."""
    return {
        "q_dtype": dict(q=lambda a: a["q"].int()),
        "q_head_dim": dict(q=lambda a: a["q"][..., :64]),
        "group": dict(q=lambda a: a["q"][:, :5]),
        "qp_type": dict(qp=lambda a: a["qp"].k_q),
        "table_dtype": dict(block_table=lambda a: a["block_table"].long()),
        "lens_shape": dict(seq_lens=lambda a: a["seq_lens"][:1]),
        "lens_too_long": dict(seq_lens=lambda a: a["seq_lens"] + 1000),
        "slot_range": dict(block_table=lambda a: a["block_table"] + 1000),
        "window": dict(window=lambda a: 0),
        "scale": dict(scale=lambda a: float("inf")),
        "splits": dict(num_splits=lambda a: 0),
        "out": dict(out=lambda a: torch.empty(2, 8, 128, dtype=torch.float16)),
    }[name]


BAD = [("q_dtype", "q must be"), ("q_head_dim", "head_dims must match"),
       ("group", "multiple of num_kv_heads"), ("qp_type", "qp must be a Quant4Pages"),
       ("table_dtype", "block_table must be an int32"), ("lens_shape", "seq_lens"),
       ("lens_too_long", "widen block_table"), ("slot_range", "block_table entries in use"),
       ("window", "window must be"), ("scale", "scale must be"), ("splits", "num_splits must be"),
       ("out", "out must be a float32")]


@pytest.mark.parametrize("name,match", BAD)
def test_bad_inputs_rejected(name, match):
    q, qp, table, lens = make_case(128, 4, 16, torch.float32, (40, 17))
    args = dict(q=q, qp=qp, block_table=table, seq_lens=lens, scale=0.1, window=None,
                num_splits=None, out=None)
    for key, make in _bad(name).items():
        args[key] = make(args)
    with pytest.raises(ValueError, match=match):
        paged_decode_attention_4bit(args.pop("q"), args.pop("qp"), args.pop("block_table"),
                                    args.pop("seq_lens"), **args)


def test_fallback_without_triton_fills_destinations(monkeypatch):
    """Where Triton cannot run, the launcher answers with the reference, into out / lse."""
    import gpu_kernels.paged_attention_4bit as module

    monkeypatch.setattr(module, "use_triton", lambda t: False)
    q, qp, table, lens = make_case(80, 3, 16, torch.float32, (50, 0))
    out, lse = torch.full((2, 6, 80), 9.0), torch.full((2, 6), 9.0)
    res = paged_decode_attention_4bit(q, qp, table, lens, scale=0.1, window=20, out=out, lse=lse)
    assert res[0] is out and res[1] is lse
    check_close(out, lse, *float64_attention(q, qp, table, lens, 0.1, 20), 50)
