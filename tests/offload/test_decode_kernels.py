"""The engine's decode kernels (Triton, Numba, torch) and CPU delegation of HOST pages give
the same logits as the plain in-memory run, on a tiny model with pages on every tier.

Triton runs in its interpreter here (tests/conftest.py sets TRITON_INTERPRET=1 without
CUDA), so the engine's CUDA decode path is exercised on the CPU with the same kernels.
"""
from __future__ import annotations

import pytest
import torch

from offload.config import DecodeKernel, HostAttention, RuntimeConfig
from offload.engine import Engine
from offload.model.model_source import resolve_model
from offload.kv.placement import Placement
from offload.stats import RunStats
from storage import Tier
from tests.offload.arch_pairs import ours_teacher_forced, save_tiny
from tests.tolerances import TOL

PROMPT = 200
FORCED = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("llama3", folder, hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=64)
    ids = torch.randint(0, 512, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    return folder, ids


def _engine(folder, tmp_path, **kw) -> Engine:
    kw.setdefault("page_size", 16)
    return Engine(resolve_model(str(folder), cache_dir=folder / "cache"),
                  RuntimeConfig(device="cpu", kv_dir=str(tmp_path / "kv"), staging_chunk_pages=3,
                                host_memory_bytes=16 * 2**20, **kw))


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    folder, ids = tiny
    engine = _engine(folder, tmp_path_factory.mktemp("ref"), decode_kernel=DecodeKernel.TORCH)
    return ours_teacher_forced(engine, ids, FORCED, prompt_logits=8)


MIXED = Placement(device_pages=3, host_pages=4)  # pages 7.. on DISK, the tail on DEVICE


@pytest.mark.parametrize("kernel", [DecodeKernel.TRITON, DecodeKernel.NUMBA, DecodeKernel.TORCH])
@pytest.mark.parametrize("delegate", [False, True], ids=["fetch-host", "delegate-host"])
def test_decode_kernels_and_delegation_match_the_in_memory_run(tiny, reference, tmp_path, kernel, delegate):
    folder, ids = tiny
    placement = MIXED.with_delegation(range(0, 8, 2) if delegate else ())
    engine = _engine(folder, tmp_path, placement=placement, decode_kernel=kernel, shuffle_pages_seed=5)
    try:
        got = ours_teacher_forced(engine, ids, FORCED, prompt_logits=8)
        assert set(Tier) <= {t for t, b in engine.kv.io.bytes_read.items() if b > 0}
    finally:
        engine.close()
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(got, reference, atol=10 * atol, rtol=10 * rtol)  # partials split differently


def test_delegation_is_visible_in_stats(tiny, tmp_path):
    """HOST pages attended on the CPU are counted as such, and none is copied to the device."""
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement(2, None).with_delegation(range(8)),
                     decode_kernel=DecodeKernel.TORCH)
    try:
        stats = RunStats()
        list(engine.generate(engine.new_sequence(), ids, max_new_tokens=4, stats=stats))
    finally:
        engine.close()
    host = stats.bytes_read_per_token["host"]
    assert host > 0
    assert stats.cpu_attended_bytes_per_token["host"] == host
    assert stats.cpu_attended_bytes_per_token["device"] == 0  # torch's op attended DEVICE pages
    assert stats.copied_to_device_bytes_per_token == 0


def test_engine_placement_delegates_by_config(tiny, tmp_path):
    folder, _ = tiny
    engine = _engine(folder, tmp_path, device_memory_bytes=1 << 20)
    try:
        engine.placement_for(engine.new_sequence(), 64)
        assert [engine.host_share(layer) for layer in range(engine.model_config.num_layers)] == [1.0] * 3
    finally:
        engine.close()
    engine = _engine(folder, tmp_path / "b", device_memory_bytes=1 << 20, host_attention=HostAttention.DEVICE)
    try:
        engine.placement_for(engine.new_sequence(), 64)
        assert [engine.host_share(layer) for layer in range(engine.model_config.num_layers)] == [0.0] * 3
    finally:
        engine.close()


def test_all_device_placement_reads_device_only(tiny, tmp_path):
    folder, ids = tiny
    engine = _engine(folder, tmp_path, placement=Placement.all_on(Tier.DEVICE), decode_kernel=DecodeKernel.NUMBA)
    try:
        stats = RunStats()
        list(engine.generate(engine.new_sequence(), ids, max_new_tokens=3, stats=stats))
    finally:
        engine.close()
    assert stats.bytes_read_per_token["device"] > 0
    assert stats.bytes_read_per_token["host"] == stats.bytes_read_per_token["disk"] == 0
    assert stats.cpu_attended_bytes_per_token["device"] == stats.bytes_read_per_token["device"]


def test_triton_decode_with_kv_pages_in_another_dtype(tiny, tmp_path):
    """bf16 KV pages under fp32 compute (``--kv-dtype bf16``): the Triton path gives the query
    the pages' dtype (the kernel takes one dtype) on every tier, and agrees with the torch
    kernel, which widens the pages instead; they differ only by the query's bf16 rounding."""
    folder, ids = tiny
    got = {}
    for kernel in (DecodeKernel.TRITON, DecodeKernel.TORCH):
        engine = _engine(folder, tmp_path / kernel.value, placement=MIXED, decode_kernel=kernel,
                         kv_dtype=torch.bfloat16)
        try:
            got[kernel] = ours_teacher_forced(engine, ids, FORCED, prompt_logits=8)
            assert engine.kv.arena.dtype == torch.bfloat16
            assert set(Tier) <= {t for t, b in engine.kv.io.bytes_read.items() if b > 0}
        finally:
            engine.close()
    diff = (got[DecodeKernel.TRITON] - got[DecodeKernel.TORCH]).abs().max().item()
    assert diff < 2e-2, diff
