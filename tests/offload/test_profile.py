"""`offload profile`: a quick measurement on this machine gives a valid, plausible profile;
the saved profile is reused, refreshed and re-measured exactly when it should be; the disk
probe leaves no file behind; the command prints JSON or a table and refuses bad options."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import pytest
import torch

from offload.config import RuntimeConfig
from offload.kv.placement import Placement
from offload.tuning import profile as prof
from offload.tuning import profile_probes as probes
from offload.tuning import profile_store as store
from planner.profile import HardwareProfile

MiB = 2**20
DISK_EXTENTS_SMALL = (64 * 2**10, MiB)
BAD_DTYPES = ["fp8", "int4", "double"]
BAD_DEVICES = ["tpu", "gpu0"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[HardwareProfile, dict, Path]:
    """One real quick measurement on this machine (CPU), shared by the plausibility tests."""
    cache = tmp_path_factory.mktemp("profile-cache")
    details: dict = {}
    profile = prof.measure_profile(device="cpu", cache_dir=cache, quick=True, progress=False, details=details)
    return profile, details, cache


def test_quick_profile_is_plausible(quick_run):
    profile, details, _ = quick_run
    assert isinstance(profile, HardwareProfile)  # __post_init__ validated every field
    assert profile.name.endswith(store.QUICK_SUFFIX) and store.is_quick(profile)
    assert profile.device_is_host
    assert 0.5 <= profile.host_to_device_pinned_gbps <= 200
    assert profile.host_to_device_pageable_gbps == profile.host_to_device_pinned_gbps  # no pinned memory on CPU
    assert [e for e, _ in profile.disk_read_gbps_by_extent] == list(prof.DISK_EXTENTS)
    read = dict(profile.disk_read_gbps_by_extent)
    # Larger extents read no slower on any disk; the margin is wide because another test
    # process may read beside this probe (make test runs files in parallel).
    assert read[4 * MiB] >= 0.25 * read[64 * 2**10]
    assert all(0.005 <= g <= 100 for g in read.values())
    assert 0.005 <= profile.disk_write_gbps <= 100
    assert 0.1 <= profile.cpu_attention_gbps <= 500
    assert profile.device_attention_gbps == profile.cpu_attention_gbps  # the "device" is the CPU
    assert 0.02 <= profile.cpu_attention_4bit_gbps == profile.device_attention_4bit_gbps <= 500
    assert profile.weights_gbps is not None and 0.1 <= profile.weights_gbps <= 500
    assert 1e-4 <= profile.device_matmul_tflops == profile.cpu_matmul_tflops <= 100
    assert 1e-6 <= profile.layer_overhead_s <= 0.1
    assert 0 <= profile.piece_overhead_s <= 0.1
    assert 0 <= profile.read_interference_s_per_gb <= 5  # s per GB read beside compute
    assert profile.device_free_bytes == profile.host_free_bytes > 0  # half the available RAM each
    assert profile.disk_free_bytes > 0
    assert details["disk"].cold_read_mode in ("o_direct", "fadvise_dontneed")
    assert details["seconds"] <= 60  # quick means seconds (4 s on an idle 2-core machine)


def test_quick_profile_leaves_no_scratch_file(quick_run):
    _, _, cache = quick_run
    assert (cache / "kv").is_dir()
    assert list((cache / "kv").iterdir()) == []


def test_profile_round_trips_through_json(quick_run):
    profile, _, _ = quick_run
    assert HardwareProfile.from_json(profile.to_json()) == profile


# ----- the disk probe ------------------------------------------------------------------------------
@pytest.fixture
def advised(monkeypatch) -> list[int]:
    """The advice of every posix_fadvise call from here on (the calls are still made), with
    O_DIRECT switched off in the probes (the fadvise path)."""
    monkeypatch.setattr(probes, "_O_DIRECT", 0)
    log: list[int] = []
    real_fadvise = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        log.append(advice)
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    return log


def test_disk_probe_without_o_direct_drops_the_cache_and_cleans_up(tmp_path, advised):
    result = probes.disk_probe(tmp_path / "kv", file_bytes=4 * MiB, read_bytes=2 * MiB,
                               extents=DISK_EXTENTS_SMALL, repeats=2)
    assert result.cold_read_mode == "fadvise_dontneed"
    assert advised.count(os.POSIX_FADV_DONTNEED) == 2 * len(DISK_EXTENTS_SMALL) + 2  # every pass, QD1 too
    assert [e for e, _ in result.read_gbps_by_extent] == list(DISK_EXTENTS_SMALL)
    assert list((tmp_path / "kv").iterdir()) == []


def test_disk_probe_removes_its_file_when_a_read_fails(tmp_path, monkeypatch):
    def failing_preadv(*args: object) -> int:
        raise OSError(5, "injected read error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(OSError, match="injected read error"):
        probes.disk_probe(tmp_path / "kv", file_bytes=2 * MiB, read_bytes=MiB, extents=DISK_EXTENTS_SMALL,
                          repeats=1)
    assert list((tmp_path / "kv").iterdir()) == []


@pytest.mark.parametrize("file_bytes, read_bytes, extents", [(4 * MiB, 2 * MiB, (6000,)),
                                                               (3 * MiB, MiB, (2 * MiB,)),
                                                               (4 * MiB, 3 * MiB, (2 * MiB,))])
def test_disk_probe_rejects_extents_that_do_not_tile(tmp_path, file_bytes, read_bytes, extents):
    with pytest.raises(ValueError, match="must be a multiple of 4096 and divide"):
        probes.disk_probe(tmp_path / "kv", file_bytes=file_bytes, read_bytes=read_bytes, extents=extents,
                          repeats=1)
    assert not (tmp_path / "kv").exists()


# ----- reads beside compute -----------------------------------------------------------------------
def test_read_interference_is_bounded_by_the_reads_and_cleans_up(tmp_path):
    """Both at once take at most compute + reads, so the loss per GB is at most the reads'
    own seconds per GB (1 / rate), with slack for thread start-up and noise."""
    loss, gbps = probes.read_interference(tmp_path / "kv", torch.float32, weights_bytes=16 * MiB,
                                          file_bytes=16 * MiB, repeats=3)
    assert gbps > 0.005
    assert 0.0 <= loss <= 2.0 / gbps + 0.05
    assert list((tmp_path / "kv").iterdir()) == []


def test_read_interference_without_o_direct_drops_the_cache(tmp_path, advised):
    loss, gbps = probes.read_interference(tmp_path / "kv", torch.float32, weights_bytes=8 * MiB,
                                          file_bytes=8 * MiB, repeats=2)
    assert advised.count(os.POSIX_FADV_DONTNEED) == 4  # every read pass: 2 alone, 2 beside compute
    assert loss >= 0.0 and gbps > 0
    assert list((tmp_path / "kv").iterdir()) == []


def test_read_interference_removes_its_file_when_a_read_fails(tmp_path, monkeypatch):
    def failing_preadv(*args: object) -> int:
        raise OSError(5, "injected read error")

    monkeypatch.setattr(os, "preadv", failing_preadv)
    with pytest.raises(OSError, match="injected read error"):
        probes.read_interference(tmp_path / "kv", torch.float32, weights_bytes=8 * MiB, file_bytes=8 * MiB,
                                 repeats=1)
    assert list((tmp_path / "kv").iterdir()) == []


def test_read_interference_rejects_a_file_that_does_not_tile(tmp_path):
    with pytest.raises(ValueError, match="must be a multiple of 4096 and divide"):
        probes.read_interference(tmp_path / "kv", torch.float32, weights_bytes=8 * MiB, file_bytes=3 * MiB,
                                 extent=2 * MiB)


def test_profile_saved_by_format_1_is_measured_again(tmp_path, fake):
    """Format 1 had no read interference: a plan priced without it would undercount DISK."""
    path = store.profile_path(tmp_path, "cpu", dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = {k: v for k, v in HardwareProfile.preset("cpu-2core").to_dict().items()
           if k != "read_interference_s_per_gb"}
    path.write_text(json.dumps({**old, "format_version": 1}), encoding="utf-8")
    got = prof.load_or_measure(device="cpu", dtype=torch.float32, cache_dir=tmp_path, progress=False)
    assert fake.quick_flags == [False] and got.name == "measured on test"


# ----- saving and reusing ------------------------------------------------------------------------
class FakeMeasure:
    """Stands in for measure_profile in the caching tests: records each call's quick flag."""

    def __init__(self) -> None:
        self.quick_flags: list[bool] = []

    def __call__(self, *, quick: bool = False, **kwargs: object) -> HardwareProfile:
        self.quick_flags.append(quick)
        base = HardwareProfile.preset("cpu-2core")
        return dataclasses.replace(base, name="measured on test" + (store.QUICK_SUFFIX if quick else ""),
                                   layer_overhead_s=1e-4 * len(self.quick_flags))


@pytest.fixture()
def fake(monkeypatch) -> FakeMeasure:
    f = FakeMeasure()
    monkeypatch.setattr(prof, "measure_profile", f)
    return f


def test_saves_then_reuses(tmp_path, fake):
    first = prof.load_or_measure(device="cpu", cache_dir=tmp_path, progress=False)
    path = store.profile_path(tmp_path, "cpu")
    assert path.is_file() and HardwareProfile.from_json(path.read_text()) == first
    second = prof.load_or_measure(device="cpu", cache_dir=tmp_path, progress=False)
    assert fake.quick_flags == [False]
    assert second == first
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temp file left


def test_refresh_measures_again(tmp_path, fake):
    first = prof.load_or_measure(device="cpu", cache_dir=tmp_path, progress=False)
    again = prof.load_or_measure(device="cpu", cache_dir=tmp_path, refresh=True, progress=False)
    assert fake.quick_flags == [False, False]
    assert again != first
    assert HardwareProfile.from_json(store.profile_path(tmp_path, "cpu").read_text()) == again


CORRUPT_FILES = ["{not json", "[1, 2]", '{"format_version": 1, "name": "x"}',
                 json.dumps({**HardwareProfile.preset("cpu-2core").to_dict(), "format_version": 0}),
                 json.dumps({**HardwareProfile.preset("cpu-2core").to_dict(), "disk_write_gbps": "fast"})]


@pytest.mark.parametrize("text", CORRUPT_FILES)
def test_unusable_file_is_measured_again_with_a_warning(tmp_path, fake, caplog, text):
    path = store.profile_path(tmp_path, "cpu")
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="offload.tuning.profile_store"):
        got = prof.load_or_measure(device="cpu", cache_dir=tmp_path, progress=False)
    assert fake.quick_flags == [False]
    assert any("unusable" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    assert HardwareProfile.from_json(path.read_text()) == got


def test_quick_profile_is_not_reused_by_a_full_request(tmp_path, fake):
    quick = prof.load_or_measure(device="cpu", cache_dir=tmp_path, quick=True, progress=False)
    assert prof.load_or_measure(device="cpu", cache_dir=tmp_path, quick=True, progress=False) == quick
    full = prof.load_or_measure(device="cpu", cache_dir=tmp_path, quick=False, progress=False)
    assert fake.quick_flags == [True, False]
    assert not store.is_quick(full)
    # A full profile serves a later quick request too.
    assert prof.load_or_measure(device="cpu", cache_dir=tmp_path, quick=True, progress=False) == full
    assert fake.quick_flags == [True, False]


# ----- the file name ----------------------------------------------------------------------------------
def test_profile_path_is_stable_and_names_the_device(tmp_path):
    path = store.profile_path(tmp_path, "cpu")
    assert path == store.profile_path(tmp_path, torch.device("cpu"))
    assert path.parent == tmp_path / "profiles"
    assert re.fullmatch(r"cpu-[0-9a-f]{12}\.json", path.name)


def test_profile_path_changes_with_what_identifies_the_machine(tmp_path, monkeypatch):
    base = store.profile_path(tmp_path, "cpu")
    assert store.profile_path(tmp_path, "cpu", dtype=torch.bfloat16) != base
    monkeypatch.setattr(store, "_fs_device_id", lambda path: 123456789)
    assert store.profile_path(tmp_path, "cpu") != base
    monkeypatch.undo()
    monkeypatch.setattr(store.socket, "gethostname", lambda: "another-host")
    assert store.profile_path(tmp_path, "cpu") != base


# ----- looking up without measuring ------------------------------------------------------------------
def test_load_saved_reads_only(tmp_path, fake):
    cache = tmp_path / "not-made-yet"
    assert store.load_saved(device="cpu", dtype=torch.float32, cache_dir=cache) is None
    assert not cache.exists() and fake.quick_flags == []  # nothing created, nothing measured
    saved = prof.load_or_measure(device="cpu", dtype=torch.float32, cache_dir=cache, quick=True, progress=False)
    assert store.load_saved(device="cpu", dtype=torch.float32, cache_dir=cache) == saved
    assert store.load_saved(device="cpu", dtype=torch.bfloat16, cache_dir=cache) is None  # another dtype's file


def test_load_saved_defaults_to_offload_cache(tmp_path, monkeypatch, fake):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path))
    saved = prof.load_or_measure(device="cpu", cache_dir=tmp_path, progress=False)
    assert store.load_saved(device="cpu", dtype=None) == saved


# ----- profile_for: the entry points measure once, before the engine -----------------------------------
SPILLS = RuntimeConfig(device="cpu", device_memory_bytes=MiB)
# (config, why profile_for leaves it alone): no engine built from it can call the planner, or
# it names its profile.
NEVER_PLANS = [
    (RuntimeConfig(device="cpu"), "no budgets: DEVICE holds the context, no DISK tier"),
    (RuntimeConfig(device="cpu", disk_space_bytes=0, host_memory_bytes=MiB), "disk off, no DEVICE budget"),
    (RuntimeConfig(device="cpu", device_memory_bytes=MiB, placement=Placement(1, 1)), "a given placement"),
    (dataclasses.replace(SPILLS, profile=HardwareProfile.preset("h100-sxm")), "a given profile"),
]


@pytest.mark.parametrize("config, why", NEVER_PLANS, ids=[w for _, w in NEVER_PLANS])
def test_profile_for_leaves_alone_a_config_that_never_plans(tmp_path, fake, capsys, config, why):
    assert prof.profile_for(config, progress=True, cache_dir=tmp_path) is config
    assert fake.quick_flags == [] and capsys.readouterr().err == ""
    assert not (tmp_path / "profiles").exists()


@pytest.mark.parametrize("config", [SPILLS, RuntimeConfig(device="cpu", disk_space_bytes=64 * MiB)],
                         ids=["device budget", "disk budget"])
def test_profile_for_measures_once_with_a_notice_even_when_quiet(tmp_path, fake, capsys, config):
    got = prof.profile_for(config, progress=False, cache_dir=tmp_path)
    assert fake.quick_flags == [True]
    assert capsys.readouterr().err.splitlines() == [prof.MEASURE_NOTICE]
    assert got == dataclasses.replace(config, profile=got.profile) and got.profile.name == "measured on test (quick)"
    assert store.load_saved(device="cpu", dtype=torch.float32, cache_dir=tmp_path) == got.profile
    again = prof.profile_for(config, progress=False, cache_dir=tmp_path)
    assert again.profile == got.profile and fake.quick_flags == [True]  # saved: no second measurement
    assert capsys.readouterr().err == ""


def test_profile_for_uses_a_saved_full_profile_and_the_kv_dtype(tmp_path, fake, capsys):
    full = prof.load_or_measure(device="cpu", dtype=torch.bfloat16, cache_dir=tmp_path, progress=False)
    config = dataclasses.replace(SPILLS, kv_dtype=torch.bfloat16)  # pages cost bf16: the bf16 profile
    assert prof.profile_for(config, progress=True, cache_dir=tmp_path).profile == full
    assert fake.quick_flags == [False] and capsys.readouterr().err == ""


def test_profile_for_defaults_to_offload_cache(tmp_path, monkeypatch, fake):
    monkeypatch.setenv("OFFLOAD_CACHE", str(tmp_path / "home"))
    prof.profile_for(SPILLS, progress=False)
    assert store.load_saved(device="cpu", dtype=torch.float32) is not None


def test_profile_for_goes_on_without_a_profile_when_measuring_fails(tmp_path, monkeypatch, capsys):
    def no_room(**kwargs: object) -> HardwareProfile:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(prof, "measure_profile", no_room)
    assert prof.profile_for(SPILLS, progress=False, cache_dir=tmp_path) is SPILLS
    err = capsys.readouterr().err.splitlines()
    assert err[0] == prof.MEASURE_NOTICE and "No space left on device" in err[1] and "preset" in err[1]


# ----- command line -------------------------------------------------------------------------------------
def test_main_quick_json_then_table_from_the_saved_file(tmp_path, capsys):
    assert prof.main(["--quick", "--json", "--device", "cpu", "--cache-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    profile = HardwareProfile.from_json(captured.out)
    assert store.is_quick(profile)
    assert "[1/9] memory copies" in captured.err  # progress goes to stderr, JSON alone to stdout
    assert prof.main(["--quick", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert "saved earlier" in captured.out and str(store.profile_path(tmp_path, "cpu")) in captured.out
    for row in ("disk read 64 KiB", "disk read 4 MiB", "CPU attention", "CPU 4-bit attention", "layer overhead",
                "device is host"):
        assert row in captured.out


def test_main_table_of_a_fresh_measurement_has_the_probe_details(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(prof, "_QUICK", dataclasses.replace(prof._QUICK, disk_file_bytes=8 * MiB,
                                                            disk_read_bytes=8 * MiB))
    monkeypatch.setattr(prof.psutil, "cpu_percent", lambda interval: 97.0)  # others keep the CPUs busy
    assert prof.main(["--quick", "--quiet", "--device", "cpu", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "measured in" in out and "disk read 1 MiB QD1" in out
    assert "note: the CPUs were 97% busy" in out
    assert re.search(r"disk read 64 KiB +[0-9.]+ GB/s \((o_direct|fadvise_dontneed), 4 threads\)", out)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("offload: error: ")
    return err


@pytest.mark.parametrize("dtype", BAD_DTYPES)
def test_main_refuses_a_bad_dtype(tmp_path, capsys, dtype):
    assert prof.main(["--quick", "--dtype", dtype, "--cache-dir", str(tmp_path)]) == 2
    assert f"unknown dtype {dtype!r}" in _one_error_line(capsys)
    assert not (tmp_path / "profiles").exists()


@pytest.mark.parametrize("device", BAD_DEVICES)
def test_main_refuses_a_bad_device(tmp_path, capsys, device):
    assert prof.main(["--quick", "--device", device, "--cache-dir", str(tmp_path)]) == 2
    assert device in _one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_main_refuses_cuda_without_a_gpu(tmp_path, capsys):
    assert prof.main(["--quick", "--device", "cuda", "--cache-dir", str(tmp_path)]) == 2
    assert "CUDA is not available" in _one_error_line(capsys)


def test_main_refuses_an_unwritable_cache_dir(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert prof.main(["--quick", "--cache-dir", str(blocker / "cache")]) == 2
    assert "not writable" in _one_error_line(capsys)


# ----- GPU ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_quick_profile_on_cuda(tmp_path):
    details: dict = {}
    profile = prof.measure_profile(device="cuda", cache_dir=tmp_path, quick=True, progress=False, details=details)
    assert not profile.device_is_host
    assert set(details["pinned_by_size"]) == set(prof.H2D_SIZES)
    assert profile.host_to_device_pinned_gbps == details["pinned_by_size"][prof.H2D_SIZES[-1]]
    assert 1 <= profile.host_to_device_pinned_gbps <= 500
    assert profile.device_attention_gbps > profile.cpu_attention_gbps
    assert profile.device_matmul_tflops > profile.cpu_matmul_tflops
    assert 1e-6 <= profile.layer_overhead_s <= 0.1
    assert 0 < profile.device_free_bytes <= torch.cuda.get_device_properties(0).total_memory
    assert list((tmp_path / "kv").iterdir()) == []
