"""offload.config: size and dtype parsing, RuntimeConfig validation."""
from __future__ import annotations

import pytest
import torch

from offload.config import RuntimeConfig, parse_dtype, parse_size

SIZES = [
    ("64MiB", 64 * 2**20),
    ("24GiB", 24 * 2**30),
    ("1.5GB", 1_500_000_000),
    ("1000", 1000),
    ("0", 0),
    ("512mib", 512 * 2**20),
    (" 2 GiB ", 2 * 2**30),
    ("8k", 8000),
    ("8KiB", 8192),
    ("100B", 100),
    ("0.5MiB", 2**19),
    (".25GiB", 2**28),
    ("1TiB", 2**40),
    ("3TB", 3 * 10**12),
]
BAD_SIZES = ["", "abc", "MiB", "12XB", "-5", "1e9", "1.2.3MiB", "5 Mi B", "64 MiBs", "1,000"]
DTYPE_NAMES = [
    ("fp32", torch.float32), ("float32", torch.float32), ("FP32", torch.float32),
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("BF16", torch.bfloat16),
    ("fp16", torch.float16), ("float16", torch.float16),
]
BAD_CONFIGS = [
    ({"page_size": 0}, "page_size"),
    ({"page_size": 4097}, "page_size"),
    ({"page_size": -3}, "page_size"),
    ({"prefill_chunk_tokens": 0}, "prefill_chunk_tokens"),
    ({"device_memory_bytes": 0}, "device_memory_bytes"),
    ({"device_memory_bytes": -1}, "device_memory_bytes"),
    ({"attn_scores_bytes": 0}, "attn_scores_bytes"),
]
BAD_CONFIG_IDS = [f"{field}={value}" for kwargs, field in BAD_CONFIGS for value in kwargs.values()]


@pytest.mark.parametrize("text,want", SIZES)
def test_parse_size(text, want):
    assert parse_size(text) == want
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", BAD_SIZES)
def test_parse_size_rejects_with_hint(text):
    with pytest.raises(ValueError, match=r"not a size: .*write e\.g\. 512MiB"):
        parse_size(text)


@pytest.mark.parametrize("text,want", DTYPE_NAMES)
def test_parse_dtype(text, want):
    assert parse_dtype(text) is want


@pytest.mark.parametrize("text", ["fp8", "int8", "", "float64"])
def test_parse_dtype_rejects_with_hint(text):
    with pytest.raises(ValueError, match=r"unknown dtype .*use one of fp32, bf16, fp16"):
        parse_dtype(text)


def test_runtime_config_defaults_are_valid():
    cfg = RuntimeConfig()
    assert cfg.page_size == 32 and cfg.device_memory_bytes is None
    RuntimeConfig(page_size=1, prefill_chunk_tokens=1, device_memory_bytes=1, attn_scores_bytes=1)
    RuntimeConfig(page_size=4096)


@pytest.mark.parametrize("kwargs,field", BAD_CONFIGS, ids=BAD_CONFIG_IDS)
def test_runtime_config_errors_name_the_field(kwargs, field):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=rf"^{field} must be .*got {value}(;|$)"):
        RuntimeConfig(**kwargs)


def test_resolved_dtype():
    assert RuntimeConfig().resolved_dtype(torch.device("cpu")) is torch.float32
    assert RuntimeConfig().resolved_dtype(torch.device("cuda")) is torch.bfloat16
    assert RuntimeConfig(dtype=torch.float16).resolved_dtype(torch.device("cpu")) is torch.float16


def test_resolved_device_cpu():
    assert RuntimeConfig(device="cpu").resolved_device() == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_resolved_device_cuda_without_cuda_names_the_fix():
    with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
        RuntimeConfig(device="cuda").resolved_device()
