"""The DISK tier's files never outlive their run: removed at close, on SIGTERM (a clean exit,
status 143), and after SIGKILL by the next engine start or `offload cache gc`.

The subprocess cases (a spilling `offload generate` killed mid-answer) are ``slow``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offload.commands.cli import main
from offload.config import RuntimeConfig
from offload.engine import Engine
from offload.model.model_source import resolve_model
from planner.profile import HardwareProfile
from storage.run_dirs import LOCK_NAME, remove_dead_run_dirs
from tests.conftest import TEST_PROFILE, save_test_profile

ROOT = Path(__file__).resolve().parents[2]


def _spilling_engine(kv: Path) -> Engine:
    """A one-layer random-weight SmolLM2 engine whose 1 MiB DEVICE arena makes a DISK tier."""
    source = resolve_model("smollm2-135m", cache_dir=kv.parent, random_weights=True, num_layers=1,
                           show_progress=False)
    return Engine(source, RuntimeConfig(device="cpu", device_memory_bytes=2**20, kv_dir=str(kv),
                                        disk_backend="posix", profile=HardwareProfile.preset(TEST_PROFILE)))


def _dead_run(kv: Path) -> Path:
    """What SIGKILL leaves: a run directory with files and an unlocked lock file (pid 1 lives:
    the lock, not the pid, says the run is over)."""
    d = kv / "run-1-deadbeef"
    d.mkdir(parents=True)
    (d / LOCK_NAME).touch()
    (d / "layer_000.kv").write_bytes(bytes(65536))
    return d


def test_an_engine_start_removes_dead_runs_files_and_its_own_at_close(tmp_path):
    kv = tmp_path / "kv"
    dead = _dead_run(kv)
    engine = _spilling_engine(kv)
    try:
        assert engine.disk is not None and not dead.exists()
        own = engine.disk.root
        assert own.parent == kv and own.name.startswith(f"run-{os.getpid()}-")
        assert remove_dead_run_dirs(kv) == [] and own.is_dir()  # a live run: another start keeps it
    finally:
        engine.close()
    assert list(kv.iterdir()) == []


# ----- subprocesses ----------------------------------------------------------------------------
def _start_generate(cache: Path, name: str) -> subprocess.Popen:
    """`offload generate` of 5000 prompt tokens (314 pages) spilling past an 8 MiB DEVICE arena
    (170 pages), then a long answer (it runs until killed: 2000 tokens take minutes here); its
    stderr goes to ``cache/<name>.err``."""
    prompt = cache / "prompt.txt"
    if not prompt.exists():
        prompt.write_text("x" * 5000)
    argv = [sys.executable, "-m", "offload", "generate", "--prompt-file", str(prompt), "--model", "smollm2-135m",
            "--random-weights", "--num-layers", "2", "--max-new-tokens", "2000", "--ignore-eos", "--quiet",
            "--cache-dir", str(cache), "--device-memory", "8MiB", "--device", "cpu", "--disk-backend", "posix"]
    with open(cache / f"{name}.err", "w") as err:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_until_spilled(proc: subprocess.Popen, kv: Path, timeout_s: float = 180.0) -> Path:
    """The run directory of ``proc`` once a layer file holds pages (the prompt has spilled)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it spilled (status {proc.returncode})"
        for d in kv.glob(f"run-{proc.pid}-*"):
            try:
                if any(f.stat().st_size > 0 for f in d.glob("layer_*.kv")):
                    return d
            except FileNotFoundError:
                pass
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no spilled run directory of pid {proc.pid} under {kv} after {timeout_s} s")


@pytest.mark.slow  # a fresh interpreter loads torch; killed mid-answer
def test_sigterm_mid_answer_exits_cleanly_and_removes_the_runs_files(tmp_path):
    save_test_profile(tmp_path)
    proc = _start_generate(tmp_path, "gen")
    run_dir = _wait_until_spilled(proc, tmp_path / "kv")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    err = (tmp_path / "gen.err").read_text()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "offload: terminated"
    assert not run_dir.exists() and not list((tmp_path / "kv").glob("run-*"))


@pytest.mark.slow  # two fresh interpreters, killed
def test_sigkill_leftovers_go_at_the_next_gc_or_engine_start_and_a_live_run_stays(tmp_path, capsys):
    save_test_profile(tmp_path)
    kv = tmp_path / "kv"
    live, killed = _start_generate(tmp_path, "live"), _start_generate(tmp_path, "killed")
    try:
        live_dir, killed_dir = _wait_until_spilled(live, kv), _wait_until_spilled(killed, kv)
        killed.kill()
        assert killed.wait(timeout=60) == -signal.SIGKILL and killed_dir.is_dir()  # nothing ran to clean up
        assert main(["cache", "gc", "--cache-dir", str(tmp_path)]) == 0
        assert "1 DISK-tier directories" in capsys.readouterr().out
        assert not killed_dir.exists() and live_dir.is_dir() and live.poll() is None  # the live run goes on
        live.kill()
        assert live.wait(timeout=60) == -signal.SIGKILL and live_dir.is_dir()
    finally:
        for p in (live, killed):
            p.kill()
            p.wait()
    engine = _spilling_engine(kv)  # the next start removes what the second kill left
    try:
        assert not live_dir.exists()
    finally:
        engine.close()
    assert not list(kv.glob("run-*"))
