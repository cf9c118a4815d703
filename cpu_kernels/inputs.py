"""Input checks and zero-copy conversions shared by the Numba wrappers.

Every wrapper accepts numpy arrays or CPU torch tensors. Pages are handed to the kernels as
the views ``halfbits`` describes (float32, or the bits of float16 / bfloat16); queries and
index arrays are small and are copied into contiguous float32 / int32 when needed. Results
come back as numpy arrays, or as torch tensors sharing their memory when the query was one.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["index_array", "index_vector", "is_torch", "kernel_pages", "like_query", "numba_threads",
           "query_matrix"]


def is_torch(x: Any) -> bool:
    """True when ``x`` is a torch tensor (without importing torch for numpy callers)."""
    return type(x).__module__.startswith("torch")


def kernel_pages(x: Any, name: str, ndim: int) -> np.ndarray:
    """A float32 / float16 / bfloat16 array or CPU tensor as the view a kernel takes.

    float32 stays float32; float16 becomes its uint16 bits and bfloat16 (torch only) its
    int16 bits, both zero-copy views of the same memory (see ``cpu_kernels.halfbits``).

    Raises:
        ValueError: another dtype, device or number of dimensions (the message names ``name``).
    """
    if isinstance(x, np.ndarray):
        if x.dtype == np.float32:
            arr = x
        elif x.dtype == np.float16:
            arr = x.view(np.uint16)
        else:
            raise ValueError(f"{name} must be float32 or float16, got numpy {x.dtype}; cast it first")
    elif is_torch(x):
        arr = _torch_pages(x, name)
    else:
        raise ValueError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(arr.shape)}")
    return arr


def _torch_pages(x: Any, name: str) -> np.ndarray:
    import torch

    if x.device.type != "cpu":
        raise ValueError(f"{name} must live on the CPU, got device {x.device}; copy it to HOST first")
    x = x.detach()
    if x.dtype == torch.float32:
        return x.numpy()
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view(np.uint16)
    if x.dtype == torch.bfloat16:
        return x.view(torch.int16).numpy()
    raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}; cast it first")


def query_matrix(q: Any, name: str = "q") -> np.ndarray:
    """``q`` float32 [num_heads, head_dim] (numpy or CPU torch) as a contiguous numpy array."""
    if is_torch(q):
        if q.device.type != "cpu":
            raise ValueError(f"{name} must live on the CPU, got device {q.device}")
        q = q.detach().numpy() if str(q.dtype) == "torch.float32" else q
    if not isinstance(q, np.ndarray) or q.dtype != np.float32:
        raise ValueError(f"{name} must be float32, got {getattr(q, 'dtype', type(q).__name__)}; "
                         "cast it with .float() / .astype(np.float32)")
    if q.ndim != 2:
        raise ValueError(f"{name} must be [num_heads, head_dim], got shape {q.shape}")
    return np.ascontiguousarray(q)


def index_array(x: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """An integer array or tensor of exactly ``shape`` as contiguous int32 numpy."""
    arr = x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers (int32), got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ValueError(f"{name} values must fit in int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


def index_vector(x: Any, name: str, length: int | None = None) -> np.ndarray:
    """A 1-D integer array or tensor (of ``length`` entries when given) as contiguous int32."""
    if np.ndim(x) != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(np.shape(x))}")
    num = int(np.shape(x)[0])
    if length is not None and num != length:
        raise ValueError(f"{name} must have {length} entries, got {num}")
    return index_array(x, name, (num,))


def like_query(q: Any, *arrays: np.ndarray) -> tuple[Any, ...]:
    """``arrays`` as torch tensors (sharing memory) when ``q`` is a tensor, else unchanged."""
    if not is_torch(q):
        return arrays
    import torch

    return tuple(torch.from_numpy(a) for a in arrays)


@contextmanager
def numba_threads(num_threads: int | None) -> Iterator[int]:
    """Run the enclosed Numba parallel regions with ``num_threads`` threads (None: current).

    Numba's thread count is per calling thread; the previous value is restored on exit.
    """
    current = numba.get_num_threads()
    if num_threads is None:
        yield current
        return
    limit = numba.config.NUMBA_NUM_THREADS
    if not isinstance(num_threads, int) or not 1 <= num_threads <= limit:
        raise ValueError(f"num_threads must be an int in 1..{limit} (NUMBA_NUM_THREADS), "
                         f"got {num_threads!r}")
    numba.set_num_threads(num_threads)
    try:
        yield num_threads
    finally:
        numba.set_num_threads(current)
