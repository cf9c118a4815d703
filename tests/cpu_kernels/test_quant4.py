"""cpu_kernels.quant4 (Numba) against the numpy reference (bit for bit), the reference against
the format's promises checked here in float64 (codes in range, dequantized values within
QUANT4_STEP_FRACTION of a step, constant groups exact, nibble order by hand), and against the
torch reference of the Triton kernels (one format for both).
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from cpu_kernels.quant4 import (
    Quant4PagesNp,
    dequantize_pages_4bit,
    quantize_pages_4bit,
    value_group_size,
)
from cpu_kernels.reference import dequantize_pages_4bit_ref, quantize_pages_4bit_ref
from tests.tolerances import QUANT4_STEP_FRACTION

HEAD_DIMS = [64, 80, 128, 256]
PAGE_SIZES = [16, 32]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# randn; randn + 100 (min far from 0); tiny values; one outlier key channel (KIVI's case).
DISTRIBUTIONS = ["randn", "offset", "tiny", "outlier"]
NUM_KV_HEADS, NUM_PAGES = 2, 3
FIELDS = ["k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min"]
DEFAULT_CASES = ([(hd, 16, dt, "randn") for hd in HEAD_DIMS for dt in DTYPES]
                 + [(hd, 32, torch.float32, d) for hd, d in zip(HEAD_DIMS, DISTRIBUTIONS)])
FULL_CASES = list(itertools.product(HEAD_DIMS, PAGE_SIZES, DTYPES, DISTRIBUTIONS))


def _case_id(case: tuple) -> str:
    hd, ps, dt, dist = case
    return f"d{hd}-ps{ps}-{str(dt).split('.')[-1]}-{dist}"


def make_pages(head_dim, page_size, dtype, dist, seed=0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (NUM_KV_HEADS, NUM_PAGES, page_size, head_dim)
    k, v = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
    if dist == "offset":
        k, v = k + 100, v - 100
    elif dist == "tiny":
        k, v = k * 1e-3, v * 1e-3
    elif dist == "outlier":
        k[..., 3] *= 50
    return k.to(dtype), v.to(dtype)


def unpack(packed: np.ndarray) -> np.ndarray:
    """Codes [..., 2 * B] of bytes [..., B]: byte j -> channel 2j (low), 2j + 1 (high)."""
    codes = np.empty(packed.shape[:-1] + (2 * packed.shape[-1],), np.int64)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    return codes


def _assert_same(a: Quant4PagesNp, b: Quant4PagesNp) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape, name
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8), err_msg=name)


def _check_step_bound(x: np.ndarray, x_hat: np.ndarray, axis: int) -> None:
    """|x_hat - x| <= QUANT4_STEP_FRACTION * (max - min) / 15 of each group (float64)."""
    step = (x.max(axis=axis, keepdims=True) - x.min(axis=axis, keepdims=True)) / 15
    assert np.all(np.abs(x_hat - x) <= QUANT4_STEP_FRACTION * step + 1e-12)


def _check_promises(k: torch.Tensor, v: torch.Tensor, qp: Quant4PagesNp, dist: str) -> None:
    nkv, num_pages, ps, hd = k.shape
    group = value_group_size(hd)
    k64, v64 = k.double().numpy(), v.double().numpy()
    k_hat, v_hat = dequantize_pages_4bit_ref(qp)
    _check_step_bound(k64, k_hat, axis=2)
    vg = (nkv, num_pages, ps, hd // group, group)
    _check_step_bound(v64.reshape(vg), v_hat.reshape(vg).astype(np.float64), axis=4)
    k_codes, v_codes = unpack(qp.k_q), unpack(qp.v_q).reshape(vg)
    assert k_codes.min() >= 0 and k_codes.max() <= 15
    if dist in ("randn", "outlier"):  # well-conditioned groups span the full code range
        lo_at = k64.argmin(axis=2)[:, :, None]
        hi_at = k64.argmax(axis=2)[:, :, None]
        assert np.all(np.take_along_axis(k_codes, lo_at, 2) == 0)
        assert np.all(np.take_along_axis(k_codes, hi_at, 2) == 15)
        v64g = v64.reshape(vg)
        assert np.all(np.take_along_axis(v_codes, v64g.argmin(4)[..., None], 4) == 0)
        assert np.all(np.take_along_axis(v_codes, v64g.argmax(4)[..., None], 4) == 15)


def _check_case(case: tuple, seed: int) -> None:
    hd, ps, dtype, dist = case
    k, v = make_pages(hd, ps, dtype, dist, seed)
    qp = quantize_pages_4bit(k, v)
    ref = quantize_pages_4bit_ref(k, v)
    _assert_same(qp, ref)
    k_hat, v_hat = dequantize_pages_4bit(qp)
    ref_k, ref_v = dequantize_pages_4bit_ref(ref)
    np.testing.assert_array_equal(k_hat, ref_k)
    np.testing.assert_array_equal(v_hat, ref_v)
    _check_promises(k, v, ref, dist)


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=_case_id)
def test_matches_reference(case):
    _check_case(case, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("case", FULL_CASES, ids=_case_id)
def test_matches_reference_full(case):
    _check_case(case, seed=1)


@pytest.mark.parametrize("hd", [64, 80])
def test_constant_groups_exact(hd):
    """A constant key channel or value group has scale 0, codes 0 and dequantizes exactly
    (the constants are float16 numbers, so the float16 min holds them)."""
    k, v = make_pages(hd, 16, torch.float32, "randn")
    consts = torch.tensor([1.25, -3.0, 0.0, 2.0**-10]).half().float()
    k[..., 5] = consts[0]
    k[:, 1, :, 6] = consts[1]
    group = value_group_size(hd)
    v[..., :group] = consts[2]
    v[:, 2, 4, group:2 * group] = consts[3]
    qp = quantize_pages_4bit(k, v)
    k_hat, v_hat = dequantize_pages_4bit(qp)
    assert np.all(qp.k_scale[..., 5] == 0) and np.all(unpack(qp.k_q)[..., 5] == 0)
    np.testing.assert_array_equal(k_hat[..., 5], k[..., 5].numpy())
    np.testing.assert_array_equal(k_hat[:, 1, :, 6], k[:, 1, :, 6].numpy())
    assert np.all(qp.v_scale[..., 0] == 0) and np.all(unpack(qp.v_q)[..., :group] == 0)
    np.testing.assert_array_equal(v_hat[..., :group], v[..., :group].numpy())
    np.testing.assert_array_equal(v_hat[:, 2, 4, group:2 * group], v[:, 2, 4, group:2 * group].numpy())


@pytest.mark.parametrize("hd", [64, 80])
def test_hand_unpacked_nibbles(hd):
    """Keys: even channels hold t, odd ones 15 - t (min 0, max 15: scale 1, code = value);
    values: channel c holds min(c % G, 15). Each byte is checked nibble by nibble."""
    ps, group = 16, value_group_size(hd)
    t = torch.arange(ps, dtype=torch.float32)[:, None]
    k = torch.where(torch.arange(hd) % 2 == 0, t, 15 - t).expand(NUM_KV_HEADS, 1, ps, hd)
    v = torch.clamp(torch.arange(hd) % group, max=15).float().expand(NUM_KV_HEADS, 1, ps, hd)
    qp = quantize_pages_4bit(k.contiguous(), v.contiguous())
    assert np.all(qp.k_scale == 1) and np.all(qp.k_min == 0) and np.all(qp.v_scale == 1)
    for tok, j in itertools.product(range(ps), range(hd // 2)):
        byte = int(qp.k_q[1, 0, tok, j])
        assert (byte & 15, byte >> 4) == (tok, 15 - tok)
        byte = int(qp.v_q[0, 0, tok, j])
        assert (byte & 15, byte >> 4) == (min(2 * j % group, 15), min((2 * j + 1) % group, 15))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_format_as_torch_reference(dtype):
    """Bit-identical to the torch reference that the Triton kernels follow."""
    sparse_ref = pytest.importorskip("gpu_kernels.reference_sparse")
    k, v = make_pages(80, 16, dtype, "outlier")
    qp = quantize_pages_4bit(k, v)
    ref = sparse_ref.quantize_pages_4bit_ref(k, v)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(qp, name), getattr(ref, name).numpy(), err_msg=name)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float16], ids=str)
def test_numpy_inputs(np_dtype):
    k, v = make_pages(64, 16, torch.float32, "randn")
    k_np, v_np = k.numpy().astype(np_dtype), v.numpy().astype(np_dtype)
    _assert_same(quantize_pages_4bit(k_np, v_np), quantize_pages_4bit(torch.from_numpy(k_np),
                                                                      torch.from_numpy(v_np)))


def test_non_contiguous_and_not_mutated():
    k, v = make_pages(128, 16, torch.bfloat16, "randn")
    big_k = torch.zeros(NUM_KV_HEADS, 2 * NUM_PAGES, 16, 160, dtype=torch.bfloat16)
    big_v = big_k.clone()
    big_k[:, 1::2, :, :128], big_v[:, 1::2, :, :128] = k, v
    k_view, v_view = big_k[:, 1::2, :, :128], big_v[:, 1::2, :, :128]
    before = big_k.clone(), big_v.clone()
    qp = quantize_pages_4bit(k_view, v_view)
    _assert_same(qp, quantize_pages_4bit_ref(k, v))
    assert torch.equal(big_k.view(torch.int16), before[0].view(torch.int16))
    assert torch.equal(big_v.view(torch.int16), before[1].view(torch.int16))
    sliced = Quant4PagesNp(*(getattr(qp, n)[:, 1:] for n in FIELDS))  # a slot range (views)
    k_hat, _ = dequantize_pages_4bit(sliced)
    np.testing.assert_array_equal(k_hat, dequantize_pages_4bit(qp)[0][:, 1:])


def test_sizes():
    k, v = make_pages(80, 16, torch.float16, "randn")
    qp = quantize_pages_4bit(k, v)
    assert qp.group_size == 16 and qp.head_dim == 80
    per_page_head = 2 * 16 * 40 + 2 * 2 * 80 + 2 * 2 * 16 * 5  # codes, key stats, value stats
    assert qp.nbytes == NUM_KV_HEADS * NUM_PAGES * per_page_head


BAD = [("head_dim", "multiple of 16"), ("shape", "share shape and dtype"),
       ("dtype", "float32, float16 or bfloat16"), ("ndim", "4 dimensions"),
       ("mixed", "share shape and dtype")]


@pytest.mark.parametrize("what,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_rejected(what, match):
    k, v = make_pages(64, 16, torch.float32, "randn")
    args = {"head_dim": (k[..., :40], v[..., :40]), "shape": (k, v[:, :2]),
            "dtype": (k.double(), v.double()), "ndim": (k[0], v[0]),
            "mixed": (k, v.half())}[what]
    with pytest.raises(ValueError, match=match):
        quantize_pages_4bit(*args)


def test_bad_arena_rejected():
    qp = quantize_pages_4bit(*make_pages(64, 16, torch.float32, "randn"))
    with pytest.raises(ValueError, match="k_scale must be float16"):
        Quant4PagesNp(qp.k_q, qp.k_scale.astype(np.float32), qp.k_min, qp.v_q, qp.v_scale, qp.v_min)
    with pytest.raises(ValueError, match="qp must be a Quant4PagesNp"):
        dequantize_pages_4bit(tuple(getattr(qp, n) for n in FIELDS))
