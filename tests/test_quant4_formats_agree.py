"""One 4-bit page format on both sides: pages quantized by the Numba kernel (CPU, HOST pages)
and by the Triton kernel / torch reference (device) are the same bytes, so a page written by
one can be read by the other (a page moves between tiers as stored, never re-quantized)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import cpu_kernels
from gpu_kernels.quant4 import dequantize_pages_4bit, quantize_pages_4bit

FIELDS = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")
# Codes may differ by one where (x - m) / s lands within an ulp of a rounding boundary (the two
# sides divide in different orders of operations); scales and mins are computed identically.
MAX_CODE_MISMATCH = 1e-3


def _codes(packed: np.ndarray) -> np.ndarray:
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1).astype(np.int16)


@pytest.mark.parametrize("head_dim", [64, 80, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_numba_and_triton_pages_are_the_same_bytes(head_dim, dtype):
    g = torch.Generator().manual_seed(head_dim)
    shape = (2, 5, 16, head_dim)
    k = (torch.randn(shape, generator=g) * 3 + torch.linspace(-4, 4, head_dim)).to(dtype)
    v = torch.randn(shape, generator=g).to(dtype)
    k[:, 1, :, 3] = 0.75  # a constant channel: scale 0, exact
    ours = cpu_kernels.quantize_pages_4bit(k, v)
    theirs = quantize_pages_4bit(k, v)
    for name in ("k_scale", "k_min", "v_scale", "v_min"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name).numpy(), err_msg=name)
    for name in ("k_q", "v_q"):
        a, b = _codes(getattr(ours, name)), _codes(getattr(theirs, name).numpy())
        assert np.abs(a - b).max() <= 1, name
        assert (a != b).mean() <= MAX_CODE_MISMATCH, name
    k_np, v_np = cpu_kernels.dequantize_pages_4bit(ours)
    k_t, v_t = dequantize_pages_4bit(theirs)
    step_k = np.abs(ours.k_scale.astype(np.float32)).max()
    np.testing.assert_allclose(k_np, k_t.numpy(), atol=float(step_k) * 1.01, rtol=0)
    assert np.isclose(k_np[:, 1, :, 3], 0.75).all()
