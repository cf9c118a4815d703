"""cpu_kernels.matvec and offload.model.matvec: one token through a weight matrix on the CPU.

The row kernel is checked against a float64 numpy product (an independent reference) over
shapes whose row counts are not multiples of its block, with and without a bias; its input
checks; and the runner's choice between it and ``F.linear``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpu_kernels.matvec import linear_row, linear_row_trusted
from offload.model.matvec import make_linear
from tests.tolerances import KERNEL_TOL

ATOL, RTOL = KERNEL_TOL[torch.float32]


def _problem(n: int, k: int, seed: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    x = torch.randn(1, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    return x, w, b


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> np.ndarray:
    y = w.numpy().astype(np.float64) @ x.numpy()[0].astype(np.float64)
    return (y if b is None else y + b.numpy().astype(np.float64))[None, :]


@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (13, 576), (576, 576), (1000, 1537), (4099, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_row_kernel_matches_float64_reference(n, k, bias):
    x, w, b = _problem(n, k, seed=n * 7 + k, bias=bias)
    got = linear_row(x, w, b)
    assert got.shape == (1, n) and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _reference(x, w, b), atol=ATOL, rtol=RTOL)


def test_row_kernel_takes_a_strided_row():
    x, w, _ = _problem(96, 40, seed=3, bias=False)
    wide = torch.zeros(1, 80)
    wide[0, ::2] = x[0]
    strided = wide[:, ::2]
    assert not strided.is_contiguous()
    np.testing.assert_allclose(linear_row(strided, w).numpy(), _reference(x, w, None), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("bad,match", [
    (lambda x, w, b: (x.double(), w, b), "float32 CPU tensor"),
    (lambda x, w, b: (x, w.half(), b), "float32 CPU tensor"),
    (lambda x, w, b: (torch.cat([x, x]), w, b), r"x \[1, k\]"),
    (lambda x, w, b: (x[:, :-1], w, b), r"x \[1, k\]"),
    (lambda x, w, b: (torch.ones(1, 16), w.t(), None), "C-contiguous"),
    (lambda x, w, b: (x, w, b[:-1]), r"b must be \[16\]"),
])
def test_row_kernel_rejects_bad_input(bad, match):
    x, w, b = _problem(16, 8, seed=1, bias=True)
    with pytest.raises(ValueError, match=match):
        linear_row(*bad(x, w, b))


def test_runner_linear_uses_the_kernel_for_one_row_and_torch_for_more():
    x, w, b = _problem(300, 96, seed=5, bias=True)
    linear = make_linear(torch.device("cpu"), torch.float32, [w])
    assert linear is not F.linear
    assert torch.equal(linear(x, w, b), linear_row_trusted(x, w, b))  # the kernel's own bits
    rows = torch.randn(5, 96)
    assert torch.equal(linear(rows, w, b), F.linear(rows, w, b))  # prefill chunks stay with torch
    np.testing.assert_allclose(linear(x, w, b).numpy(), _reference(x, w, b), atol=ATOL, rtol=RTOL)


def test_runner_linear_is_torch_where_the_kernel_does_not_apply():
    w = torch.randn(8, 4)
    cpu = torch.device("cpu")
    assert make_linear(cpu, torch.float32, [w], row_kernel=False) is F.linear
    assert make_linear(cpu, torch.bfloat16, [w.bfloat16()]) is F.linear
    assert make_linear(torch.device("cuda"), torch.float32, [w]) is F.linear
    with pytest.raises(ValueError, match="C-contiguous fp32"):
        make_linear(cpu, torch.float32, [torch.randn(4, 8).t()])
