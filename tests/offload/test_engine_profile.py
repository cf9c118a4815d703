"""The engine never measures a hardware profile: a prefill that spills plans with the given
profile, this machine's saved one, or the device type's preset, and says which in its stats;
LongDocQA measures once per cache dir, before it builds the engine, and says so."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.model.model_source import ModelSource
from offload.stats import RunStats
from offload.tuning import engine_probe, profile_probes
from offload.tuning import profile as prof
from offload.tuning import profile_store as store
from planner.profile import HardwareProfile
from storage import Tier

MiB = 2**20
PROMPT = 44 * 32 + 8  # 44 full pages of 32 tokens and a tail, per layer (the engine probe's prompt)
DECODE = 3
# 176 pages of 8 KiB (4 layers) against a 48-page DEVICE arena and no HOST tier: most spill to DISK.
BUDGETS = dict(device_memory_bytes=48 * 8 * 2**10, disk_space_bytes=16 * MiB, staging_chunk_pages=8)


class ProbeRan(AssertionError):
    pass


@pytest.fixture
def no_measuring(monkeypatch, tmp_path) -> Path:
    """Every probe and the measuring entry raise; $OFFLOAD_CACHE is an empty folder (returned)."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise ProbeRan("a hardware probe ran inside the engine")

    for name in profile_probes.__all__:
        if callable(getattr(profile_probes, name)) and not isinstance(getattr(profile_probes, name), type):
            monkeypatch.setattr(profile_probes, name, refuse)
    monkeypatch.setattr(engine_probe, "engine_overheads", refuse)
    monkeypatch.setattr(prof, "measure_profile", refuse)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("OFFLOAD_CACHE", str(home))
    return home


def _run(tmp_path: Path, **kw: object) -> tuple[Engine, RunStats]:
    """A tiny random-weight engine: a prefill that spills past DEVICE, then DECODE steps."""
    cfg = engine_probe.tiny_model_config()
    config = RuntimeConfig(device="cpu", kv_dir=str(tmp_path / "kv"), **{**BUDGETS, **kw})
    engine = Engine(ModelSource("tiny-llama", cfg, None, None), config)
    stats = RunStats()
    seq = engine.new_sequence()
    tokens = list(engine.generate(seq, [i % cfg.vocab_size for i in range(PROMPT)], max_new_tokens=DECODE + 1,
                                  stats=stats))
    assert len(tokens) == DECODE + 1
    assert stats.peak_bytes["disk"] > 0  # it spilled, so it planned
    assert engine.last_plan is not None
    engine.release(seq)
    return engine, stats


def test_spilling_engine_without_a_saved_profile_plans_with_the_preset(tmp_path, no_measuring):
    engine, stats = _run(tmp_path)
    try:
        assert engine.hardware_profile().name == "cpu-2core"
        assert stats.profile == "cpu-2core (preset)"
        assert not (no_measuring / "profiles").exists()  # nothing measured, nothing saved
    finally:
        engine.close()


def test_spilling_engine_uses_the_saved_profile(tmp_path, no_measuring):
    saved = dataclasses.replace(HardwareProfile.preset("cpu-2core"), name="measured on test (quick)",
                                disk_write_gbps=0.5)
    store.save_profile(store.profile_path(no_measuring, "cpu", dtype=torch.float32), saved)
    engine, stats = _run(tmp_path)
    try:
        assert engine.hardware_profile() == saved
        assert stats.profile == "measured on test (quick) (saved)"
    finally:
        engine.close()


def test_a_given_profile_wins_and_nothing_is_read(tmp_path, no_measuring, monkeypatch):
    def refuse(**kwargs: object) -> None:
        raise AssertionError("a saved profile was read although one was given")

    monkeypatch.setattr("offload.engine_admission.load_saved", refuse)
    engine, stats = _run(tmp_path, profile=HardwareProfile.preset("h100-sxm"))
    try:
        assert stats.profile == "h100-sxm (given)"
    finally:
        engine.close()


def test_an_engine_that_never_plans_reports_no_profile(tmp_path, no_measuring):
    cfg = engine_probe.tiny_model_config()
    engine = Engine(ModelSource("tiny-llama", cfg, None, None), RuntimeConfig(device="cpu"))
    try:
        stats = RunStats()
        seq = engine.new_sequence()
        list(engine.generate(seq, list(range(100)), max_new_tokens=2, stats=stats))
        assert stats.profile is None and engine.last_plan is None
        assert all(t == Tier.DEVICE for t in seq.table.tiers(0))
    finally:
        engine.close()


# ----- LongDocQA -------------------------------------------------------------------------------------------
class CountingMeasure:
    """Stands in for measure_profile: counts calls and returns a recognisable profile."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, **kwargs: object) -> HardwareProfile:
        self.calls.append(kwargs)
        return dataclasses.replace(HardwareProfile.preset("cpu-2core"), name="measured by the test (quick)")


def test_long_doc_qa_measures_once_per_cache_dir_before_its_engine(tmp_path, monkeypatch, capsys):
    from offload.api import LongDocQA

    measure = CountingMeasure()
    monkeypatch.setattr(prof, "measure_profile", measure)
    config = RuntimeConfig(device="cpu", device_memory_bytes=2 * MiB, host_memory_bytes=12 * MiB,
                           staging_chunk_pages=8)
    with LongDocQA("smollm2-135m", config=config, cache_dir=tmp_path, random_weights=True, num_layers=1) as qa:
        assert qa.engine.config.profile is not None and qa.engine.config.profile.name == "measured by the test (quick)"
    assert len(measure.calls) == 1 and measure.calls[0]["quick"] is True
    assert measure.calls[0]["cache_dir"] == tmp_path and measure.calls[0]["progress"] is False
    assert prof.MEASURE_NOTICE in capsys.readouterr().err
    with LongDocQA("smollm2-135m", config=config, cache_dir=tmp_path, random_weights=True, num_layers=1) as qa:
        doc = qa.ingest("The ferry leaves at seven. " * 80)  # ~560 tokens: past the 2 MiB DEVICE arena
        assert doc.stats.profile == "measured by the test (quick) (given)"
    assert len(measure.calls) == 1  # found saved under the cache dir
    assert prof.MEASURE_NOTICE not in capsys.readouterr().err
