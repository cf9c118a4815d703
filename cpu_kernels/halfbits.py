"""16-bit floats inside Numba: bit-level fp16/bf16 <-> fp32 and page loaders.

Numba has no float16 type on the CPU, so 16-bit pages travel into kernels as integer views of
the same memory: float16 as ``uint16`` and bfloat16 as ``int16`` (torch's
``t.view(torch.int16).numpy()``). The integer dtype is the tag: kernels are compiled once per
input type, and the loaders below pick the conversion at compile time.

- bf16 -> fp32: the 16 bits shifted left by 16, reinterpreted (exact).
- fp16 -> fp32: exact for zeros, subnormals, normals, infinities and NaN.
- fp32 -> fp16: IEEE round-to-nearest-even (numpy's ``astype(np.float16)``), overflow to inf.

Only plain integer arithmetic is used, so the code compiles to any x86-64 target (no F16C or
AVX-512 conversion instructions are required).

Numba's on-disk cache (``cache=True``) is keyed on the file of the cached function only: after
editing this module, delete ``cpu_kernels/__pycache__/*.nbi`` / ``*.nbc`` so the kernels that
inline these helpers are rebuilt.
"""
from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

__all__ = ["bf16_bits_to_f32", "f16_bits_to_f32", "f32_to_f16_bits", "load_page", "load_row"]

_F16_EXP_SHIFT = 13  # fp32 has 13 more mantissa bits than fp16
_F16_TO_F32_BIAS = (127 - 15) << 23  # exponent re-bias, in fp32 bit position


@njit(cache=True, nogil=True)
def f16_bits_to_f32(h: int) -> float:
    """The float32 value of IEEE half-precision bits ``h`` (uint16).

    Branch-free (integer masks), so loops over many values vectorize.
    """
    bits = np.uint32(h)
    sign = (bits & np.uint32(0x8000)) << np.uint32(16)
    mag = bits & np.uint32(0x7FFF)  # exponent and mantissa
    # Normal: shift into place and add 112 to the exponent; inf / NaN (exponent 31) need
    # another 112 to reach 255 (a NaN keeps its payload).
    special = np.uint32(mag >= np.uint32(0x7C00))
    normal = ((mag << np.uint32(_F16_EXP_SHIFT)) + np.uint32(_F16_TO_F32_BIAS)
              + special * np.uint32(_F16_TO_F32_BIAS))
    # Zero or subnormal (exponent 0): mag * 2**-24, exact in float32.
    tiny = np.float32(np.float32(mag) * np.float32(5.9604644775390625e-08)).view(np.uint32)
    pick_tiny = np.uint32(0) - np.uint32(mag < np.uint32(0x400))  # all ones or zero
    out = (tiny & pick_tiny) | (normal & ~pick_tiny) | sign
    return np.uint32(out).view(np.float32)


@njit(cache=True, nogil=True)
def bf16_bits_to_f32(b: int) -> float:
    """The float32 value of bfloat16 bits ``b`` (int16 or uint16)."""
    return np.uint32((np.uint32(b) & np.uint32(0xFFFF)) << np.uint32(16)).view(np.float32)


@njit(cache=True, nogil=True)
def f32_to_f16_bits(x: float) -> int:
    """IEEE half bits (uint16) of float32 ``x``, rounded to nearest even."""
    bits = np.float32(x).view(np.uint32)
    sign = (bits >> np.uint32(16)) & np.uint32(0x8000)
    mag = bits & np.uint32(0x7FFFFFFF)
    if mag >= np.uint32(0x7F800000):  # inf stays inf; NaN becomes a quiet NaN
        nan = np.uint32(0x200) if mag > np.uint32(0x7F800000) else np.uint32(0)
        return np.uint16(sign | np.uint32(0x7C00) | nan)
    if mag >= np.uint32(0x477FF000):  # >= 65520 rounds to inf
        return np.uint16(sign | np.uint32(0x7C00))
    if mag < np.uint32(0x38800000):  # below 2**-14: a half subnormal (or zero)
        if mag <= np.uint32(0x33000000):  # <= 2**-25 (the tie goes to even: zero)
            return np.uint16(sign)
        full = (mag & np.uint32(0x7FFFFF)) | np.uint32(0x800000)
        shift = np.uint32(126) - (mag >> np.uint32(23))  # 14..24
        code = full >> shift
        rest = full & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if rest > half or (rest == half and (code & np.uint32(1))):
            code += np.uint32(1)  # may carry into the smallest normal: still correct bits
        return np.uint16(sign | code)
    code = (mag - np.uint32(0x38000000)) >> np.uint32(_F16_EXP_SHIFT)
    rest = mag & np.uint32(0x1FFF)
    if rest > np.uint32(0x1000) or (rest == np.uint32(0x1000) and (code & np.uint32(1))):
        code += np.uint32(1)  # a carry into the exponent is the right rounding
    return np.uint16(sign | code)


def load_page(src, h, slot, n, buf):  # pragma: no cover - replaced by the overload in njit
    """Rows 0..n-1 of page ``src[h, slot]`` as a C-contiguous float32 [page_size, D] array.

    Inside njit only. Contiguous float32 pages are returned as views (no copy); strided
    float32 pages and 16-bit pages (uint16 = fp16 bits, int16 = bf16 bits) are converted
    into ``buf`` (float32 [page_size, D]); rows past n are then left as they were.
    """
    raise NotImplementedError("load_page is only callable from Numba-compiled code")


def load_row(src, h, slot, buf):  # pragma: no cover - replaced by the overload in njit
    """Row ``src[h, slot]`` of a 3-D array as a C-contiguous float32 [D] array (see load_page)."""
    raise NotImplementedError("load_row is only callable from Numba-compiled code")


@njit(cache=True, nogil=True)
def _f32_value(x):
    return x


def _element_converter(dtype):
    """The njit function widening one element of ``dtype`` to float32 (None: unsupported)."""
    return {types.float32: _f32_value, types.uint16: f16_bits_to_f32,
            types.int16: bf16_bits_to_f32}.get(dtype)


@overload(load_page, jit_options={"nogil": True})
def _load_page_impl(src, h, slot, n, buf):
    if src.dtype == types.float32 and src.layout == "C":
        def view(src, h, slot, n, buf):
            return src[h, slot]
        return view
    convert = _element_converter(src.dtype)
    if convert is None:
        return None

    def copy(src, h, slot, n, buf):
        page = src[h, slot]
        for t in range(n):
            for c in range(buf.shape[1]):
                buf[t, c] = convert(page[t, c])
        return buf
    return copy


@overload(load_row, jit_options={"nogil": True})
def _load_row_impl(src, h, slot, buf):
    if src.dtype == types.float32 and src.layout == "C":
        def view(src, h, slot, buf):
            return src[h, slot]
        return view
    convert = _element_converter(src.dtype)
    if convert is None:
        return None

    def copy(src, h, slot, buf):
        row = src[h, slot]
        for c in range(buf.shape[0]):
            buf[c] = convert(row[c])
        return buf
    return copy
