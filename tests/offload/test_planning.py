"""The engine executes the planner's placements: per-layer placements, plan -> placement,
LP and greedy plans on a tiny model (tiers as planned, logits as in memory), the delegated
share of HOST pages, model sizes for ``offload plan``."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from offload.config import HostAttention, RuntimeConfig
from offload.engine import Engine
from offload.errors import CapacityError
from offload.model.model_config import ModelConfig
from offload.model.model_source import resolve_model
from offload.kv.placement import Placement
from offload.tuning.planning import engine_problem, model_problem, plan_placement, stored_chunk_pages, weight_bytes
from offload.model.shapes import NAMED_SHAPES
from planner import HardwareProfile, greedy_plan, plan
from storage import Tier
from tests.offload.arch_pairs import ours_teacher_forced, save_tiny
from tests.tolerances import TOL
from offload.kv.page_table import cdiv

GiB = 2**30
PROMPT = 300
FORCED = [5, 6, 7, 8]
CPU = HardwareProfile.preset("cpu-2core")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    save_tiny("llama3", folder)
    ids = torch.randint(0, 512, (PROMPT,), generator=torch.Generator().manual_seed(3)).tolist()
    return folder, ids


def _engine(folder, tmp_path, **kw) -> Engine:
    kw.setdefault("page_size", 16)
    kw.setdefault("profile", CPU)
    return Engine(resolve_model(str(folder), cache_dir=folder / "cache"),
                  RuntimeConfig(device="cpu", kv_dir=str(tmp_path / "kv"), staging_chunk_pages=3, **kw))


def test_a_staging_chunk_of_4bit_pages_holds_an_exact_chunks_disk_bytes():
    """SmolLM2 fp32 pages (48 KiB) against 4-bit ones (7680 bytes in an 8 KiB DISK slot): 64
    exact pages' bytes are 384 packed pages, so the extent the planner prices is the same."""
    assert stored_chunk_pages(64, 49152, 49152) == 64
    assert stored_chunk_pages(64, 49152, 7680) == 384
    assert stored_chunk_pages(1, 4096, 8192) == 1  # never less than a page
    cfg = ModelConfig.from_hf_dict(NAMED_SHAPES["smollm2-135m"])
    kw = dict(context_tokens=8192, dtype_bytes=4, kv_dtype_bytes=4, device_budget_bytes=None, host_budget_bytes=None,
              disk_budget_bytes=None)
    exact, packed = model_problem(cfg, **kw), model_problem(cfg, packed_page_bytes=7680, **kw)
    assert exact.disk_extent_bytes == packed.disk_extent_bytes == 64 * 49152


def test_per_layer_placement():
    p = Placement(device_pages=(2, 0), host_pages=(1, None), delegated_share=(0.0, 0.5))
    assert [p.tier_of(i, 0) for i in range(4)] == [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.DISK]
    assert [p.tier_of(i, 1) for i in range(3)] == [Tier.HOST] * 3
    assert p.host_share(1) == 0.5 and p.host_share(0) == 0.0
    assert p.reaches_disk(2) and not Placement(None, 0).reaches_disk(2)
    assert Placement(3, None).with_delegation(range(2)).host_share(1) == 1.0
    with pytest.raises(ValueError, match="one length"):
        Placement(device_pages=(1, 2), host_pages=(1,))
    with pytest.raises(ValueError, match="ints >= 0"):
        Placement(device_pages=(1, -2))
    with pytest.raises(ValueError, match="fractions"):
        Placement(delegated_share=(1.5,))


def _problem(cfg: ModelConfig, device: int, host: int, disk: int, **kw):
    return engine_problem(cfg, new_pages=10, page_size=16, dtype_bytes=4, kv_dtype_bytes=4, device_room_pages=device,
                          host_room_pages=host, disk_room_pages=disk, staging_chunk_pages=3,
                          allow_delegation=kw.pop("allow_delegation", False), **kw)


def test_plan_to_placement_counts_from_the_first_new_page():
    cfg = ModelConfig.from_hf_dict(NAMED_SHAPES["smollm2-135m"]).with_num_layers(3)
    g = greedy_plan(_problem(cfg, device=15, host=5, disk=100), CPU)
    # layer by layer: 10 + 5 DEVICE pages, then 5 HOST, then DISK
    assert g.device_pages == (10, 5, 0) and g.host_pages == (0, 5, 0) and g.disk_pages == (0, 0, 10)
    p = plan_placement(g, first_page=4)
    assert [p.tier_of(i, 1) for i in (4, 8, 9, 13, 14)] == [Tier.DEVICE, Tier.DEVICE, Tier.HOST, Tier.HOST, Tier.DISK]
    assert p.tier_of(13, 0) == Tier.DEVICE and p.tier_of(4, 2) == Tier.DISK
    lp = plan(_problem(cfg, device=15, host=5, disk=100), CPU)
    assert sum(lp.device_pages) == 15 and sum(lp.host_pages) == 5  # fills the RAM tiers: DISK is slower
    assert lp.decode_step_s <= g.decode_step_s


def test_plan_placement_marks_the_recomputed_share_of_host_pages():
    """KVPR's pages execute (``offload.kv.kvpr``): the placement keeps that share of each
    layer's HOST pages as activations, and delegation takes a share of the others."""
    cfg = ModelConfig.from_hf_dict(NAMED_SHAPES["llama-3.1-8b"])
    problem = model_problem(cfg, context_tokens=32768, dtype_bytes=2, kv_dtype_bytes=2, device_budget_bytes=20 * GiB,
                            host_budget_bytes=64 * GiB, disk_budget_bytes=None, allow_recompute=True, sparse_budget=0.25)
    result = plan(problem, HardwareProfile.preset("rtx4090-pcie4"))
    host = tuple(max(h, 4) for h in result.host_pages)
    recomputing = dataclasses.replace(result, host_pages=host, recomputed_pages=(2,) * len(host),
                                      delegated_pages=(1,) * len(host))
    placement = plan_placement(recomputing, first_page=0)
    assert placement.recomputed_share == tuple(2 / h for h in host)
    assert placement.delegated_share == tuple(1 / (h - 2) for h in host)
    # A sparse budget alone is executable (--sparse quest): its placement is an ordinary one.
    sparse = model_problem(cfg, context_tokens=1024, dtype_bytes=2, kv_dtype_bytes=2, device_budget_bytes=None,
                           host_budget_bytes=None, disk_budget_bytes=None, sparse_budget=0.5)
    assert sparse.sparse_budget == 0.5 and not sparse.allow_recompute


def test_weight_bytes_match_the_loaded_model(tiny, tmp_path):
    folder, _ = tiny
    engine = _engine(folder, tmp_path)
    assert weight_bytes(engine.model_config, 4) == engine.runner.weights_bytes
    engine.close()
    llama = ModelConfig.from_hf_dict(NAMED_SHAPES["llama-3.1-8b"])
    assert weight_bytes(llama, 2) == pytest.approx(8.03e9 * 2, rel=0.01)  # 8.03 B parameters in bf16


@pytest.mark.parametrize("planner", ["lp", "greedy"])
def test_engine_executes_the_plan(tiny, tmp_path, planner):
    folder, ids = tiny
    reference = _engine(folder, tmp_path / "ref")
    want = ours_teacher_forced(reference, ids, FORCED, prompt_logits=16)
    slot, layers = reference.arena.slot_bytes, reference.model_config.num_layers
    pages = cdiv(PROMPT, 16)
    # DEVICE: the reserve (8 pages per layer) + 1.5 layers' pages; HOST: 1 layer's; DISK: the rest.
    # One staging buffer: reads cannot run ahead of the layer before, so spreading the DISK
    # pages over the layers is predicted faster than greedy's last layers (the LP's plan is used).
    engine = _engine(folder, tmp_path, planner=planner, device_memory_bytes=(8 * layers + 3 * pages // 2) * slot,
                     host_memory_bytes=pages * slot + 3 * 4096 + 8 * 2**20, staging_buffers=1)
    try:
        seq = engine.new_sequence()
        engine.forward(seq, ids)
        p = engine.last_plan
        assert p is not None and p.method == planner
        for layer in range(layers):
            tiers = seq.table.tiers(layer)[:pages - 1]  # the partial last page is the DEVICE tail
            planned = [Tier.DEVICE] * p.device_pages[layer] + [Tier.HOST] * p.host_pages[layer]
            planned += [Tier.DISK] * p.disk_pages[layer]
            assert tiers == planned[:pages - 1]
        if planner == "greedy":
            assert p.device_pages[0] == pages and p.disk_pages[-1] > 0  # first layers close, last ones far
        else:
            assert min(p.disk_pages) > 0 and max(p.disk_pages) - min(p.disk_pages) <= 2  # spread over layers
        engine.release(seq)
        got = ours_teacher_forced(engine, ids, FORCED, prompt_logits=16)
    finally:
        engine.close()
    atol, rtol = TOL[torch.float32]
    torch.testing.assert_close(got, want, atol=10 * atol, rtol=10 * rtol)


def test_delegated_share_of_host_pages(tiny, tmp_path):
    """With the torch kernel on a CPU, non-delegated HOST pages go through the copy path:
    a share of 0.5 attends half of each layer's HOST pages in place."""
    from offload.config import DecodeKernel
    from offload.stats import RunStats

    folder, ids = tiny
    pages = cdiv(PROMPT, 16)
    layers = resolve_model(str(folder), cache_dir=folder / "cache").config.num_layers
    with pytest.raises(ValueError, match=f"one entry per layer \\({layers}\\)"):
        _engine(folder, tmp_path, placement=Placement(0, None, delegated_share=(0.5,) * (layers + 1)))
    placement = Placement(device_pages=0, host_pages=None, delegated_share=(0.5,) * layers)
    engine = _engine(folder, tmp_path, placement=placement, host_memory_bytes=64 * 2**20,
                     decode_kernel=DecodeKernel.TORCH)
    try:
        stats = RunStats()
        list(engine.generate(engine.new_sequence(), ids, max_new_tokens=3, stats=stats))
        page = engine.kv.page_bytes
        assert stats.bytes_read_per_token["host"] == layers * (pages - 1) * page
        assert stats.cpu_attended_bytes_per_token["host"] == layers * round(0.5 * (pages - 1)) * page
        assert stats.copied_to_device_bytes_per_token == 0  # the CPU is the compute device: nothing crosses
    finally:
        engine.close()


def test_host_attention_device_pins_delegation_to_zero(tiny, tmp_path):
    folder, _ = tiny
    engine = _engine(folder, tmp_path, host_attention=HostAttention.DEVICE)
    assert engine.host_share(0) == 0.0
    engine.close()
    engine = _engine(folder, tmp_path)
    assert engine.host_share(1) == 1.0  # before any plan: delegation allowed everywhere
    engine.close()


def test_unknown_planner_is_refused():
    with pytest.raises(ValueError, match="planner must be one of lp, greedy"):
        RuntimeConfig(planner="fastest")


def test_tiers_too_small_for_the_plan_name_the_budgets(tiny, tmp_path):
    folder, ids = tiny
    probe = _engine(folder, tmp_path / "probe")
    slot, layers = probe.arena.slot_bytes, probe.model_config.num_layers
    probe.close()
    engine = _engine(folder, tmp_path, device_memory_bytes=(8 * layers + 2) * slot, disk_space_bytes=4 * slot)
    try:
        with pytest.raises(CapacityError, match="--disk-space"):
            engine.forward(engine.new_sequence(), ids)
    finally:
        engine.close()


@pytest.mark.slow
def test_validation_bench_runs_small(tmp_path, smollm2_source, cache_dir):
    """bench/validate_planner.py end to end on one small configuration: both plans execute,
    predictions and measurements are printed and saved."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "val.json"
    env = dict(os.environ, OFFLOAD_CACHE=str(cache_dir))
    proc = subprocess.run([sys.executable, str(root / "bench" / "validate_planner.py"), "--configs", "2K d30 h30",
                           "--repeats", "1", "--steps", "2", "--quick-profile", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Prediction error over 2 measured plans" in proc.stdout
    row = json.loads(out.read_text())["rows"][0]
    assert row["shared"] and len(row["lp"]["repeats"]) == 2 == len(row["greedy"]["repeats"])
    for method in ("lp", "greedy"):
        assert row[method]["measured_s"] > 0 and row[method]["predicted_s"] > 0
        assert sum(row[method]["tier_mib"].values()) > 0
    proc = subprocess.run([sys.executable, str(root / "bench" / "validate_planner.py"), "--configs", "2K d30 h30",
                           "--repeats", "1", "--steps", "2", "--quick-profile", "--separate-engines"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "geometric mean of the rounds" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("placement", [Placement(None, 0), Placement(4, 4), Placement(3, None), Placement(0, 0),
                                       Placement((2, 9), (5, 0)), Placement.all_on(Tier.DISK)])
def test_disk_pages_counts_what_tier_of_puts_on_disk(placement):
    for layer in (0, 1):
        for pages in (0, 1, 8, 13):
            want = sum(placement.tier_of(p, layer) == Tier.DISK for p in range(pages))
            assert placement.disk_pages(pages, layer) == want
