"""`offload bench` runs end to end at a small size and prints every configuration (speed targets
live in its output, never in tests)."""
from __future__ import annotations

import json

import pytest

from offload.commands.cli import main


@pytest.mark.slow  # every configuration three times, plus reads beside compute: about a minute
def test_bench_small_run_prints_every_configuration(capsys, smollm2_source, cache_dir, tmp_path):
    out_json = tmp_path / "bench.json"
    assert main(["bench", "--tokens", "200", "--decode-tokens", "2", "--reps", "3", "--no-hf", "--quiet",
                 "--cache-dir", str(cache_dir), "--json-out", str(out_json)]) == 0
    out = capsys.readouterr().out
    for row in ("all-DEVICE", "HOST spill", "DISK spill", "split, pipelined", "split, --no-overlap",
                "cold read bandwidth", "overlap: pipelined / serial", "disk bound",
                "reads beside compute", "where the time goes", "memory-read roofline", "prefill layer"):
        assert row in out
    blob = json.loads(out_json.read_text())
    pieces = blob["breakdown"]["decode"]["pieces_s"]
    assert pieces["attention kernel: pages in RAM (Numba)"] > 0 and pieces["MLP (norm, gate/up, down)"] > 0
    assert blob["breakdown"]["prefill"]["layer_pieces_s"]["attention (prefill)"] > 0
    assert 0 < blob["breakdown"]["roofline_fraction"]
    beside = blob["beside"]  # CPU-only run: measured
    assert len(beside["step_s"]) == 3 and all(s > 0 for s in beside["step_s"]) and beside["read_gbps"] > 0


def test_host_spill_budget_holds_the_staging_area():
    """The HOST-spill row's budget holds the DISK staging area beside the pages: 4 buffers of 64
    pages plus 8 MiB of writes, 136 MiB for Llama-2-7B's 512 KiB bf16 pages (MHA: 32 KV heads),
    which the old flat 64 MiB did not; small pages keep the 64 MiB."""
    import torch

    from offload.commands.bench import _host_extra
    from offload.model.model_source import config_from_hf
    from offload.model.shapes import NAMED_SHAPES

    llama2 = config_from_hf(NAMED_SHAPES["llama-2-7b"]).with_num_layers(1)
    assert _host_extra(llama2, torch.bfloat16) == (4 * 64 * 512 + 8 * 1024 + 16 * 1024) * 1024
    assert _host_extra(config_from_hf(NAMED_SHAPES["smollm2-135m"]), torch.float32) == 64 * 2**20


def test_bench_refuses_no_repetition(capsys):
    assert main(["bench", "--reps", "0"]) == 2
    assert "--reps must be >= 1" in capsys.readouterr().err


def test_one_repetition_is_a_smoke_run_whose_spreads_are_na(capsys, cache_dir):
    assert main(["bench", "--model", "smollm2-135m", "--random-weights", "--num-layers", "2", "--tokens", "256",
                 "--decode-tokens", "2", "--reps", "1", "--no-hf", "--quiet", "--cache-dir", str(cache_dir)]) == 0
    out = capsys.readouterr().out
    assert "1 repetitions each (a smoke run: no spread, nothing to quote)" in out
    rows = [line for line in out.splitlines() if line.startswith(("all-DEVICE", "DISK spill", "HOST spill"))]
    assert len(rows) >= 3 and all(line.count("[n/a]") == 2 for line in rows)  # prefill and decode tok/s
    assert "[n/a] (alone" in out  # the all-DEVICE step beside the reads (CPU-only)


@pytest.mark.slow  # eight configurations of a 2-layer random model: about 30 s
def test_bench_runs_several_sparse_modes_and_compares_speculative_with_quest(capsys, cache_dir):
    assert main(["bench", "--model", "smollm2-135m", "--random-weights", "--num-layers", "2", "--tokens", "2048",
                 "--decode-tokens", "3", "--reps", "3", "--no-hf", "--quiet", "--cache-dir", str(cache_dir),
                 "--sparse", "quest", "speculative", "--sparse-budget", "0.3"]) == 0
    out = capsys.readouterr().out
    for line in ("DISK spill, quest", "DISK spill, speculative", "sparse (quest, F=0.3)",
                 "sparse (speculative, F=0.3)", "speculation_hit_rate", "speculative against quest: fetch wait"):
        assert line in out
    assert "fallback" not in out
