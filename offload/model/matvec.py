"""How a runner multiplies activations by its weights.

Prefill chunks are matrix-matrix products and stay with torch's ``F.linear``, whose BLAS
threads them. A decode step's one-token products go, on a CPU with fp32 weights, to the Numba
row kernel on every thread (``cpu_kernels.matvec``): measured on the team's 2-core machine,
the BLAS ran them on one thread at 10-11 GB/s of weights against 16-28 GB/s for the kernel.
``MatvecKernel.TORCH`` keeps ``F.linear`` everywhere.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from cpu_kernels.matvec import linear_row_trusted

__all__ = ["Linear", "make_linear", "weight_matrices"]

Linear = Callable[..., torch.Tensor]  # (x [T, k], w [n, k], b [n] | None = None) -> [T, n]


def weight_matrices(runner: object) -> list[torch.Tensor]:
    """The LM head and every 2-D tensor of a runner's layer weight dataclasses."""
    layers = runner.layers  # type: ignore[attr-defined]
    found = [getattr(lw, f.name) for lw in layers for f in dataclasses.fields(lw)]
    return [runner.lm_head] + [t for t in found if t is not None and t.dim() == 2]  # type: ignore[attr-defined]


def make_linear(device: torch.device, dtype: torch.dtype, weights: Iterable[torch.Tensor | None], *,
                row_kernel: bool = True) -> Linear:
    """The linear function of a runner whose matrices are ``weights``: ``F.linear``, or with
    ``row_kernel`` on a CPU with fp32 weights, the row kernel for one-token inputs.

    Raises:
        ValueError: a weight matrix the row kernel cannot stream (not C-contiguous fp32).
    """
    if not row_kernel or device.type != "cpu" or dtype != torch.float32:
        return F.linear
    for w in weights:
        if w is not None and (w.dtype != torch.float32 or not w.is_contiguous()):
            raise ValueError(f"the row kernel streams C-contiguous fp32 weights, got a {tuple(w.shape)} "
                             f"{w.dtype} matrix (contiguous: {w.is_contiguous()})")

    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[0] == 1 and x.dtype == torch.float32:
            return linear_row_trusted(x if x.is_contiguous() else x.contiguous(), w, b)
        return F.linear(x, w, b)

    return linear
