"""One token through a weight matrix on the CPU: ``y = x W^T (+ b)`` for float32 ``W [n, k]``,
on every Numba thread.

A decode step's projections (q/k/v, o, the MLP, the LM head) are matrix-vector products, bound
by the bytes of the weights. torch's ``F.linear`` hands a one-row product to its BLAS, and on
the team's 2-core AMD machine that BLAS runs it on one thread: 10-11 GB/s of weights, where
both cores read 25-28 GB/s. This kernel cuts the output rows into blocks of ``_ROWS`` over the
threads and sums each row's products with reassociation allowed, so LLVM vectorizes them.

Measured side by side on that machine (fp32, matrices read from memory, not cache; medians):

==============  =========  ==========
shape [n, k]    F.linear   this kernel
==============  =========  ==========
576 x 576       10 GB/s    16 GB/s
3072 x 576      11 GB/s    20 GB/s
49152 x 576     11 GB/s    28 GB/s
==============  =========  ==========

The sums run in another order than the BLAS's, so results differ from ``F.linear`` in the last
bits (about 1e-6 relative), as two BLAS builds do; the exactness tests against transformers hold
the model's tokens and logits.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit, prange

__all__ = ["linear_row", "linear_row_trusted"]

_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_ROWS = 8  # output rows per parallel item


@njit(parallel=True, fastmath=_FASTMATH, cache=True, nogil=True)
def _matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    n, k = w.shape
    for block in prange((n + _ROWS - 1) // _ROWS):
        first = block * _ROWS
        for r in range(first, min(first + _ROWS, n)):
            acc = np.float32(0.0)
            for j in range(k):
                acc += w[r, j] * x[j]
            out[r] = acc


def linear_row(x: Any, w: Any, b: Any = None) -> Any:
    """``F.linear(x, w, b)`` for one row: ``x [1, k]``, ``w [n, k]``, ``b [n]`` or None, all
    float32 CPU torch tensors; returns ``[1, n]``.

    Raises:
        ValueError: another dtype, device or shape, or a weight that is not C-contiguous (the
            kernel streams its rows).
    """
    import torch

    for name, t in (("x", x), ("w", w), ("b", b)):
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError(f"linear_row: {name} must be a float32 CPU tensor, got {t.dtype} on {t.device}; "
                             "use torch.nn.functional.linear for other types")
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear_row takes x [1, k] and w [n, k], got {tuple(x.shape)} and {tuple(w.shape)}")
    if not w.is_contiguous():
        raise ValueError("linear_row: w must be C-contiguous (call .contiguous() once when loading it)")
    if b is not None and tuple(b.shape) != (w.shape[0],):
        raise ValueError(f"linear_row: b must be [{w.shape[0]}], got {tuple(b.shape)}")
    return linear_row_trusted(x.detach().contiguous(), w.detach(), None if b is None else b.detach())


def linear_row_trusted(x: Any, w: Any, b: Any = None) -> Any:
    """``linear_row`` without its checks, for callers that hold them true by construction (a
    runner's decode step: C-contiguous float32 weights, one contiguous float32 row)."""
    import torch

    out = torch.empty(1, w.shape[0], dtype=torch.float32)
    _matvec(w.numpy(), x.numpy()[0], out.numpy()[0])
    return out if b is None else out.add_(b)
