"""Where a saved hardware profile lives and how it is read and written, without measuring.

A profile measured by ``offload profile`` (``offload.tuning.profile``) is saved as JSON in
``<cache dir>/profiles/<cpu|cuda>-<hash12>.json``, the hash covering what identifies the
machine for its numbers (``machine_fields``). This module only names, loads and saves that
file, so the engine can look a profile up (``load_saved``) without importing the probes:
they build an ``Engine`` themselves (``offload.tuning.engine_probe``), and the import graph
must stay a DAG (tests/test_imports.py)::

    offload.tuning.profile ─▶ offload.tuning.engine_probe ─▶ offload.engine ─▶ offload.tuning.profile_store
                           └─▶ offload.tuning.profile_probes (no engine)
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import socket
from pathlib import Path

import psutil
import torch

from offload.config import RuntimeConfig
from offload.model.model_source import default_cache_dir
from planner.profile import HardwareProfile

__all__ = ["QUICK_SUFFIX", "DEFAULT_PRESETS", "resolve_target", "machine_fields", "profile_path", "is_quick",
           "load_saved", "load_profile", "save_profile"]

logger = logging.getLogger(__name__)

QUICK_SUFFIX = " (quick)"
"""End of the ``name`` of a profile measured with ``quick=True`` (the JSON has no other marker)."""

DEFAULT_PRESETS = {"cpu": "cpu-2core", "cuda": "rtx4090-pcie4"}
"""The preset an engine prices with, by device type, when no profile is given or saved."""


def resolve_target(device: torch.device | str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    """The device and compute dtype a request means, with ``RuntimeConfig``'s defaults and checks.

    Raises:
        ValueError: an unknown device or dtype, or CUDA asked for where there is none.
    """
    config = RuntimeConfig(device=None if device is None else str(device), dtype=dtype)
    dev = config.resolved_device()
    return dev, config.resolved_dtype(dev)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fs_device_id(path: Path) -> int:
    """``st_dev`` of ``path``, or of its nearest existing parent (a cache dir not made yet)."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except OSError:
            continue
    return 0


# Raised when a probe changes what it measures, so that profiles saved before are measured
# again: 2 = the weights probe runs the engine's linear function (the CPU row kernel).
PROBES_VERSION = "2"


def machine_fields(cache_dir: Path, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What identifies the machine for a profile's numbers (hashed into its file name), and
    the probes' version."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = f"{props.name} {props.total_memory}"
    else:
        gpu = "cpu"
    return {"host": socket.gethostname(), "cpu": _cpu_model(), "cores": str(os.cpu_count()),
            "ram": str(psutil.virtual_memory().total), "gpu": gpu, "torch": torch.__version__,
            "fs": str(_fs_device_id(cache_dir)), "dtype": str(dtype),
            "probes": PROBES_VERSION}


def profile_path(cache_dir: Path, device: torch.device | str, *, dtype: torch.dtype | None = None) -> Path:
    """``<cache_dir>/profiles/<cpu|cuda>-<hash12>.json``: the hash covers host name, CPU model,
    logical cores, total RAM, GPU name and memory (or "cpu"), torch version, the file system
    of ``cache_dir``, the probe dtype (None: the device's default compute dtype) and
    ``PROBES_VERSION``."""
    dev, dt = resolve_target(device, dtype)
    fields = machine_fields(Path(cache_dir), dev, dt)
    key = hashlib.sha256("\n".join(f"{k}={v}" for k, v in sorted(fields.items())).encode()).hexdigest()
    return Path(cache_dir) / "profiles" / f"{dev.type}-{key[:12]}.json"


def is_quick(profile: HardwareProfile) -> bool:
    """Whether ``profile`` was measured with ``quick=True`` (small sizes, one repeat)."""
    return profile.name.endswith(QUICK_SUFFIX)


def load_profile(path: Path) -> HardwareProfile | None:
    """The profile saved at ``path``, or None when there is none or it cannot be used (a
    warning is logged: a broken file must not stop a run, it is replaced by the next save)."""
    if not path.is_file():
        return None
    try:
        return HardwareProfile.from_json(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError) as e:
        logger.warning("saved hardware profile %s is unusable (%s); it is ignored", path, e)
        return None


def save_profile(path: Path, profile: HardwareProfile) -> None:
    """Writes ``profile`` to ``path`` atomically: a temp file in the same folder, then
    ``os.replace``, so a reader never sees half a file.

    Raises:
        OSError: the folder cannot be created or written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(profile.to_json() + "\n", encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_saved(*, device: torch.device | str, dtype: torch.dtype | None,
               cache_dir: Path | None = None) -> HardwareProfile | None:
    """This machine's saved profile for ``device`` and ``dtype``, read only (never measured,
    nothing created).

    Args:
        device: 'cpu', 'cuda' or 'cuda:N'.
        dtype: the probe dtype the profile was measured with (None: the device's default
            compute dtype).
        cache_dir: the cache dir whose ``profiles`` folder is searched; None =
            ``default_cache_dir()`` (``$OFFLOAD_CACHE`` or ``~/.cache/offload``).

    Returns:
        The profile, or None when none is saved or the saved file is unusable (warned).

    Raises:
        ValueError: an unknown device or dtype, or CUDA asked for where there is none.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return load_profile(profile_path(cache, device, dtype=dtype))
