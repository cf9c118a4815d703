"""cpu_kernels.attention_4bit (Numba) against references that never see the fused kernel:
the numpy reference quantizer and dequantizer (``cpu_kernels.reference``) give the values the
pages hold, then ``attention_pages_ref`` (no starts) or a float64 softmax written here (any
starts) attends them.

Unlisted slots hold NaN scales, so a kernel that reads a page it was not given returns NaN.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cpu_kernels.attention_4bit import BLOB_FIELDS, attention_blobs_4bit_trusted, attention_pages_4bit
from cpu_kernels.inputs import numba_threads
from cpu_kernels.quant4 import Quant4PagesNp, quantize_pages_4bit
from cpu_kernels.reference import attention_pages_ref, dequantize_pages_4bit_ref, quantize_pages_4bit_ref
from tests.tolerances import KERNEL_TOL, LSE_ATOL

F32 = torch.float32
SCALE = 0.125
NUM_KV_HEADS = 2
# (head_dim, page_size, group, pages listed per head)
SHAPES = [(64, 16, 3, 5), (64, 32, 1, 1), (80, 16, 4, 7), (128, 32, 7, 3), (256, 16, 2, 4)]


def _arena(head_dim: int, page_size: int, num_slots: int, seed: int) -> Quant4PagesNp:
    """A 4-bit arena of random pages (keys with an outlier channel), quantized by the reference."""
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_KV_HEADS, num_slots, page_size, head_dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    k[..., 1] *= 20
    return quantize_pages_4bit_ref(k, v)


def _poison(qp: Quant4PagesNp, listed: np.ndarray) -> None:
    """NaN scales on every (head, slot) not listed for that head."""
    for h in range(qp.k_q.shape[0]):
        unlisted = np.setdiff1d(np.arange(qp.k_q.shape[1]), listed[h])
        qp.k_scale[h, unlisted] = np.nan
        qp.v_scale[h, unlisted] = np.nan


def _dense_f64(q: np.ndarray, qp: Quant4PagesNp, slots, lens, starts) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax over each KV head's rows starts..lens-1 of its listed pages, dequantized."""
    k, v = dequantize_pages_4bit_ref(qp)
    group = q.shape[0] // NUM_KV_HEADS
    out, lse = np.zeros(q.shape), np.full(q.shape[0], -np.inf)
    for h in range(NUM_KV_HEADS):
        rows = [(s, t) for s, n, t0 in zip(slots[h], lens[h], starts[h]) for t in range(t0, n)]
        if not rows:
            continue
        keys = np.stack([k[h, s, t] for s, t in rows]).astype(np.float64)
        vals = np.stack([v[h, s, t] for s, t in rows]).astype(np.float64)
        heads = slice(h * group, (h + 1) * group)
        scores = q[heads].astype(np.float64) @ keys.T * SCALE
        top = scores.max(axis=1, keepdims=True)
        w = np.exp(scores - top)
        out[heads] = w @ vals / w.sum(axis=1, keepdims=True)
        lse[heads] = (top + np.log(w.sum(axis=1, keepdims=True)))[:, 0]
    return out, lse


# One shape and thread count by default (the kernel compiles once per input layout; each
# case of a cold cache costs seconds); the whole matrix under -m slow.
@pytest.mark.parametrize("threads", [2, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape", [SHAPES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[1:])],
                         ids=lambda s: f"d{s[0]}-ps{s[1]}-g{s[2]}-m{s[3]}")
def test_matches_reference_over_shuffled_slots(shape, threads):
    head_dim, page_size, group, listed = shape
    num_slots = NUM_KV_HEADS * listed + 3
    qp = _arena(head_dim, page_size, num_slots, seed=head_dim + listed)
    rng = np.random.default_rng(listed)
    perm = rng.permutation(num_slots)
    slots = np.stack([perm[h * listed:(h + 1) * listed] for h in range(NUM_KV_HEADS)]).astype(np.int32)
    lens = np.full(slots.shape, page_size, dtype=np.int32)
    lens[:, -1] = page_size - 3  # a page's leading rows only
    _poison(qp, slots)
    q = rng.standard_normal((NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    out, lse = attention_pages_4bit(q, qp, slots, lens, scale=SCALE, num_threads=threads)
    k, v = dequantize_pages_4bit_ref(qp)
    ref_out, ref_lse = attention_pages_ref(q, k, v, slots, lens, scale=SCALE)
    atol, rtol = KERNEL_TOL[F32]
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_ATOL[F32], rtol=0)


def _blobs(qp: Quant4PagesNp, stride_pad: int) -> tuple[np.ndarray, np.ndarray]:
    """The arena's pages as blob rows written here field by field (every KV head of a field
    together, head-major, in BLOB_FIELDS order), each row padded by ``stride_pad`` bytes."""
    per_slot = [[np.ascontiguousarray(getattr(qp, f)[:, slot]).tobytes() for f in BLOB_FIELDS]
                for slot in range(qp.k_q.shape[1])]
    sizes = [len(b) for b in per_slot[0]]
    rows = np.zeros((len(per_slot), sum(sizes) + stride_pad), dtype=np.uint8)
    for slot, parts in enumerate(per_slot):
        rows[slot, :sum(sizes)] = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return rows, np.cumsum([0, *sizes[:-1]]).astype(np.int64)


@pytest.mark.parametrize("threads", [2, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("shape", [SHAPES[0], *(pytest.param(s, marks=pytest.mark.slow) for s in SHAPES[1:])],
                         ids=lambda s: f"d{s[0]}-ps{s[1]}-g{s[2]}-m{s[3]}")
def test_blob_rows_match_the_reference(shape, threads):
    """The engine's entry: full pages as blob rows (a packed arena, a staging buffer), every
    KV head the same shuffled rows; unlisted rows poisoned."""
    head_dim, page_size, group, listed = shape
    num_slots = listed + 4
    qp = _arena(head_dim, page_size, num_slots, seed=head_dim + 3 * listed)
    rng = np.random.default_rng(listed + 1)
    slots_1d = rng.permutation(num_slots)[:listed].astype(np.int32)
    slots = np.stack([slots_1d] * NUM_KV_HEADS)
    _poison(qp, slots)
    rows, fields = _blobs(qp, stride_pad=96)
    q = rng.standard_normal((NUM_KV_HEADS * group, head_dim)).astype(np.float32)
    with numba_threads(threads):
        out, lse = attention_blobs_4bit_trusted(q, rows, fields, (NUM_KV_HEADS, page_size, head_dim), slots_1d, SCALE)
    k, v = dequantize_pages_4bit_ref(qp)
    ref_out, ref_lse = attention_pages_ref(q, k, v, slots, np.full(slots.shape, page_size, np.int32), scale=SCALE)
    atol, rtol = KERNEL_TOL[F32]
    np.testing.assert_allclose(out, ref_out, atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse, ref_lse, atol=LSE_ATOL[F32], rtol=0)


# Per KV head (lens, starts): a cut inside the first page, pages cut whole, a head that sees
# nothing (its out 0, lse -inf).
STARTS = {
    "first_page_cut": ([[16, 16, 16], [16, 16, 16]], [[5, 0, 0], [15, 0, 0]]),
    "whole_pages": ([[16, 16, 16, 16], [16, 16, 0, 0]], [[16, 16, 2, 0], [16, 3, 0, 0]]),
    "one_head_empty": ([[16, 7], [16, 7]], [[3, 0], [16, 7]]),
}


@pytest.mark.parametrize("scenario", sorted(STARTS))
def test_starts_hide_leading_rows(scenario):
    lens, starts = (np.array(x, dtype=np.int32) for x in STARTS[scenario])
    listed = lens.shape[1]
    qp = _arena(64, 16, NUM_KV_HEADS * listed + 2, seed=7)
    slots = np.arange(NUM_KV_HEADS * listed, dtype=np.int32).reshape(NUM_KV_HEADS, listed)[:, ::-1].copy()
    slots[lens <= starts] = -1  # not read: any slot is allowed there
    _poison(qp, np.where(slots < 0, 0, slots))
    q = np.random.default_rng(3).standard_normal((2 * NUM_KV_HEADS, 64)).astype(np.float32)
    out, lse = attention_pages_4bit(torch.from_numpy(q), qp, slots, lens, scale=SCALE, starts=starts)
    assert isinstance(out, torch.Tensor)  # a torch query gets torch results
    ref_out, ref_lse = _dense_f64(q, qp, slots, lens, starts)
    atol, rtol = KERNEL_TOL[F32]
    np.testing.assert_allclose(out.numpy(), ref_out, atol=atol, rtol=rtol)
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=LSE_ATOL[F32], rtol=0)


def test_reads_the_numba_quantizers_pages():
    """The arena as the runtime writes it (cpu_kernels.quant4, bit-identical to the reference)."""
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(3, 6, 32, 64, generator=gen), torch.randn(3, 6, 32, 64, generator=gen)
    qp = quantize_pages_4bit(k, v)
    q = torch.randn(9, 64, generator=gen)
    slots = np.array([[4, 0, 2]] * 3, dtype=np.int32)
    lens = np.full((3, 3), 32, dtype=np.int32)
    out, lse = attention_pages_4bit(q, qp, slots, lens, scale=SCALE)
    kd, vd = dequantize_pages_4bit_ref(qp)
    ref_out, ref_lse = attention_pages_ref(q, kd, vd, slots, lens, scale=SCALE)
    np.testing.assert_allclose(out.numpy(), ref_out, atol=KERNEL_TOL[F32][0], rtol=KERNEL_TOL[F32][1])
    np.testing.assert_allclose(lse.numpy(), ref_lse, atol=LSE_ATOL[F32], rtol=0)
    # and the 4-bit result stays close to exact attention over the unquantized pages
    exact_out, _ = attention_pages_ref(q, k, v, slots, lens, scale=SCALE)
    assert np.abs(out.numpy() - exact_out).max() < 0.1


def test_bad_inputs_are_refused():
    qp = _arena(64, 16, 4, seed=0)
    slots, lens = np.zeros((2, 1), np.int32), np.full((2, 1), 16, np.int32)
    with pytest.raises(ValueError, match="Quant4PagesNp"):
        attention_pages_4bit(np.zeros((2, 64), np.float32), (qp.k_q,), slots, lens, scale=SCALE)
    with pytest.raises(ValueError, match="head_dim"):
        attention_pages_4bit(np.zeros((2, 32), np.float32), qp, slots, lens, scale=SCALE)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention_pages_4bit(np.zeros((3, 64), np.float32), qp, slots, lens, scale=SCALE)
    with pytest.raises(ValueError, match="slots"):
        attention_pages_4bit(np.zeros((2, 64), np.float32), qp, slots + 9, lens, scale=SCALE)
    with pytest.raises(ValueError, match="lens"):
        attention_pages_4bit(np.zeros((2, 64), np.float32), qp, slots, lens + 1, scale=SCALE)
