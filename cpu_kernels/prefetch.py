"""Software prefetch of a page for Numba kernels (``llvm.prefetch``, a hint only).

Listed pages sit at arbitrary slots of a large arena, so the hardware prefetcher, which
follows sequential streams, restarts on every page. A kernel that walks a page list asks for
the next page's rows while it computes on the current one's; the hint compiles to ``prefetcht0`` on
x86-64 (SSE, so any AVX2 machine has it) and never faults.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = ["prefetch_rows"]

_CACHE_LINE_BYTES = 64


@intrinsic
def _prefetch_at(typingctx, arr, h, slot, row, byte_offset):
    """Prefetch the cache line ``byte_offset`` bytes past ``arr[h, slot, row, 0]`` (4-D)."""
    if not isinstance(arr, types.Array) or arr.ndim != 4:
        return None
    sig = types.void(arr, h, slot, row, byte_offset)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        zero = context.get_constant(types.intp, 0)
        inds = [context.cast(builder, v, t, types.intp)
                for v, t in zip(args[1:4], signature.args[1:4])] + [zero]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        offset = context.cast(builder, args[4], signature.args[4], types.intp)
        addr = builder.gep(builder.bitcast(ptr, i8p), [offset])
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # (address, rw = read, locality = 3 (keep in all levels), cache type = data)
        builder.call(fn, [addr, i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


def prefetch_rows(pages, h, slot, start, stop):  # pragma: no cover - replaced in njit
    """Hint that rows start..stop-1 of page ``pages[h, slot]`` (4-D arena) are read soon.

    Inside njit only. Kernels ask for a few rows of the next page per row they compute on,
    so the hints spread over the work instead of flooding the miss queue at once.
    """
    raise NotImplementedError("prefetch_rows is only callable from Numba-compiled code")


@overload(prefetch_rows, jit_options={"nogil": True})
def _prefetch_rows_impl(pages, h, slot, start, stop):
    if not isinstance(pages, types.Array) or pages.ndim != 4:
        return None
    if pages.layout == "C":
        def run(pages, h, slot, start, stop):
            row_bytes = pages.shape[3] * pages.itemsize
            for offset in range(start * row_bytes, stop * row_bytes, _CACHE_LINE_BYTES):
                _prefetch_at(pages, h, slot, 0, offset)
        return run

    def by_row(pages, h, slot, start, stop):
        for t in range(start, stop):
            for offset in range(0, pages.shape[3] * pages.strides[3], _CACHE_LINE_BYTES):
                _prefetch_at(pages, h, slot, t, offset)
    return by_row
