"""Software prefetch of a page for Numba kernels (``llvm.prefetch``, a hint only).

Listed pages sit at arbitrary slots of a large arena, so the hardware prefetcher, which
follows sequential streams, restarts on every page. A kernel that walks a page list asks for
the next page while it computes on the current one; the hint compiles to ``prefetcht0`` on
x86-64 (SSE, so any AVX2 machine has it) and never faults.
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

__all__ = ["prefetch_page"]

_CACHE_LINE_BYTES = 64


@intrinsic
def _prefetch_col(typingctx, arr, i, j, k, c):
    """Prefetch the cache line holding ``arr[i, j, k, c]`` of a 4-D array."""
    if not isinstance(arr, types.Array) or arr.ndim != 4:
        return None
    sig = types.void(arr, i, j, k, c)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        inds = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, inds, wraparound=False)
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.prefetch.p0i8")
        # (address, rw = read, locality = 3 (keep in all levels), cache type = data)
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def prefetch_page(pages, h, slot, num_rows):
    """Hint that rows 0..num_rows-1 of page ``pages[h, slot]`` (4-D arena) are read soon."""
    row_bytes = pages.shape[3] * pages.itemsize
    for t in range(num_rows):
        for offset in range(0, row_bytes, _CACHE_LINE_BYTES):
            _prefetch_col(pages, h, slot, t, offset // pages.itemsize)
