"""The probes behind ``offload profile``: one small function per constant of ``HardwareProfile``.

Every probe does real work of the kind the cost model (``planner.cost``) charges for and
returns the median over ``repeats`` timed runs after one untimed warm-up:

- memcpy / host->device copies (``copy_gbps``, ``host_to_device_gbps``);
- cold disk reads by extent size and write + fsync (``disk_probe``), with O_DIRECT like
  ``storage.disk_store.DiskExtentStore`` or, where the file system refuses it, buffered I/O
  with the page cache dropped (``posix_fadvise(DONTNEED)``) before every pass;
- page attention reading K/V (``cpu_attention_gbps``: the Numba kernel; ``device_attention_gbps``:
  the Triton kernel on CUDA) and reading 4-bit pages, dequantization included
  (``cpu_attention_4bit_gbps``, ``device_attention_4bit_gbps``), the matrix-vector products of a
  decode step (``weights_gbps``), dense matmul (``matmul_tflops``);
- on a CPU-only machine, how much slower that compute runs while cold disk reads run beside it
  (``read_interference``: seconds lost per GB read);
- free memory per tier (``free_bytes``).

The engine's own overheads (``layer_overhead_s``, ``piece_overhead_s``) are measured by
``offload.tuning.engine_probe``, which builds an ``Engine``: none of these probes imports the
engine, so the engine may import what sits below it without a circle.

Working sets are larger than the last-level cache, so the rates are those of memory, not of
cache. Units: GB/s (1e9 bytes/s), TFLOP/s, seconds. The disk probe's scratch file is removed
before it returns, also on error; every thread it starts has ended by then.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import errno
import logging
import os
import shutil
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import psutil
import torch

from offload.model.matvec import make_linear
from storage.aligned import DISK_ALIGNMENT, AlignedBuffer

__all__ = [
    "DiskResult", "median_seconds", "device_sync", "copy_gbps", "host_to_device_gbps", "disk_probe",
    "cpu_attention_gbps", "device_attention_gbps", "cpu_attention_4bit_gbps", "device_attention_4bit_gbps",
    "weights_gbps", "read_interference", "matmul_tflops",
    "free_bytes",
]

logger = logging.getLogger(__name__)

KiB, MiB = 2**10, 2**20
_O_DIRECT: int = getattr(os, "O_DIRECT", 0)
_UNSUPPORTED_DIRECT = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}
_WRITE_PIECE_BYTES = 8 * MiB  # one pwrite of the scratch file
_PASS_BUDGET_S = 2.0  # read passes of one extent size: more repeats only while under this
_SMOLLM2_KV = (3, 3, 64)  # (num_kv_heads, query heads per KV head, head_dim) of the CPU probe
_LLAMA8B_KV = (8, 4, 128)  # the same for the device probe (bigger heads keep a GPU busy)
_PAGE_TOKENS = 32


def median_seconds(fn: Callable[[], object], repeats: int, *, sync: Callable[[], None] | None = None,
                   warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` untimed ones;
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before every clock read."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_sync(device: torch.device) -> Callable[[], None]:
    """What waits for ``device``'s queued work before a clock read (nothing on a CPU)."""
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


# ----- memory copies -------------------------------------------------------------------------
def copy_gbps(nbytes: int, repeats: int) -> float:
    """memcpy bandwidth of ``dst.copy_(src)`` between two CPU buffers (bytes copied / s)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return nbytes / median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def host_to_device_gbps(device: torch.device, sizes: Sequence[int], repeats: int, *,
                        pinned: bool) -> dict[int, float]:
    """Host -> CUDA copy bandwidth by copy size, from pinned or pageable host memory."""
    out: dict[int, float] = {}
    for n in sizes:
        src = torch.ones(n, dtype=torch.uint8, pin_memory=pinned)
        dst = torch.empty(n, dtype=torch.uint8, device=device)
        t = median_seconds(lambda: dst.copy_(src, non_blocking=pinned), repeats, sync=device_sync(device))
        out[n] = n / t / 1e9
    return out


# ----- disk --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, slots=True)
class DiskResult:
    """What ``disk_probe`` measured.

    Attributes:
        write_gbps: write of the whole scratch file including ``os.fsync``.
        read_gbps_by_extent: cold reads, ``num_threads`` readers, by extent bytes (ascending).
        qd1_gbps: cold reads at ``qd1_extent`` bytes by a single reader (queue depth 1).
        qd1_extent: extent of that pass.
        cold_read_mode: ``"o_direct"`` or ``"fadvise_dontneed"`` (O_DIRECT refused).
        num_threads: readers of the multi-threaded passes.
    """

    write_gbps: float
    read_gbps_by_extent: tuple[tuple[int, float], ...]
    qd1_gbps: float
    qd1_extent: int
    cold_read_mode: str
    num_threads: int


def _open_scratch(path: Path) -> tuple[int, bool]:
    """Creates ``path`` and opens it, with O_DIRECT when the file system takes it (an aligned
    4 KiB write is the test, as in DiskExtentStore); returns (fd, direct)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    if _O_DIRECT:
        try:
            fd = os.open(path, flags | _O_DIRECT, 0o600)
        except OSError as e:
            if e.errno not in _UNSUPPORTED_DIRECT:
                raise
        else:
            try:
                with AlignedBuffer(DISK_ALIGNMENT) as buf, buf.memoryview() as view:
                    os.pwritev(fd, [view], 0)
                return fd, True
            except OSError as e:
                os.close(fd)
                if e.errno not in _UNSUPPORTED_DIRECT:
                    raise
    logger.info("O_DIRECT refused under %s: cold reads drop the page cache with posix_fadvise", path.parent)
    return os.open(path, flags, 0o600), False


def _write_file(fd: int, file_bytes: int) -> float:
    """Writes ``file_bytes`` of random data (8 MiB pieces, each stamped with its index so no
    two are equal), then fsyncs; returns the seconds taken."""
    with AlignedBuffer(_WRITE_PIECE_BYTES) as buf, buf.memoryview() as view:
        view[:] = np.random.default_rng(0).bytes(view.nbytes)
        t0 = time.perf_counter()
        for i, offset in enumerate(range(0, file_bytes, _WRITE_PIECE_BYTES)):
            view[:8] = i.to_bytes(8, "little")
            length = min(_WRITE_PIECE_BYTES, file_bytes - offset)
            with view[:length] as piece:
                if os.pwritev(fd, [piece], offset) != length:
                    raise OSError(errno.EIO, f"short write at offset {offset}")
        os.fsync(fd)
        return time.perf_counter() - t0


def _read_pass(fd: int, offsets: list[int], extent: int, num_threads: int, direct: bool) -> float:
    """Reads one extent at each offset, ``num_threads`` readers taking the next offset in
    order (like the engine's I/O pool); returns the pass's wall seconds."""
    if not direct:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # the file is synced: pages are clean
    lock = threading.Lock()
    queue: Iterator[int] = iter(offsets)

    def reader() -> None:
        with AlignedBuffer(extent) as buf, buf.memoryview() as view:
            while True:
                with lock:
                    offset = next(queue, None)
                if offset is None:
                    return
                if os.preadv(fd, [view], offset) != extent:
                    raise OSError(errno.EIO, f"short read at offset {offset}")

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(num_threads, thread_name_prefix="profile-read") as pool:
        for f in [pool.submit(reader) for _ in range(num_threads)]:
            f.result()
    return time.perf_counter() - t0


def _read_gbps(fd: int, file_bytes: int, read_bytes: int, extent: int, num_threads: int,
               direct: bool, repeats: int, first_pass: int) -> float:
    """Median rate of up to ``repeats`` passes; after 3 passes it stops once ``_PASS_BUDGET_S``
    is spent (a disk slowed by other users must not stretch the run past its minute)."""
    times: list[float] = []
    for r in range(max(1, repeats)):
        if len(times) >= 3 and sum(times) > _PASS_BUDGET_S:
            break
        # Each pass starts where the previous one stopped (wrapping), sequential within it.
        start = (first_pass + r) * read_bytes
        offsets = [(start + i * extent) % file_bytes for i in range(read_bytes // extent)]
        times.append(_read_pass(fd, offsets, extent, num_threads, direct))
    return read_bytes / statistics.median(times) / 1e9


def disk_probe(kv_dir: Path, *, file_bytes: int, read_bytes: int, extents: Sequence[int],
               repeats: int, num_threads: int = 4, qd1_extent: int = MiB) -> DiskResult:
    """Write + fsync of a scratch file in ``kv_dir``, then cold reads of it by extent size.

    Args:
        kv_dir: folder of the scratch file (created if missing); the file is removed before
            returning, also on error.
        file_bytes: scratch file size, a multiple of every extent and of 4 KiB.
        read_bytes: bytes read per pass, a multiple of every extent.
        extents: extent sizes (bytes, multiples of 4 KiB), strictly increasing.
        repeats: passes per extent size (the median counts); past 3, only while the extent's
            passes took under 2 s in all.
        num_threads: concurrent readers (DiskExtentStore's default is 4).
    """
    for extent in (*extents, qd1_extent):
        if extent % DISK_ALIGNMENT or file_bytes % extent or read_bytes % extent:
            raise ValueError(f"extent {extent} must be a multiple of {DISK_ALIGNMENT} and divide file_bytes "
                             f"({file_bytes}) and read_bytes ({read_bytes})")
    kv_dir.mkdir(parents=True, exist_ok=True)
    path = kv_dir / f"profile-scratch-{os.getpid()}-{threading.get_ident()}.bin"
    fd = -1
    try:
        fd, direct = _open_scratch(path)
        write_s = _write_file(fd, file_bytes)
        by_extent, n = [], 0
        for extent in extents:
            by_extent.append((extent, _read_gbps(fd, file_bytes, read_bytes, extent, num_threads,
                                                 direct, repeats, n)))
            n += repeats
        qd1 = _read_gbps(fd, file_bytes, read_bytes, qd1_extent, 1, direct, repeats, n)
    finally:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
    return DiskResult(write_gbps=file_bytes / write_s / 1e9, read_gbps_by_extent=tuple(by_extent),
                      qd1_gbps=qd1, qd1_extent=qd1_extent,
                      cold_read_mode="o_direct" if direct else "fadvise_dontneed", num_threads=num_threads)


# ----- attention, weights, matmul ----------------------------------------------------------------
def _kv_arena(total_bytes: int, dtype: torch.dtype, device: torch.device, shape: tuple[int, int, int]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q [num_heads, head_dim] and K, V arenas [num_kv_heads, num_slots, 32, head_dim] holding
    about ``total_bytes`` of K+V together; returns (q, k, v, num_slots)."""
    num_kv_heads, group, head_dim = shape
    elem = torch.empty((), dtype=dtype).element_size()
    slot_bytes = 2 * num_kv_heads * _PAGE_TOKENS * head_dim * elem
    num_slots = max(1, total_bytes // slot_bytes)
    arena = (num_kv_heads, num_slots, _PAGE_TOKENS, head_dim)
    k = torch.empty(arena, dtype=dtype, device=device).normal_()
    v = torch.empty(arena, dtype=dtype, device=device).normal_()
    q = torch.randn(num_kv_heads * group, head_dim, dtype=dtype, device=device)
    return q, k, v, num_slots


def cpu_attention_gbps(dtype: torch.dtype, kv_bytes: int, repeats: int) -> float:
    """K+V bytes/s that the Numba page kernel (``cpu_kernels.attention_contiguous_pages``)
    reads: one query (SmolLM2 heads: 3 KV heads x 3, head_dim 64) over every page of an arena
    of about ``kv_bytes`` in ``dtype``."""
    from cpu_kernels import attention_contiguous_pages

    q, k, v, num_slots = _kv_arena(kv_bytes, dtype, torch.device("cpu"), _SMOLLM2_KV)
    qn = q.float().numpy()
    slots = np.arange(num_slots, dtype=np.int32)
    scale = q.shape[1] ** -0.5
    t = median_seconds(lambda: attention_contiguous_pages(qn, k, v, slots, num_slots * _PAGE_TOKENS,
                                                          scale=scale), repeats)
    return (k.nbytes + v.nbytes) / t / 1e9


def cpu_attention_4bit_gbps(kv_bytes: int, repeats: int) -> float:
    """Stored bytes/s (codes, scales, mins) that the fused Numba 4-bit kernel reads as the
    engine calls it (``cpu_kernels.attention_4bit.attention_blobs_4bit_trusted``, blob rows of
    a packed arena): one query over every page of the fp32 arena of ``cpu_attention_gbps``
    quantized to 4 bits (about a sixth of ``kv_bytes``)."""
    from cpu_kernels.attention_4bit import attention_blobs_4bit_trusted
    from offload.kv.quant_pages import Quant4Layout

    q, k, v, num_slots = _kv_arena(kv_bytes, torch.float32, torch.device("cpu"), _SMOLLM2_KV)
    layout = Quant4Layout(k.shape[0], _PAGE_TOKENS, k.shape[3])
    rows = torch.empty((num_slots, layout.page_bytes), dtype=torch.uint8)
    layout.quantize_into(rows, k, v)
    del k, v
    qn, rows_np, fields = q.numpy(), rows.numpy(), layout.blob_fields()
    shape, slots = (layout.num_kv_heads, layout.page_size, layout.head_dim), np.arange(num_slots, dtype=np.int32)
    scale = q.shape[1] ** -0.5
    t = median_seconds(lambda: attention_blobs_4bit_trusted(qn, rows_np, fields, shape, slots, scale), repeats)
    return rows.nbytes / t / 1e9


def device_attention_4bit_gbps(device: torch.device, dtype: torch.dtype, kv_bytes: int, repeats: int) -> float:
    """Stored bytes/s of the Triton ``paged_decode_attention_4bit`` over the pages of
    ``device_attention_gbps``'s arena quantized to 4 bits on the device (CUDA events)."""
    from gpu_kernels.paged_attention_4bit import paged_decode_attention_4bit
    from gpu_kernels.quant4 import quantize_pages_4bit

    q, k, v, num_slots = _kv_arena(kv_bytes, dtype, device, _LLAMA8B_KV)
    pages = quantize_pages_4bit(k, v)
    del k, v
    table = torch.arange(num_slots, dtype=torch.int32, device=device).view(1, -1)
    lens = torch.tensor([num_slots * _PAGE_TOKENS], dtype=torch.int32, device=device)
    t = _cuda_median_s(device, lambda: paged_decode_attention_4bit(q.unsqueeze(0), pages, table, lens,
                                                                   scale=q.shape[1] ** -0.5), repeats)
    return _stored_bytes(pages) / t / 1e9


def _stored_bytes(pages: object) -> int:
    """Bytes of a 4-bit page set's six arrays (numpy or torch)."""
    return sum(int(getattr(pages, f).nbytes) for f in ("k_q", "k_scale", "k_min", "v_q", "v_scale", "v_min"))


def _cuda_median_s(device: torch.device, run: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``run`` on CUDA over ``repeats`` event-timed calls after a warm-up
    (which compiles a Triton kernel)."""
    run()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(max(1, repeats)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def device_attention_gbps(device: torch.device, dtype: torch.dtype, kv_bytes: int, repeats: int) -> float:
    """K+V bytes/s of the Triton ``paged_decode_attention`` over a CUDA arena of about
    ``kv_bytes`` (8 KV heads x 4, head_dim 128), one query over every page; timed with CUDA
    events after a warm-up (which compiles the kernel)."""
    from gpu_kernels.paged_attention import paged_decode_attention

    q, k, v, num_slots = _kv_arena(kv_bytes, dtype, device, _LLAMA8B_KV)
    table = torch.arange(num_slots, dtype=torch.int32, device=device).view(1, -1)
    lens = torch.tensor([num_slots * _PAGE_TOKENS], dtype=torch.int32, device=device)
    scale = q.shape[1] ** -0.5

    t = _cuda_median_s(device, lambda: paged_decode_attention(q.unsqueeze(0), k, v, table, lens, scale=scale),
                       repeats)
    return (k.nbytes + v.nbytes) / t / 1e9


def _weight_chain(device: torch.device, dtype: torch.dtype, total_bytes: int) -> tuple[Callable[[], None], int]:
    """A decode step's matrix-vector products: one token through a chain of weight matrices
    (``dtype``, on ``device``) of about ``total_bytes`` with the engine's linear function
    (``offload.model.matvec``: the row kernel on a CPU with fp32 weights), alternately
    [inter, hidden] and [hidden, inter] (SmolLM2's 576/1536 on CPU; 4096/14336 on CUDA, where
    smaller matrices would measure launch time instead of memory). Returns the function that
    runs the chain once and the chain's weight bytes."""
    hidden, inter = (4096, 14336) if device.type == "cuda" else (576, 1536)
    elem = torch.empty((), dtype=dtype).element_size()
    count = max(2, total_bytes // (hidden * inter * elem) // 2 * 2)  # even: back to [1, hidden]
    shapes = [(inter, hidden) if i % 2 == 0 else (hidden, inter) for i in range(count)]
    # Scaled so the activations stay O(1) along the chain.
    weights = [torch.empty(s, dtype=dtype, device=device).normal_(std=s[1] ** -0.5) for s in shapes]
    x0 = torch.randn(1, hidden, dtype=dtype, device=device)
    linear = make_linear(device, dtype, weights)

    def run() -> None:
        with torch.inference_mode():
            x = x0
            for w in weights:
                x = linear(x, w)
        assert x.shape[-1] == hidden, "the chain ends where it started"

    return run, sum(w.nbytes for w in weights)


def weights_gbps(device: torch.device, dtype: torch.dtype, total_bytes: int, repeats: int) -> float:
    """Weight bytes/s of a decode step's matrix-vector products (``_weight_chain``)."""
    run, nbytes = _weight_chain(device, dtype, total_bytes)
    return nbytes / median_seconds(run, repeats, sync=device_sync(device)) / 1e9


def read_interference(kv_dir: Path, dtype: torch.dtype, *, weights_bytes: int, file_bytes: int,
                      extent: int = MiB, num_threads: int = 4, repeats: int = 5) -> tuple[float, float]:
    """Seconds lost per GB of cold DISK reads that run beside compute on a CPU-only machine,
    where the "device" compute and the disk readers share the cores and the memory bus (the
    readers' system time and copies slow the compute; the compute's threads slow the readers).

    Each repeat times, back to back: the CPU weight chain (``_weight_chain``,
    ``weights_bytes``) alone (``c``); a read pass alone (``r``: ``num_threads`` readers,
    ``extent`` pieces, O_DIRECT or the page cache dropped first, like ``disk_probe``) of about
    as many bytes as the disk reads in ``c`` (the case where overlap matters most); then both
    at once (``both``). The loss is ``both - max(c, r)``, what perfect overlap (the cost
    model's max of the legs) leaves out, per GB read. Returns ``(median loss per GB clamped
    at 0, median GB/s of the reads alone)``. The scratch file is removed on return.
    """
    if extent % DISK_ALIGNMENT or file_bytes % extent or file_bytes < 4 * extent:
        raise ValueError(f"extent {extent} must be a multiple of {DISK_ALIGNMENT} and divide file_bytes "
                         f"({file_bytes}), which must hold at least 4 extents")
    compute, _ = _weight_chain(torch.device("cpu"), dtype, weights_bytes)
    kv_dir.mkdir(parents=True, exist_ok=True)
    path = kv_dir / f"profile-interference-{os.getpid()}-{threading.get_ident()}.bin"
    fd = -1
    losses, rates = [], []
    try:
        fd, direct = _open_scratch(path)
        _write_file(fd, file_bytes)
        cursor = 0

        def offsets(n: int) -> list[int]:
            nonlocal cursor
            out = [(cursor + i * extent) % file_bytes for i in range(n)]
            cursor = (cursor + n * extent) % file_bytes
            return out

        compute()  # warm-up
        n = 4
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            compute()
            c = time.perf_counter() - t0
            r = _read_pass(fd, offsets(n), extent, num_threads, direct)
            rate = n * extent / r
            with cf.ThreadPoolExecutor(1, thread_name_prefix="profile-interference") as pool:
                t0 = time.perf_counter()
                reads = pool.submit(_read_pass, fd, offsets(n), extent, num_threads, direct)
                compute()
                reads.result()
                both = time.perf_counter() - t0
            losses.append((both - max(c, r)) / (n * extent / 1e9))
            rates.append(rate / 1e9)
            # Next time read about as long as the compute takes (>= 4 extents, <= the file).
            n = max(4, min(file_bytes // extent, round(c * rate / extent)))
    finally:
        if fd >= 0:
            os.close(fd)
        path.unlink(missing_ok=True)
    return max(0.0, statistics.median(losses)), statistics.median(rates)


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Dense ``torch.mm`` of two [n, n] matrices: 2 n^3 flops / s, in TFLOP/s."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    out = torch.empty(n, n, dtype=dtype, device=device)
    t = median_seconds(lambda: torch.mm(a, b, out=out), repeats, sync=device_sync(device))
    return 2 * n**3 / t / 1e12


# ----- free memory -----------------------------------------------------------------------------
def free_bytes(device: torch.device, kv_dir: Path) -> tuple[int, int, int]:
    """(device, host, disk) free bytes: CUDA free memory, or on a CPU-only machine half the
    available RAM each (the engine's default DEVICE arena; the RAM tiers share the RAM);
    host = all available RAM beside a GPU; disk = free space of ``kv_dir``'s file system."""
    available = int(psutil.virtual_memory().available)
    kv_dir.mkdir(parents=True, exist_ok=True)
    disk = int(shutil.disk_usage(kv_dir).free)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the probes' freed blocks would otherwise count as used
        return int(torch.cuda.mem_get_info(device)[0]), available, disk
    return available // 2, available // 2, disk
