"""4-bit pages as bytes: one packed blob per page, the same in a memory arena, a DISK slot,
a staging buffer and a DocCache file.

The format of the values is the kernels' (``cpu_kernels.quant4``: keys per channel over the
page, KIVI, Liu et al. 2024; values per token in groups of G channels, FlexGen, Sheng et al.
2023). A page's blob holds every KV head, field after field::

    k_q      uint8   [num_kv_heads, page_size, head_dim // 2]   codes, two per byte
    v_q      uint8   [num_kv_heads, page_size, head_dim // 2]
    k_scale  float16 [num_kv_heads, head_dim]                   per channel
    k_min    float16 [num_kv_heads, head_dim]
    v_scale  float16 [num_kv_heads, page_size, head_dim // G]   per token and group
    v_min    float16 [num_kv_heads, page_size, head_dim // G]

Rows of blobs ``raw`` [n, stride] (stride >= ``page_bytes``: a DISK slot pads to 4 KiB) are
read by the kernels in place through head-major strided views (``views``, ``numpy_views``):
``k_q`` [num_kv_heads, n, page_size, head_dim // 2] and so on, page p at row p. Every field
starts at an even offset, so the float16 views are aligned.

SmolLM2-135M (3 KV heads, head_dim 64, 32-token pages): 7680 bytes against 49152 in float32
(0.156x; 8192 in a 4 KiB DISK slot, 0.167x). Gemma 3 270M (1 KV head, head_dim 256):
10240 against 65536 (0.156x; 12288 on DISK, 0.1875x).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from cpu_kernels.attention_4bit import BLOB_FIELDS
from cpu_kernels.quant4 import Quant4PagesNp, dequantize_pages_4bit, quantize_pages_4bit, value_group_size
from gpu_kernels.reference_sparse import Quant4Pages
from storage import PackedArena, Tier

__all__ = ["PackedPools", "Quant4Layout"]

_ORDER = ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min")  # the kernels' argument order


@dataclasses.dataclass(frozen=True, slots=True)
class Quant4Layout:
    """Where each field of a 4-bit page lies in its blob (module docstring).

    Raises:
        ValueError: head_dim is not a positive multiple of 16, or a size is not positive.
    """

    num_kv_heads: int
    page_size: int
    head_dim: int

    def __post_init__(self) -> None:
        value_group_size(self.head_dim)  # raises for a head_dim the format cannot hold
        if self.num_kv_heads < 1 or self.page_size < 1:
            raise ValueError(f"num_kv_heads and page_size must be >= 1, got {self.num_kv_heads}, {self.page_size}")

    def _shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        nkv, ps, hd = self.num_kv_heads, self.page_size, self.head_dim
        groups = hd // value_group_size(hd)
        codes, stats, per_token = (nkv, ps, hd // 2), (nkv, hd), (nkv, ps, groups)
        u8, f16 = np.dtype(np.uint8), np.dtype(np.float16)
        return {"k_q": (codes, u8), "v_q": (codes, u8), "k_scale": (stats, f16), "k_min": (stats, f16),
                "v_scale": (per_token, f16), "v_min": (per_token, f16)}

    def _spans(self) -> dict[str, tuple[int, int, tuple[int, ...], np.dtype]]:
        """field -> (byte offset, bytes, per-page shape, dtype)."""
        out, at = {}, 0
        for name, (shape, dtype) in self._shapes().items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            out[name] = (at, nbytes, shape, dtype)
            at += nbytes
        return out

    @property
    def page_bytes(self) -> int:
        """Bytes of one page's blob (no padding)."""
        return sum(nbytes for _, nbytes, _, _ in self._spans().values())

    def blob_fields(self) -> np.ndarray:
        """Each field's byte offset in a blob, int64 [6] in ``BLOB_FIELDS`` order (the fused CPU
        kernel's ``attention_blobs_4bit_trusted`` reads blobs in place with them)."""
        spans = self._spans()
        return np.array([spans[f][0] for f in BLOB_FIELDS], dtype=np.int64)

    def views(self, raw: torch.Tensor) -> Quant4Pages:
        """Head-major views into blobs ``raw`` (uint8 [n, stride], rows contiguous): page p
        of the result is row p. No copy; writes through them land in ``raw``."""
        self._check(raw.shape, raw.dtype == torch.uint8, raw.stride(-1) == 1)
        n = raw.shape[0]
        parts = {}
        for name, (at, nbytes, shape, dtype) in self._spans().items():
            t = raw[:, at:at + nbytes]
            if dtype == np.float16:
                t = t.view(torch.float16)
            parts[name] = t.view(n, *shape).transpose(0, 1)  # view: never a silent copy
        return Quant4Pages(*(parts[f] for f in _ORDER))

    def numpy_views(self, raw: np.ndarray | torch.Tensor) -> Quant4PagesNp:
        """``views`` as numpy arrays (for the Numba kernels); ``raw`` numpy or CPU torch."""
        arr = raw.numpy() if isinstance(raw, torch.Tensor) else raw
        self._check(arr.shape, arr.dtype == np.uint8, arr.strides[-1] == 1)
        n = arr.shape[0]
        parts = {}
        for name, (at, nbytes, shape, dtype) in self._spans().items():
            a = arr[:, at:at + nbytes].view(dtype)
            parts[name] = np.lib.stride_tricks.as_strided(
                a, shape=(shape[0], n, *shape[1:]),
                strides=(a.strides[1] * int(np.prod(shape[1:])), a.strides[0],
                         *_row_strides(shape[1:], dtype.itemsize)))
        return Quant4PagesNp(*(parts[f] for f in _ORDER))

    def quantize_into(self, raw: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize full pages k, v [num_kv_heads, n, page_size, head_dim] (any float dtype)
        into blobs ``raw`` [n, stride]: the Numba kernel on the CPU, Triton on CUDA (one
        format, bit for bit)."""
        if raw.device.type == "cpu":
            quantize_pages_4bit(k.to("cpu"), v.to("cpu"), out=self.numpy_views(raw))
            return
        from gpu_kernels.quant4 import quantize_pages_4bit as quantize_cuda

        quantize_cuda(k.to(raw.device), v.to(raw.device), out=self.views(raw))

    def dequantize(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V float32 [num_kv_heads, n, page_size, head_dim] of blobs ``raw`` (on raw's device)."""
        if raw.device.type == "cpu":
            k, v = dequantize_pages_4bit(self.numpy_views(raw))
            return torch.from_numpy(k), torch.from_numpy(v)
        from gpu_kernels.quant4 import dequantize_pages_4bit as dequantize_cuda

        return dequantize_cuda(self.views(raw))

    def _check(self, shape: tuple[int, ...], is_bytes: bool, rows_contiguous: bool) -> None:
        if len(shape) != 2 or not is_bytes or not rows_contiguous or shape[1] < self.page_bytes:
            raise ValueError(f"4-bit pages must be uint8 [n, stride >= {self.page_bytes}] with contiguous rows, "
                             f"got shape {tuple(shape)}")


def _row_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """C-order byte strides of an array of ``shape``."""
    strides, step = [], itemsize
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


@dataclasses.dataclass(frozen=True)
class PackedPools:
    """Where a paged KV keeps its 4-bit pages: the blob layout, a ``PackedArena`` per memory
    tier that holds them (DEVICE, HOST), and how many full pages before the tail stay exact
    (the recent window; the sink page 0 and the partly filled tail page stay exact too). With
    4-bit pages a DISK slot holds one packed page."""

    layout: Quant4Layout
    arenas: dict[Tier, PackedArena]
    window_pages: int = 2
