"""Runtime configuration: one frozen dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
import enum
import re
from typing import TYPE_CHECKING

import torch

from offload.errors import InputError
from offload.kv.placement import Placement

if TYPE_CHECKING:
    from planner.profile import HardwareProfile

__all__ = ["RuntimeConfig", "DecodeKernel", "MatvecKernel", "HostAttention", "Planner", "DiskBackend", "Sparse", "KVFormat",
           "PLANNERS", "SPARSE_MODES", "KV_FORMATS",
           "Recompute", "RECOMPUTE_MODES", "check_restore_recompute",
           "parse_size", "parse_dtype", "format_size", "check_sparse_budget", "DTYPES"]


class Planner(enum.Enum):
    """How spilled pages are placed when no placement is given."""

    LP = "lp"  # the LP planner over the hardware profile
    GREEDY = "greedy"  # fill DEVICE, then HOST, then DISK, layer by layer (the baseline)


class DiskBackend(enum.Enum):
    """File I/O of the DISK tier and the DocCache store (``storage.kvikio_io.BACKENDS``)."""

    AUTO = "auto"  # KvikIO when CUDA and the kvikio package are present, else POSIX
    POSIX = "posix"
    KVIKIO = "kvikio"


PLANNERS = tuple(p.value for p in Planner)


class DecodeKernel(enum.Enum):
    """The kernel that attends DEVICE pages in decode."""

    AUTO = "auto"  # CUDA: Triton; CPU: Numba
    TRITON = "triton"  # also runs in Triton's interpreter on a CPU (tests)
    NUMBA = "numba"  # CPU only: in place over the arena
    TORCH = "torch"  # torch's fused CPU flash op (or the reference) over page groups


class MatvecKernel(enum.Enum):
    """What multiplies one decode token by the weight matrices."""

    AUTO = "auto"  # CPU with fp32 weights: the Numba row kernel (cpu_kernels.matvec); else torch
    TORCH = "torch"  # torch's F.linear (its BLAS), everywhere


class HostAttention(enum.Enum):
    """Where attention over HOST pages runs when the engine places pages itself."""

    CPU = "cpu"  # delegated: the Numba kernel where the pages are; q and (out, lse) move
    DEVICE = "device"  # the pages are copied to the compute device


class Sparse(enum.Enum):
    """Which pages a decode step attends in the growing (global) layers."""

    EXACT = "exact"  # every page
    QUEST = "quest"  # the pages whose key bounds score highest against the live query (Tang et al. 2024)
    SPECULATIVE = "speculative"  # Quest's choice, its pages predicted and read one layer ahead (InfiniGen)
    LSH = "lsh"  # sampled tokens, weighted by their SimHash retrieval probability (MagicPIG)


SPARSE_MODES = tuple(m.value for m in Sparse)


class KVFormat(enum.Enum):
    """How pages out of the recent window are stored."""

    EXACT = "exact"  # as computed, in the KV dtype
    Q4 = "4bit"  # 4-bit codes with per-group scales (keys per channel: KIVI; values per token: FlexGen)


KV_FORMATS = tuple(f.value for f in KVFormat)


class Recompute(enum.Enum):
    """K/V recomputed at decode instead of read (issue of partial recomputation)."""

    NONE = "none"  # every K/V byte is read from its tier
    LOWRANK = "lowrank"  # keys rebuilt from rank-r factors (ShadowKV): not executed yet
    KVPR = "kvpr"  # K/V recomputed from HOST pages holding the layer's input activations (KVPR)
    AUTO = "auto"  # the planner's choice among what the engine executes (kvpr where the model allows it)


RECOMPUTE_MODES = tuple(m.value for m in Recompute)


def check_sparse_budget(value: object, name: str = "sparse_budget") -> float:
    """``value`` as a sparse budget F in (0, 1].

    Raises:
        InputError: not a number in (0, 1] (a subclass of ValueError).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise InputError(f"{name} must be a number in (0, 1] (the share of exact attention's K/V bytes a "
                         f"decode step may read; 1 reads every page), got {value!r}")
    return float(value)


DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def check_restore_recompute(value: object, name: str = "restore_recompute") -> float | None:
    """``value`` as a forced share of a DocCache restore to recompute, in [0, 1), or None.

    Raises:
        InputError: not a number in [0, 1) (a subclass of ValueError).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise InputError(f"{name} is the share of a restored document to recompute, in [0, 1) (0 = load every "
                         f"page; leave it unset for the planner's split), got {value!r}")
    return float(value)


def _member(kind: type[enum.Enum], name: str, value: object) -> enum.Enum:
    """``value`` as a member of ``kind`` (a member or its string value).

    Raises:
        InputError: neither; the message names the field and the allowed values.
    """
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        allowed = ", ".join(m.value for m in kind)
        raise InputError(f"{name} must be one of {allowed}, got {value!r}") from None


def _bytes_field(name: str, value: object) -> int | None:
    """A size field's value as bytes: an int, or a size string ('512MiB') parsed.

    Raises:
        InputError: anything else (a float, a bool, a malformed string); names the field.
    """
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError:
            raise InputError(f"{name} must be a number of bytes or a size such as '512MiB', got {value!r}") from None
    raise InputError(f"{name} takes a number of bytes (int) or a size string such as '512MiB', "
                     f"got {type(value).__name__} {value!r}")


def parse_size(text: str) -> int:
    """'64MiB', '24GiB', '1.5GB', '1000' -> bytes.

    Raises:
        InputError: not a size (a subclass of ValueError).
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"not a size: {text!r}; write e.g. 512MiB, 2GiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_size(num_bytes: int | float) -> str:
    """Bytes in the unit that shows them: '512 B', '1.0 KiB', '23.9 MiB', '1.50 GiB'."""
    n = float(num_bytes)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.2f} {unit}" if unit == "GiB" else f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except (KeyError, AttributeError):
        raise InputError(f"unknown dtype {text!r}; use one of fp32, bf16, fp16") from None


def default_prefill_chunk(device: torch.device) -> int:
    """Prefill chunk of a device type. On a CPU, larger chunks give torch's fused attention op
    longer causal squares and fewer partials to merge: measured on the 2-core machine (SmolLM2,
    fp32, one process, chunk sizes alternated), 4K-token prompts 674 / 696 / 704 tok/s at 1024 /
    2048 / 4096, 8K-token prompts 486 / 494 / 491 / 464 at 1024 / 2048 / 4096 / 8192; the
    activations of a 4096-token chunk are tens of MB for the CPU's models. On CUDA the
    matmuls are saturated at 1024 tokens and DEVICE memory is the KV's, so 1024 stays."""
    return 4096 if device.type == "cpu" else 1024


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """How the engine runs a model.

    Attributes:
        device: 'cpu', 'cuda' or 'cuda:N'; None picks CUDA when present.
        dtype: compute dtype; None = fp32 on CPU, bf16 on CUDA.
        kv_dtype: KV page dtype; None = the compute dtype (exact mode).
        device_memory_bytes: budget of the DEVICE KV arena; None = half the available RAM on
            CPU, or on CUDA the model's full context capped at half the free GPU memory.
        page_size: tokens per KV page.
        prefill_chunk_tokens: tokens of one layer computed at once during prefill; None = the
            device's default (``default_prefill_chunk``: 4096 on a CPU, 1024 on CUDA).
        attn_scores_bytes: bound on the score matrix of one attention partial.
        host_memory_bytes: budget of the HOST tier: its page arena plus the DISK staging
            buffers. None = 0 (only the staging area).
        disk_space_bytes: budget of the DISK tier. None = half the free space of ``kv_dir``'s
            file system when spilling is possible (a device budget or a placement is given),
            else no disk tier; 0 = no disk tier.
        placement: fixed tiers for new pages (tests, benchmarks); None = all DEVICE while the
            pages fit, else the ``planner``'s placement.
        kv_dir: where DISK tier files go (a fresh subdirectory per engine, removed on close);
            None = ``<cache dir>/kv``.
        staging_chunk_pages / staging_buffers: DISK read staging (full-precision pages per
            chunk, chunks; a chunk of 4-bit pages holds the same DISK bytes, in more pages).
        overlap: read DISK pages ahead while earlier layers compute, and on CUDA copy the next
            layer's HOST/DISK pages on a side stream (False: read and copy each piece when it
            is needed, serially; for measuring what the overlap buys).
        disk_backend: file I/O of the DISK tier and the DocCache store: "auto" (KvikIO when
            CUDA and the kvikio package are present, else POSIX), "posix" or "kvikio".
        shuffle_pages_seed: if set, pages take random arena slots (tests of real paging).
        seed: seed of random weights.
        decode_kernel: the kernel for DEVICE pages in decode (AUTO: Triton on CUDA, Numba on CPU).
        matvec_kernel: what multiplies a decode token by the weights: AUTO = on a CPU with fp32
            weights the Numba row kernel on every thread (``cpu_kernels.matvec``: the BLAS ran
            one-row products on one thread at about 40% of the memory rate on the team's
            machine), else torch's ``F.linear``; TORCH = ``F.linear`` everywhere.
        host_attention: where HOST pages are attended when ``placement`` is None: CPU = the
            planner may delegate them (on a CPU-only machine they are always attended in
            place), DEVICE = never; a given ``placement`` says it itself.
        planner: how spilled pages are placed when ``placement`` is None: "lp" (the LP
            planner over the measured profile) or "greedy" (fill DEVICE, then HOST, then DISK,
            layer by layer: the baseline).
        plan_min_gain: the LP planner leaves the greedy split only for a predicted gain of at
            least this fraction of the step (default 10%: bench/validate_planner.py measured a
            4K-token split predicted 10% faster than greedy at 0.93x-1.05x of greedy's speed,
            while gains predicted at 18% and more measured 1.11x-1.30x).
        profile: the hardware profile the planner prices with; None = this machine's saved
            ``offload profile`` under ``$OFFLOAD_CACHE`` (or ``~/.cache/offload``) when there is
            one, else the device type's preset (cpu-2core, rtx4090-pcie4). The engine never
            measures: ``LongDocQA`` and the CLI fill this field first, measuring once per
            machine when they may spill (``offload.tuning.profile.profile_for``).
        sparse: which pages a decode step attends in the global layers: "exact" (all),
            "quest" (``offload.attention.quest``) or "speculative" (quest's pages, predicted
            one layer ahead and read while the layer before computes:
            ``offload.attention.speculative``; its engine calibrates once per model), or
            "lsh" (sink, window and tail exact, every other token sampled by SimHash and
            weighted: ``offload.attention.lsh``; CPU only for now). Prefill, and a question's
            own prefill over its document, always attend every page.
        sparse_budget: F, the most a sparse decode step reads of the K/V bytes exact attention
            would read in the global layers at that step (sink, window, tail and the page
            bounds it scans included), in (0, 1].
        sparse_cache_bytes: room on the compute device for the DISK pages sparse steps read,
            kept for the next steps (``offload.kv.page_cache``; exact pages, CPU only for now);
            0 (the default) keeps none: every step reads its DISK pages again.
        kv_format: "exact", or "4bit": a global layer's pages other than the sink page 0, the
            last ``window_pages`` (2) full pages and the partly filled tail are stored as 4-bit
            pages wherever they live (``offload.kv.quant_pages``), about a sixth of fp32's
            bytes; the exact pages live on DEVICE. Sliding-window rings stay exact.
        lsh_seed: the seed of the lsh mode's hyperplanes (never ``seed``): the same seed
            gives the same tables and the same answers.
        lsh_bits, lsh_tables: K SimHash bits per table and L tables (None: the defaults of
            ``offload.attention.lsh``).
        recompute: K/V recomputed instead of read: "none"; "kvpr" (a share of the HOST pages
            keeps the layer's input activations and their K/V are recomputed when read:
            ``offload.kv.kvpr``; the share is the planner's, or a given ``placement``'s
            ``recomputed_share``; Llama-family models whose activations fit a K/V page, exact
            pages, not with lsh); "auto" (kvpr where the model allows it, else none: the planner
            chooses the share, 0 where it does not pay). "lowrank" (ShadowKV's low-rank keys) is
            refused: not executed yet.
        restore_recompute: a DocCache hit recomputes this share of the document from its token
            ids while the rest loads (Cake; ``offload.kv.cake``), on prefill-chunk boundaries;
            None = the planner's split from the profile (loading only when recompute does not
            pay, as on a CPU), 0 = load every page.
    """

    device: str | None = None
    dtype: torch.dtype | None = None
    kv_dtype: torch.dtype | None = None
    device_memory_bytes: int | None = None
    page_size: int = 32
    prefill_chunk_tokens: int | None = None
    attn_scores_bytes: int = 64 * 2**20
    host_memory_bytes: int | None = None
    disk_space_bytes: int | None = None
    placement: Placement | None = None
    kv_dir: str | None = None
    staging_chunk_pages: int = 64
    staging_buffers: int = 4
    overlap: bool = True
    disk_backend: DiskBackend = DiskBackend.AUTO
    shuffle_pages_seed: int | None = None
    seed: int = 0
    decode_kernel: DecodeKernel = DecodeKernel.AUTO
    matvec_kernel: MatvecKernel = MatvecKernel.AUTO
    host_attention: HostAttention = HostAttention.CPU
    planner: Planner = Planner.LP
    plan_min_gain: float = 0.10
    profile: HardwareProfile | None = None
    sparse: Sparse = Sparse.EXACT
    sparse_budget: float = 0.1
    sparse_cache_bytes: int = 0
    kv_format: KVFormat = KVFormat.EXACT
    lsh_seed: int = 0
    lsh_bits: int | None = None
    lsh_tables: int | None = None
    recompute: Recompute = Recompute.NONE
    restore_recompute: float | None = None

    def __post_init__(self) -> None:
        # Size fields take bytes or a size string (RuntimeConfig(device_memory_bytes="512MiB")).
        for name in ("device_memory_bytes", "host_memory_bytes", "disk_space_bytes", "attn_scores_bytes",
                     "sparse_cache_bytes"):
            object.__setattr__(self, name, _bytes_field(name, getattr(self, name)))
        for name in ("page_size", "prefill_chunk_tokens", "staging_chunk_pages", "staging_buffers", "seed"):
            value = getattr(self, name)
            if value is None and name == "prefill_chunk_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool):
                raise InputError(f"{name} takes an int, got {type(value).__name__} {value!r}")
        # A field over a closed set takes the enum or its string value (RuntimeConfig(planner="lp")).
        for name, kind in (("disk_backend", DiskBackend), ("planner", Planner), ("decode_kernel", DecodeKernel),
                           ("matvec_kernel", MatvecKernel), ("host_attention", HostAttention), ("sparse", Sparse),
                           ("kv_format", KVFormat)):
            object.__setattr__(self, name, _member(kind, name, getattr(self, name)))
        object.__setattr__(self, "sparse_budget", check_sparse_budget(self.sparse_budget))
        if self.sparse_cache_bytes is None or self.sparse_cache_bytes < 0:
            raise InputError(f"sparse_cache_bytes must be >= 0 bytes (0: no page cache), "
                             f"got {self.sparse_cache_bytes}")
        self._check_lsh()
        self._check_recompute()
        if not 0.0 <= self.plan_min_gain < 1.0:
            raise InputError(f"plan_min_gain must be in [0, 1), got {self.plan_min_gain}")
        if not 1 <= self.page_size <= 4096:
            raise InputError(f"page_size must be between 1 and 4096 tokens (default 32), got {self.page_size}")
        if self.prefill_chunk_tokens is not None and self.prefill_chunk_tokens < 1:
            raise InputError(f"prefill_chunk_tokens must be at least 1 token (default: 4096 on a CPU, 1024 on "
                             f"CUDA), got {self.prefill_chunk_tokens}")
        if self.device_memory_bytes is not None and self.device_memory_bytes < 1:
            raise InputError(f"device_memory_bytes must be at least 1 byte, got {self.device_memory_bytes}; give the "
                             "DEVICE KV budget, e.g. '512MiB', or None for the default")
        for name in ("dtype", "kv_dtype"):
            value = getattr(self, name)
            if value is not None and value not in DTYPES.values():
                raise InputError(f"{name} must be a torch dtype among fp32, bf16, fp16 "
                                 f"(parse_dtype turns a name into one), got {value!r}")
        if self.device is not None:
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError):
                raise InputError(f"device {self.device!r} is not a device; use cpu, cuda or cuda:N") from None
            if dev.type not in ("cpu", "cuda"):
                raise InputError(f"device {self.device!r} is not supported; use cpu, cuda or cuda:N")
        for name in ("host_memory_bytes", "disk_space_bytes"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"{name} must be >= 0 bytes, got {value}; give a budget such as '1GiB' "
                                 "(0 = no such tier), or None for the default")
        if self.staging_chunk_pages < 1 or self.staging_buffers < 1:
            raise InputError(f"staging_chunk_pages and staging_buffers must be >= 1, got "
                             f"{self.staging_chunk_pages} and {self.staging_buffers}")
        if self.attn_scores_bytes < 1:
            raise InputError(f"attn_scores_bytes must be >= 1, got {self.attn_scores_bytes}")

    def _check_recompute(self) -> None:
        object.__setattr__(self, "recompute", _member(Recompute, "recompute", self.recompute))
        if self.recompute == Recompute.LOWRANK:
            raise InputError("recompute='lowrank' (ShadowKV's low-rank keys) is not executed by the engine yet; use "
                             "'none', 'kvpr' or 'auto'")
        object.__setattr__(self, "restore_recompute", check_restore_recompute(self.restore_recompute))

    def _check_lsh(self) -> None:
        if not isinstance(self.lsh_seed, int) or isinstance(self.lsh_seed, bool) or self.lsh_seed < 0:
            raise InputError(f"lsh_seed takes an int >= 0, got {self.lsh_seed!r}")
        if self.lsh_bits is not None and not (isinstance(self.lsh_bits, int) and 1 <= self.lsh_bits <= 16):
            raise InputError(f"lsh_bits must be an int in 1..16 (SimHash bits per table), got {self.lsh_bits!r}")
        if self.lsh_tables is not None and not (isinstance(self.lsh_tables, int) and 2 <= self.lsh_tables <= 1024):
            raise InputError(f"lsh_tables must be an int in 2..1024 (a candidate needs 2 hits), got "
                             f"{self.lsh_tables!r}")
        if self.sparse == Sparse.LSH and self.kv_format != KVFormat.EXACT:
            raise InputError("sparse='lsh' samples exact pages; kv_format='4bit' with it is not built yet: "
                             "use one or the other")

    def resolved_prefill_chunk(self, device: torch.device) -> int:
        """``prefill_chunk_tokens``, or the default of ``device`` (``default_prefill_chunk``)."""
        return self.prefill_chunk_tokens or default_prefill_chunk(device)

    def resolved_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        dev = torch.device(self.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} asked for but CUDA is not available; use --device cpu")
        if dev.type == "cuda" and dev.index is None:
            # With its index, so that comparisons with a tensor's device (always indexed) hold.
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if device.type == "cuda" else torch.float32
