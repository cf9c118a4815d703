"""cpu_kernels.halfbits: 16-bit float conversions inside Numba against numpy / torch casts.

fp16 -> fp32 is checked on all 65536 bit patterns; fp32 -> fp16 (round to nearest even) on
random bit patterns, random magnitudes across fp16's range and the boundary values.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from numba import njit

from cpu_kernels.halfbits import bf16_bits_to_f32, f16_bits_to_f32, f32_to_f16_bits

# Boundaries: zeros, the largest half and the overflow tie, subnormal ties and the smallest
# normal, infinities.
EDGE_F32 = [0.0, -0.0, 65504.0, 65519.996, 65520.0, -65520.0, 2.0**-25, 2.0**-24,
            1.5 * 2.0**-24, 2.5 * 2.0**-24, 2.0**-25 * 1.0000001, 2.0**-14,
            2.0**-14 * (1 - 2.0**-11), 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, np.inf, -np.inf]


@njit
def _f16_to_f32_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = f16_bits_to_f32(bits[i])


@njit
def _f32_to_f16_all(x, out):
    for i in range(x.shape[0]):
        out[i] = f32_to_f16_bits(x[i])


@njit
def _bf16_to_f32_all(bits, out):
    for i in range(bits.shape[0]):
        out[i] = bf16_bits_to_f32(bits[i])


def test_f16_to_f32_every_pattern():
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, np.float32)
    _f16_to_f32_all(bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    assert nan.sum() == 2 * 1023 and np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint32), expected[~nan].view(np.uint32))


def _f32_samples() -> np.ndarray:
    gen = np.random.default_rng(0)
    raw = gen.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    mags = gen.standard_normal(200_000) * np.exp(gen.uniform(-25, 12, 200_000))
    return np.concatenate([raw, mags.astype(np.float32), np.array(EDGE_F32, np.float32)])


def test_f32_to_f16_rounds_like_numpy():
    x = _f32_samples()
    out = np.empty(x.shape, np.uint16)
    _f32_to_f16_all(x, out)
    with np.errstate(over="ignore"):
        expected = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    assert np.isnan(out[nan].view(np.float16)).all()
    np.testing.assert_array_equal(out[~nan], expected[~nan])


@pytest.mark.parametrize("values", ["random", "edges"])
def test_bf16_to_f32(values):
    x = torch.randn(10_000) * 1e3 if values == "random" else torch.tensor(EDGE_F32 + [1e38, -3e-39])
    b = x.to(torch.bfloat16)
    out = np.empty(b.numel(), np.float32)
    _bf16_to_f32_all(b.view(torch.int16).numpy(), out)
    np.testing.assert_array_equal(out, b.float().numpy())
