"""`offload plan`: plans for a GPU made on this machine, JSON that adds up, named infeasibility,
what-if exploration, bad input."""
from __future__ import annotations

import json

import pytest

from offload.commands.cli import main
from planner import HardwareProfile

GiB = 2**30
LLAMA = ["plan", "--model", "llama-3.1-8b", "--context", "131072"]


def test_llama_8b_128k_plan_adds_up(capsys):
    assert main(LLAMA + ["--device-memory", "24GiB", "--host-memory", "64GiB", "--preset", "rtx4090-pcie4",
                         "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p = out["plan"]
    assert p["kv_bytes"] == 16 * GiB  # 32 layers x 8 KV heads x 128 x 2 x bf16 x 131072 tokens
    assert sum(p["tier_bytes"].values()) == p["kv_bytes"]
    assert p["tier_bytes"]["device"] > 0 and p["tier_bytes"]["host"] > 0
    assert p["recompute_share"] == 0 and p["sparse_budget"] == 1  # executable: no what-if features
    assert out["profile"] == "rtx4090-pcie4"


def test_too_small_budgets_exit_2_naming_the_constraint(capsys):
    code = main(LLAMA + ["--device-memory", "1GiB", "--host-memory", "1GiB", "--disk-space", "1GiB",
                         "--preset", "rtx4090-pcie4", "--json"])
    captured = capsys.readouterr()
    assert code == 2
    assert "weights 15.0 GiB" in captured.err and "0.8 x 1.0 GiB device" in captured.err
    assert captured.err.startswith("offload: error: no placement fits the budgets")
    violations = json.loads(captured.out)["violations"]
    assert any(v.startswith("KV cache 16.0 GiB") for v in violations)


def test_cpu_profile_defaults_to_fp32_and_the_refusal_suggests_bf16(capsys):
    """On a CPU-only profile the default dtype is fp32: an 8B model's 29.9 GiB of weights
    do not fit 24 GiB, and the error says --dtype bf16 would halve them; with it, it plans."""
    args = LLAMA + ["--device-memory", "24GiB", "--host-memory", "64GiB", "--preset", "cpu-2core"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "weights 29.9 GiB" in err and "--dtype bf16 halves them to 15.0 GiB" in err
    assert main(args + ["--dtype", "bf16", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["plan"]
    assert sum(p["tier_bytes"].values()) == p["kv_bytes"] == 16 * GiB


def test_text_output_with_the_greedy_baseline(capsys):
    assert main(LLAMA + ["--device-memory", "24GiB", "--host-memory", "64GiB", "--preset", "h100-pcie5",
                         "--greedy"]) == 0
    out = capsys.readouterr().out
    for words in ("Plan (lp)", "Plan (greedy)", "Predicted decode step", "bottleneck", "Greedy step / LP step"):
        assert words in out


def test_a_sparse_budget_is_priced(capsys):
    base = LLAMA + ["--device-memory", "24GiB", "--host-memory", "64GiB", "--preset", "rtx4090-pcie4", "--json"]
    assert main(base + ["--sparse", "quest", "--sparse-budget", "0.25"]) == 0
    sparse = json.loads(capsys.readouterr().out)["plan"]
    assert main(base) == 0
    exact = json.loads(capsys.readouterr().out)["plan"]
    assert sparse["sparse_budget"] == 0.25 and sparse["decode_step_s"] < exact["decode_step_s"]
    # Quest reads its live pool ahead (more moved than attended) and holds key bounds on DEVICE.
    assert 1 < sparse["sparse_fetch"] <= 1.5 and exact["sparse_fetch"] == 1.0
    assert sparse["metadata_bytes"] > 0 and exact["metadata_bytes"] == 0
    # --sparse-fraction is the old name of --sparse-budget, still taken with --what-if.
    assert main(base + ["--what-if", "--sparse-fraction", "0.25"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["sparse_budget"] == 0.25
    assert main(base + ["--sparse", "quest"]) == 0  # the mode's default F
    assert json.loads(capsys.readouterr().out)["plan"]["sparse_budget"] == 0.1
    assert main(base + ["--sparse-fraction", "0.25"]) == 2
    assert "add --sparse quest" in capsys.readouterr().err


def test_4bit_pages_are_priced_as_stored(capsys):
    """--kv-format 4bit: the placed pages are Llama-3.1-8B's 4-bit pages (8 KV heads x 32 tokens
    x 128 channels: codes 32 KiB, key scales and mins 4 KiB, value scales and mins 4 KiB), 40 KiB
    against a bf16 page's 128 KiB, so a 128K context's KV is 5/16 of it and the step faster."""
    base = LLAMA + ["--device-memory", "24GiB", "--host-memory", "64GiB", "--preset", "rtx4090-pcie4", "--json"]
    assert main(base + ["--kv-format", "4bit"]) == 0
    packed = json.loads(capsys.readouterr().out)["plan"]
    assert main(base) == 0
    exact = json.loads(capsys.readouterr().out)["plan"]
    assert exact["kv_bytes"] == 16 * GiB and packed["kv_bytes"] == 16 * GiB * 40960 // 131072
    assert packed["decode_step_s"] < exact["decode_step_s"]
    assert main(base[:-1] + ["--kv-format", "4bit"]) == 0
    head = capsys.readouterr().out.splitlines()[0]
    # The preset has no 4-bit rate: a 4-bit page is priced as the exact page's attention.
    assert "(40960-byte 4-bit pages, 0.312 of exact; 4-bit attention device 265.6 GB/s (unmeasured: as exact)" in head
    assert main(base + ["--kv-format", "int4"]) == 2


def test_profile_file_and_bad_input(capsys, tmp_path):
    saved = tmp_path / "p.json"
    saved.write_text(HardwareProfile.preset("h100-sxm").to_json())
    assert main(LLAMA + ["--profile", str(saved), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["profile"] == "h100-sxm"
    for argv, words in [(["--preset", "tpu-v9"], "unknown hardware preset"),
                        (["--profile", str(tmp_path / "missing.json")], "cannot read the profile"),
                        (["--preset", "h100-sxm", "--device-memory", "lots"], "size"),
                        (["--preset", "h100-sxm", "--dtype", "fp8"], "dtype")]:
        assert main(LLAMA + argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("offload: error:") and words in err, (argv, err)
    assert main(["plan", "--model", "llama-3.1-8b", "--context", "0", "--preset", "h100-sxm"]) == 2
    assert "--context" in capsys.readouterr().err
    assert main(["plan", "--model", "no-such-model", "--context", "10", "--preset", "h100-sxm"]) == 2
    assert "unknown model" in capsys.readouterr().err


@pytest.mark.parametrize("model,preset", [("smollm2-135m", "cpu-2core"), ("qwen2.5-7b", "rtx4090-pcie4")])
def test_plans_for_other_shapes(capsys, model, preset):
    assert main(["plan", "--model", model, "--context", "8192", "--preset", preset, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["plan"]
    assert sum(p["tier_bytes"].values()) == p["kv_bytes"] > 0


def test_plan_shows_what_lsh_holds_and_samples(capsys):
    """SmolLM2 at 8K: 30 layers x 3 KV heads x 150 tables x 2-byte ids per token; 256 pages at
    F = 0.1 leave 25.6 pages, of which sink, window and tail take 4: 691 rows."""
    assert main(["plan", "--model", "smollm2-135m", "--context", "8192", "--sparse", "lsh", "--sparse-budget", "0.1",
                 "--preset", "cpu-2core"]) == 0
    out = capsys.readouterr().out
    assert "lsh: K=10 bits x L=150 tables" in out
    assert f"tables {30 * 3 * 150 * 2 * 8192 / 2**20:.1f} MiB" in out and "samples at most 691 rows" in out
