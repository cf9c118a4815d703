"""`offload plan`: plans for a GPU made on this machine, JSON that adds up, named infeasibility,
what-if exploration, bad input."""
from __future__ import annotations

import json

import pytest

from offload.commands.cli import main
from planner import HardwareProfile
from planner.recompute import ENGINE_NOTE

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


LLAMA_2 = ["plan", "--model", "llama-2-7b", "--context", "32768", "--allow-long-context", "--preset", "rtx4090-pcie4"]


@pytest.mark.parametrize("mode", ["auto", "kvpr"])
def test_mha_llama_2_recomputes_a_share_and_says_why(capsys, mode):
    """Llama-2-7B (MHA) at 32K: 16 GiB of KV (512 KiB per token) beside 12.6 GiB of weights
    on the 22 GiB card, so most pages live on HOST; KVPR ships 8 KiB of activations per token
    and layer instead of 16 KiB of K/V, and the plan is faster than --recompute none's."""
    assert main(LLAMA_2 + ["--recompute", mode, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    p, why = out["plan"], out["recompute"]
    assert p["kv_bytes"] == 16 * GiB and p["tier_bytes"]["host"] > p["tier_bytes"]["device"]
    assert why["mode"] == mode and why["share"] == p["recompute_share"] > 0.1 and why["executed"] is True
    assert (why["activation_token_bytes"], why["kv_token_bytes"]) == (8192, 16384)
    assert why["saved_bytes_per_step"] == sum(p["recomputed_pages"]) * 32 * 8192
    assert main(LLAMA_2 + ["--json"]) == 0  # --recompute none, the default
    none = json.loads(capsys.readouterr().out)
    assert none["plan"]["recompute_share"] == 0 and none["recompute"]["mode"] == "none"
    assert why["step_without_s"] == pytest.approx(none["plan"]["decode_step_s"], rel=1e-9)
    assert p["decode_step_s"] < none["plan"]["decode_step_s"]
    assert main(LLAMA_2 + ["--recompute", mode]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("Recompute")]
    assert line == [f"Recompute ({mode}): {why['reason']} {ENGINE_NOTE}"]
    assert why["reason"].startswith(f"share {why['share']:.1%} of pages")
    assert f"{why['saved_bytes_per_step'] / GiB:.2f} GiB less crosses the host link per decode step" in why["reason"]


def test_recompute_none_pins_zero_and_what_if_means_auto(capsys):
    assert main(LLAMA_2 + ["--recompute", "none"]) == 0
    out = capsys.readouterr().out
    assert "kept as activations and recomputed: 0.0% of all pages" in out
    assert "Recompute (none): share 0, pinned by --recompute none; the shipped activations (hidden_size 4096 " \
           "values, 8192 bytes per token and layer) are fewer than the K/V bytes (2 x 32 KV heads x 128 head_dim " \
           "= 8192 values, 16384 bytes per token and layer); 1 query head per KV head (--recompute kvpr lets the " \
           "planner price it)\n" in out
    assert "recompute not allowed (marginal value" in out
    assert main(LLAMA_2 + ["--what-if", "--json"]) == 0
    why = json.loads(capsys.readouterr().out)["recompute"]
    assert why["mode"] == "auto" and why["share"] > 0
    assert main(LLAMA_2 + ["--what-if", "--recompute", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recompute"]["share"] == 0
    assert main(LLAMA_2 + ["--recompute", "always"]) == 2
    assert "--recompute: invalid choice" in capsys.readouterr().err


def test_recompute_lowrank_is_not_priced(capsys):
    assert main(LLAMA_2 + ["--recompute", "lowrank", "--json"]) == 0
    lowrank = json.loads(capsys.readouterr().out)
    assert main(LLAMA_2 + ["--json"]) == 0
    none = json.loads(capsys.readouterr().out)
    assert lowrank["recompute"]["share"] == 0 and lowrank["plan"] == none["plan"]  # no LP change
    assert main(LLAMA_2 + ["--recompute", "lowrank"]) == 0
    assert ("Recompute (lowrank): low-rank keys are not priced by the planner yet: share 0, the plan is the one "
            "without recompute\n") in capsys.readouterr().out


def _gqa_shapes(*, activations_smaller: bool) -> list[str]:
    """Named shapes with 2 or more query heads per KV head, by whether hidden_size (the values
    KVPR ships per token) is below the K/V's 2 x KV heads x head_dim."""
    from offload.model.shapes import NAMED_SHAPES

    return [name for name, c in NAMED_SHAPES.items() if c["num_attention_heads"] >= 2 * c["num_key_value_heads"]
            and (c["hidden_size"] < 2 * c["num_key_value_heads"] * c["head_dim"]) == activations_smaller]


@pytest.mark.parametrize("model", _gqa_shapes(activations_smaller=False))
def test_gqa_shapes_get_zero_with_the_reason(capsys, model):
    """Every GQA named shape whose activations are at least its K/V gets share 0 with both
    numbers, with HOST pages in the plan."""
    from offload.model.shapes import NAMED_SHAPES

    c = NAMED_SHAPES[model]
    kv_values = 2 * c["num_key_value_heads"] * c["head_dim"]
    assert main(["plan", "--model", model, "--context", "32768", "--allow-long-context", "--preset", "rtx4090-pcie4",
                 "--recompute", "auto", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["tier_bytes"]["host"] > 0 and out["plan"]["recompute_share"] == 0
    why = out["recompute"]
    assert why["share"] == 0 and (why["activation_token_bytes"], why["kv_token_bytes"]) == (2 * c["hidden_size"],
                                                                                            2 * kv_values)
    group = c["num_attention_heads"] // c["num_key_value_heads"]
    assert why["reason"] == (
        f"share 0: the shipped activations (hidden_size {c['hidden_size']} values, {2 * c['hidden_size']} bytes per "
        f"token and layer) are at least the K/V bytes (2 x {c['num_key_value_heads']} KV heads x {c['head_dim']} "
        f"head_dim = {kv_values} values, {2 * kv_values} bytes per token and layer); {group} query heads per KV "
        "head: KVPR would move more bytes, not fewer")


def test_gemma3_12b_is_gqa_with_smaller_activations(capsys):
    """The test is bytes, not the group size: Gemma 3 12B has 2 query heads per KV head, but
    hidden 3840 < 2 x 8 x 256 = 4096, so KVPR ships 7680 instead of 8192 bytes per token and
    layer. On an H100 with 30 GiB for the run (21.9 GiB of weights) most of a 128K context's
    global-layer pages live on HOST, and the LP keeps a share of them as activations."""
    assert _gqa_shapes(activations_smaller=True) == ["gemma3-12b"]
    assert main(["plan", "--model", "gemma3-12b", "--context", "131072", "--preset", "h100-pcie5", "--device-memory",
                 "30GiB", "--recompute", "auto", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    why = out["recompute"]
    assert (why["activation_token_bytes"], why["kv_token_bytes"]) == (7680, 8192)
    assert why["share"] > 0 and why["saved_bytes_per_step"] == sum(out["plan"]["recomputed_pages"]) * 32 * 512
    assert why["step_without_s"] > out["plan"]["decode_step_s"]


@pytest.mark.parametrize("context", [32768, 131072])
def test_plan_states_the_doc_cache_restore_split_on_a_gpu(capsys, context):
    """h100-pcie5: NVMe reads at 7 GB/s and bf16 prefill at half of 756 TFLOP/s meet inside
    the document: a prefix is recomputed while the rest loads, faster than either alone."""
    assert main(["plan", "--model", "llama-3.1-8b", "--context", str(context), "--preset", "h100-pcie5",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["restore"]
    assert 0 < r["tokens"] < context and r["tokens"] % 1024 == 0 and not r["forced"]
    assert r["predicted_s"] < min(r["load_only_s"], r["recompute_only_s"])
    # Llama-3.1-8B's DocCache holds 128 KiB per token in bf16, read at 7 GB/s
    assert r["load_only_s"] == pytest.approx(context * 128 * 1024 / 7e9, rel=0.01)
    assert main(["plan", "--model", "llama-3.1-8b", "--context", str(context), "--preset", "h100-pcie5"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if x.startswith("DocCache restore")][0]
    assert f"recompute the first {r['tokens']} tokens" in line and "while the rest loads" in line


def test_plan_loads_every_page_on_the_cpu_preset(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--context", "8192", "--preset", "cpu-2core", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)["restore"]
    assert r["tokens"] == 0 and r["recompute_only_s"] > 20 * r["load_only_s"]
