"""4-bit pages: the reference against the format spec recomputed here in numpy, and the Triton
quantize / dequantize kernels (interpreted on CPU, compiled on CUDA) against the reference.

The spec checks unpack the nibbles by hand, recompute min / scale / codes with numpy float32
(IEEE division, as the spec says), and bound the dequantization error in float64 by half a
step of the group (QUANT4_STEP_FRACTION) plus the float16 rounding of the group's min.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from gpu_kernels.quant4 import Quant4Pages, dequantize_pages_4bit, quantize_pages_4bit
from gpu_kernels.reference_sparse import dequantize_pages_4bit_ref, quantize_pages_4bit_ref
from tests.tolerances import KERNEL_TOL, QUANT4_STEP_FRACTION

HEAD_DIMS = [64, 80, 128, 256]
PAGE_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NUM_KV_HEADS = 2
NUM_PAGES = 3
# Default Triton cases: each head_dim, page size and dtype at least once.
TRITON_CASES = [(64, 16, torch.float32), (80, 32, torch.float16), (128, 16, torch.bfloat16),
                (256, 32, torch.float32)]
TRITON_FULL = list(itertools.product(HEAD_DIMS, PAGE_SIZES, DTYPES))
MIN_CODE_AGREEMENT = 0.999  # GPU division may move a code on a rounding boundary by one


def make_pages(head_dim: int, page_size: int, dtype: torch.dtype, *, num_pages: int = NUM_PAGES,
               device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Random K/V pages [NUM_KV_HEADS, num_pages, page_size, head_dim] with an outlier key
    channel (KIVI's observation) and a value channel offset."""
    shape = (NUM_KV_HEADS, num_pages, page_size, head_dim)
    k = torch.randn(shape, device=device)
    k[..., 3] *= 8.0
    v = torch.randn(shape, device=device)
    v[..., 5] += 3.0
    return k.to(dtype), v.to(dtype)


def unpack_by_hand(packed: torch.Tensor) -> torch.Tensor:
    """[..., D // 2] uint8 -> [..., D] int64 codes: channel c is nibble c % 2 of byte c // 2."""
    c = torch.arange(2 * packed.shape[-1], device=packed.device)
    return (packed.long()[..., c // 2] >> (4 * (c % 2))) & 15


def spec_quantize(x: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The spec in numpy float32 over ``axis`` (kept): codes, float16 scale, float16 min."""
    xf = x.float().cpu().numpy()
    lo, hi = xf.min(axis=axis, keepdims=True), xf.max(axis=axis, keepdims=True)
    s16 = ((hi - lo) / np.float32(15)).astype(np.float16)
    m16 = lo.astype(np.float16)
    s, m = s16.astype(np.float32), m16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.clip(np.floor((xf - m) / s + np.float32(0.5)), 0, 15)
    return np.where(s == 0, 0, codes).astype(np.int64), s16, m16


def value_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """[..., D] -> [..., D // group, group]."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def check_error_bound(x: torch.Tensor, x_hat: torch.Tensor, axis: int) -> None:
    """|x_hat - x| <= QUANT4_STEP_FRACTION * step + |fp16(min) - min| per group, in float64."""
    xd = x.double().cpu()
    lo = xd.amin(dim=axis, keepdim=True)
    step = (xd.amax(dim=axis, keepdim=True) - lo) / 15
    min_rounding = (lo.float().half().double() - lo).abs()
    err = (x_hat.double().cpu() - xd).abs()
    assert bool((err <= QUANT4_STEP_FRACTION * step + min_rounding).all()), float(err.max())


def assert_codes_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Codes equal for >= 99.9% and never off by more than one."""
    diff = (got.long().cpu() - want.long().cpu()).abs()
    assert int(diff.max()) <= 1
    assert float((diff == 0).double().mean()) >= MIN_CODE_AGREEMENT


def check_against_reference(qp: Quant4Pages, ref: Quant4Pages) -> None:
    """Triton pages vs reference pages: scales and mins exact, codes per assert_codes_close."""
    for name in ("k_scale", "k_min", "v_scale", "v_min"):
        assert torch.equal(getattr(qp, name).cpu(), getattr(ref, name).cpu()), name
    assert_codes_close(unpack_by_hand(qp.k_q), unpack_by_hand(ref.k_q))
    assert_codes_close(unpack_by_hand(qp.v_q), unpack_by_hand(ref.v_q))


# ---------------------------------------------------------------------------------------------
# The reference against the spec


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_reference_follows_spec(head_dim, page_size, dtype):
    k, v = make_pages(head_dim, page_size, dtype)
    qp = quantize_pages_4bit_ref(k, v)
    group = 32 if head_dim % 32 == 0 else 16
    assert (qp.group_size, qp.page_size, qp.head_dim, qp.num_slots) == (group, page_size, head_dim,
                                                                        NUM_PAGES)
    # Keys: per channel over the page's tokens.
    codes, s16, m16 = spec_quantize(k, axis=2)
    assert np.array_equal(qp.k_scale.numpy(), s16[:, :, 0]) and np.array_equal(qp.k_min.numpy(), m16[:, :, 0])
    assert np.array_equal(unpack_by_hand(qp.k_q).numpy(), codes)
    # Values: per token in groups of `group` consecutive channels.
    codes, s16, m16 = spec_quantize(value_groups(v, group), axis=-1)
    assert np.array_equal(qp.v_scale.numpy(), s16[..., 0]) and np.array_equal(qp.v_min.numpy(), m16[..., 0])
    assert np.array_equal(value_groups(unpack_by_hand(qp.v_q), group).numpy(), codes)
    # Dequantized: code * scale + min in fp32, within half a step of the input.
    k_hat, v_hat = dequantize_pages_4bit_ref(qp)
    want_k = unpack_by_hand(qp.k_q).float() * qp.k_scale.float()[:, :, None] + qp.k_min.float()[:, :, None]
    assert torch.equal(k_hat, want_k)
    check_error_bound(k, k_hat, axis=2)
    check_error_bound(value_groups(v, group), value_groups(v_hat, group), axis=-1)


IMPLS = [pytest.param((quantize_pages_4bit, dequantize_pages_4bit), id="triton"),
         pytest.param((quantize_pages_4bit_ref, dequantize_pages_4bit_ref), id="ref")]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("head_dim", [80, 128])
def test_constant_groups_are_exact(head_dim, impl):
    quantize, dequantize = impl
    group = 32 if head_dim % 32 == 0 else 16
    k, v = make_pages(head_dim, 16, torch.float32)
    k[0, 1, :, 7] = -1.5  # a constant key channel of one page
    v[1, 2, 4, group:2 * group] = 0.75  # a constant value group of one token
    qp = quantize(k, v)
    k_hat, v_hat = dequantize(qp)
    assert float(qp.k_scale[0, 1, 7]) == 0.0 and bool((unpack_by_hand(qp.k_q)[0, 1, :, 7] == 0).all())
    assert float(qp.v_scale[1, 2, 4, 1]) == 0.0
    assert bool((unpack_by_hand(qp.v_q)[1, 2, 4, group:2 * group] == 0).all())
    assert torch.equal(k_hat[0, 1, :, 7], k[0, 1, :, 7])
    assert torch.equal(v_hat[1, 2, 4, group:2 * group], v[1, 2, 4, group:2 * group])


def test_extreme_values_keep_error_bound():
    """Keys around +-1e4 and a huge outlier channel: per-channel scales keep every other
    channel's error to its own step (within float16 range)."""
    k, v = make_pages(64, 16, torch.float32)
    k = k * 1e3
    k[..., 0] += 2e4
    v = v * 1e4
    for quantize, dequantize in ((quantize_pages_4bit_ref, dequantize_pages_4bit_ref),
                                 (quantize_pages_4bit, dequantize_pages_4bit)):
        k_hat, v_hat = dequantize(quantize(k, v))
        check_error_bound(k, k_hat, axis=2)
        check_error_bound(value_groups(v, 32), value_groups(v_hat, 32), axis=-1)


def test_nbytes_and_empty_arena():
    qp = Quant4Pages.empty(2, 5, 16, 80)
    group = 16
    per_page = 16 * 40 * 2 + 80 * 2 * 2 + 16 * (80 // group) * 2 * 2
    assert qp.nbytes == 2 * 5 * per_page
    assert qp.take_slots(torch.tensor([4, 0])).num_slots == 2
    assert qp.slot_range(1, 4).num_slots == 3


# ---------------------------------------------------------------------------------------------
# Triton against the reference


def run_triton_case(head_dim: int, page_size: int, dtype: torch.dtype, device: str = "cpu") -> None:
    k, v = make_pages(head_dim, page_size, dtype, device=device)
    qp = quantize_pages_4bit(k, v)
    ref = quantize_pages_4bit_ref(k.cpu(), v.cpu())
    check_against_reference(qp, ref)
    # Dequantize the same pages both ways; FMA on the GPU may round code*s+m differently.
    for out_dtype in (torch.float32, dtype):
        got = dequantize_pages_4bit(qp, dtype=out_dtype)
        want = dequantize_pages_4bit_ref(Quant4Pages(*(t.cpu() for t in qp.tensors())), dtype=out_dtype)
        atol, rtol = KERNEL_TOL[out_dtype]
        for g, w in zip(got, want):
            assert g.dtype == out_dtype and g.shape == w.shape
            torch.testing.assert_close(g.cpu(), w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("head_dim,page_size,dtype", TRITON_CASES, ids=str)
def test_triton_matches_reference(head_dim, page_size, dtype):
    run_triton_case(head_dim, page_size, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("head_dim,page_size,dtype", TRITON_FULL, ids=str)
def test_triton_matches_reference_full(head_dim, page_size, dtype):
    run_triton_case(head_dim, page_size, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim,page_size,dtype", TRITON_FULL, ids=str)
def test_triton_matches_reference_cuda(head_dim, page_size, dtype):
    run_triton_case(head_dim, page_size, dtype, device="cuda")


@pytest.mark.parametrize("impl", [quantize_pages_4bit, quantize_pages_4bit_ref], ids=["triton", "ref"])
def test_out_into_slot_range_of_bigger_arena(impl):
    k, v = make_pages(80, 16, torch.float16)
    arena = Quant4Pages.empty(NUM_KV_HEADS, 7, 16, 80)
    for t in arena.tensors():
        t.fill_(0)
    view = arena.slot_range(2, 2 + NUM_PAGES)  # non-contiguous along the slot axis
    assert not view.k_q.is_contiguous()
    res = impl(k, v, out=view)
    assert res is view
    fresh = quantize_pages_4bit_ref(k, v)
    for got, want, whole in zip(view.tensors(), fresh.tensors(), arena.tensors()):
        assert torch.equal(got, want)
        assert not bool(whole[:, :2].any()) and not bool(whole[:, 2 + NUM_PAGES:].any())


def test_non_contiguous_inputs_and_no_mutation():
    k, v = make_pages(128, 16, torch.bfloat16)
    # Page-major storage viewed head-major: [P, nkv, ps, hd] -> [nkv, P, ps, hd].
    k_strided = k.transpose(0, 1).contiguous().transpose(0, 1)
    v_strided = v.transpose(0, 1).contiguous().transpose(0, 1)
    assert not k_strided.is_contiguous()
    k_before, v_before = k_strided.clone(), v_strided.clone()
    qp = quantize_pages_4bit(k_strided, v_strided)
    assert torch.equal(k_strided, k_before) and torch.equal(v_strided, v_before)
    check_against_reference(qp, quantize_pages_4bit_ref(k, v))
    # A strided arena dequantizes like a contiguous copy, and is not modified.
    arena = Quant4Pages.empty(NUM_KV_HEADS, 6, 16, 128)
    qp_view = arena.slot_range(1, 1 + NUM_PAGES)
    for dst, src in zip(qp_view.tensors(), qp.tensors()):
        dst.copy_(src)
    saved = [t.clone() for t in qp_view.tensors()]
    for got, want in zip(dequantize_pages_4bit(qp_view), dequantize_pages_4bit_ref(qp)):
        torch.testing.assert_close(got, want, atol=KERNEL_TOL[torch.float32][0],
                                   rtol=KERNEL_TOL[torch.float32][1])
    assert all(torch.equal(a, b) for a, b in zip(qp_view.tensors(), saved))


BAD_QUANTIZE = [
    (lambda k, v: (k[..., :72], v[..., :72]), "multiple of 16"),
    (lambda k, v: (k, v[:, :2]), "v_pages must have k_pages' shape"),
    (lambda k, v: (k, v.half()), "share one dtype"),
    (lambda k, v: (k.int(), v.int()), "share one dtype"),
    (lambda k, v: (k[0], v[0]), "k_pages must be a"),
]


@pytest.mark.parametrize("mutate,match", BAD_QUANTIZE)
def test_bad_inputs_rejected(mutate, match):
    k, v = make_pages(128, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        quantize_pages_4bit(*mutate(k, v))


def test_bad_out_and_arena_rejected():
    k, v = make_pages(64, 16, torch.float32)
    with pytest.raises(ValueError, match="out must hold"):
        quantize_pages_4bit(k, v, out=Quant4Pages.empty(NUM_KV_HEADS, NUM_PAGES + 1, 16, 64))
    with pytest.raises(ValueError, match="out must be a Quant4Pages"):
        quantize_pages_4bit(k, v, out=k)
    qp = quantize_pages_4bit_ref(k, v)
    with pytest.raises(ValueError, match="dtype must be one of"):
        dequantize_pages_4bit(qp, dtype=torch.int32)
    with pytest.raises(ValueError, match="k_scale must be torch.float16"):
        Quant4Pages(qp.k_q, qp.k_scale.float(), qp.k_min, qp.v_q, qp.v_scale, qp.v_min)
    with pytest.raises(ValueError, match="v_scale must be"):
        Quant4Pages(qp.k_q, qp.k_scale, qp.k_min, qp.v_q, qp.v_scale[..., :1], qp.v_min)


def test_fallback_without_triton(monkeypatch):
    """Where Triton cannot run, the launchers answer with the references (out= included)."""
    import gpu_kernels.quant4 as module

    monkeypatch.setattr(module, "use_triton", lambda t: False)
    k, v = make_pages(80, 16, torch.bfloat16)
    arena = Quant4Pages.empty(NUM_KV_HEADS, NUM_PAGES, 16, 80)
    assert quantize_pages_4bit(k, v, out=arena) is arena
    ref = quantize_pages_4bit_ref(k, v)
    assert all(torch.equal(a, b) for a, b in zip(arena.tensors(), ref.tensors()))
    for got, want in zip(dequantize_pages_4bit(arena, dtype=torch.float16),
                         dequantize_pages_4bit_ref(ref, dtype=torch.float16)):
        assert torch.equal(got, want)
