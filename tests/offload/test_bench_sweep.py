"""`offload bench --contexts ... --modes ... --placements ... --out DIR` (the sweep) and
`offload bench --render DIR/results.json`: flags checked first, every row and peer in the JSON,
report.md and the plots written, and rebuilt byte for byte from the JSON alone without torch.
Speed targets live in the bench's output, never here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from offload.commands.cli import main
from offload.commands.sweep_args import parse_contexts, parse_modes
from offload.errors import InputError

ROOT = Path(__file__).resolve().parents[2]
PLOTS = ("decode_tok_s.png", "bytes_per_token.png", "prefill_tok_s.png", "ttft.png")


def test_contexts_take_k_suffixes_and_plain_counts():
    assert parse_contexts("2K,8K,32K") == [2048, 8192, 32768]
    assert parse_contexts(" 4096, 1k,4096") == [4096, 1024]
    for bad, says in (("2Q", "'2Q' is not a context"), ("0", "positive"), (",", "empty")):
        with pytest.raises(InputError, match=says):
            parse_contexts(bad)
    assert parse_modes("exact,4bit+quest,exact") == ["exact", "4bit+quest"]
    with pytest.raises(InputError, match="fast is not one of exact, quest"):
        parse_modes("exact,fast")


@pytest.mark.parametrize("argv, says", [
    (["--contexts", "2Q"], "--contexts: '2Q' is not a context"),
    (["--modes", "exact,fast"], "--modes: fast is not one of"),
    (["--placements", "gpu"], "--placements: gpu is not one of device, host, disk"),
    (["--sparse-budget", "0.2"], "--sparse-budget applies to a sparse mode"),
    (["--modes", "quest", "--sparse-budget", "1.5"], "--sparse-budget must be a number in (0, 1]"),
    (["--reps", "0"], "--reps must be >= 1"),
    (["--tokens", "512", "--contexts", "2K"], "--contexts belongs to the sweep"),
    (["--no-peers", "ollama"], "--no-peers: ollama is not one of"),
    (["--fidelity", "/nonexistent/fidelity.json"], "--fidelity"),
])
def test_sweep_flags_are_checked_before_a_model_loads(argv, says, capsys, tmp_path):
    assert main(["bench", *argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "cache" / "models").exists() and not (tmp_path / "out").exists()


def test_a_context_beyond_the_window_needs_allow_long_context(capsys, tmp_path):
    argv = ["bench", "--model", "smollm2-135m", "--random-weights", "--num-layers", "1", "--contexts", "16K",
            "--cache-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--quiet"]
    assert main(argv) == 2
    assert "beyond smollm2-135m's context window of 8192; add --allow-long-context" in capsys.readouterr().err


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    """A smoke sweep of a 1-layer random SmolLM2 shape: exact and quest, DEVICE and DISK."""
    out = tmp_path_factory.mktemp("sweep")
    argv = ["bench", "--model", "smollm2-135m", "--random-weights", "--num-layers", "1", "--contexts", "256",
            "--modes", "exact,quest", "--sparse-budget", "0.5", "--decode-tokens", "2", "--reps", "1", "--quiet",
            "--cache-dir", str(tmp_path_factory.mktemp("cache")), "--out", str(out / "run")]
    assert main(argv) == 0
    return out / "run"


def test_the_sweep_stores_every_row_and_peer_with_machine_and_config(small_sweep):
    blob = json.loads((small_sweep / "results.json").read_text())
    assert blob["schema_version"] == 1 and blob["kind"] == "offload-bench"
    assert blob["machine"]["cores"] >= 1 and "torch" in blob["versions"]
    assert blob["config"]["contexts"] == [256] and blob["config"]["modes"] == ["exact", "quest"]
    assert [c["tokens"] for c in blob["contexts"]] == [256]
    for ctx in blob["contexts"]:
        assert ctx["doc_tokens"] + ctx["question_tokens"] + 2 == ctx["tokens"]
        (prefill,) = ctx["prefill"]  # one prefill for both modes and placements: one page format
        assert prefill["kv_format"] == "exact" and len(prefill["prefill_s"]) == 1 and prefill["doc_cache_bytes"] > 0
        rows = {(r["mode"], r["placement"]): r for r in ctx["rows"]}
        assert set(rows) == {("exact", "device"), ("quest", "device"), ("exact", "disk"), ("quest", "disk")}
        for r in rows.values():
            assert len(r["decode_s_per_token"]) == 1 and len(r["ttft_hit_s"]) == 1 and len(r["tokens"]) >= 3
        assert rows[("exact", "disk")]["bytes_per_token"]["disk"] > 0 and rows[("exact", "disk")]["read_gbps"]
        assert rows[("exact", "device")]["bytes_per_token"].get("disk", 0) == 0
        sp = rows[("quest", "disk")]["sparse_stats"]  # within F, or saying why it read every page (a short context)
        assert sp["kv_fraction_read_max"] <= 0.5 + 1e-9 or sp["sparse_fallback"]
        # every peer is there, each saying why it did not run (random weights: no checkpoint)
        peers = {p["name"]: p for p in ctx["peers"]}
        assert {"transformers DynamicCache", "transformers StaticCache", "llama.cpp", "vLLM (CPU)"} <= set(peers)
        assert all(not p["measured"] and "random weights" in p["reason"] for p in peers.values())


def test_the_report_and_plots_are_written_and_a_smoke_run_says_so(small_sweep):
    report = (small_sweep / "report.md").read_text()
    assert "A smoke run (one repetition)" in report and "[n/a]" in report
    assert "## 256 tokens" in report
    assert "| quest | disk |" in report and "disk bound tok/s" in report
    assert "peer llama.cpp: not run: random weights" in report
    for name in PLOTS:
        data = (small_sweep / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"]({name})" in report


def test_render_rebuilds_the_same_files_from_the_json_alone_without_torch(small_sweep):
    before = {name: (small_sweep / name).read_bytes() for name in ("report.md", *PLOTS)}
    for name in before:
        (small_sweep / name).unlink()
    code = ("import sys; from offload.commands.entry import main; rc = main(sys.argv[1:]); "
            "assert 'torch' not in sys.modules, 'render imported torch'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "bench", "--render", str(small_sweep / "results.json")],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for name, data in before.items():
        assert (small_sweep / name).read_bytes() == data, name


@pytest.mark.parametrize("content, says", [
    ("not json", "is not JSON"),
    ('{"schema_version": 1}', "is not an `offload bench --out` results.json"),
    ('{"kind": "offload-bench", "schema_version": 99}', "has schema_version 99"),
    ('{"kind": "offload-bench", "schema_version": 1}', "lacks \"contexts\""),
])
def test_render_refuses_a_bad_or_foreign_json_in_one_line(content, says, tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text(content)
    assert main(["bench", "--render", str(path)]) == 2
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1
    assert not (tmp_path / "report.md").exists()


def test_a_subprocess_peer_that_is_missing_or_fails_says_why(tmp_path, monkeypatch):
    """The peers' venvs and runners are looked up beside the project; here in a scratch root."""
    import types

    import torch

    from offload.commands import bench_peers

    monkeypatch.setattr(bench_peers, "ROOT", tmp_path)
    source = types.SimpleNamespace(weights_dir=tmp_path / "ckpt", config=None)
    plan = types.SimpleNamespace(source=source, model=str(tmp_path / "m.gguf"), device=torch.device("cpu"),
                                 dtype=torch.float32, decode=2, reps=1)
    args = types.SimpleNamespace(no_peers=["transformers"], peers_all_contexts=False)
    declared = {p["name"]: p for p in bench_peers.Peers(plan, args, tmp_path).declared()}
    assert "runner bench/peers/llamacpp_peer.py is not here" in declared["llama.cpp"]["reason"]
    assert declared["transformers DynamicCache"]["reason"] == "left out by --no-peers"
    (tmp_path / "bench" / "peers").mkdir(parents=True)
    (tmp_path / "bench" / "peers" / "llamacpp_peer.py").write_text(
        "import sys\nsys.exit('llama_cpp: cannot open the model file')\n")
    declared = {p["name"]: p for p in bench_peers.Peers(plan, args, tmp_path).declared()}
    assert declared["llama.cpp"]["reason"] == ("not installed: `make peer-llamacpp` builds its own venv in "
                                               ".peers/llamacpp")
    venv_bin = tmp_path / ".peers" / "llamacpp" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    peers = bench_peers.Peers(plan, args, tmp_path)
    (llama,) = [p for p in peers.declared() if p["name"] == "llama.cpp"]
    assert llama["available"] and llama["label"].startswith("GGUF weights as shipped")
    got = peers.run_subprocess(llama, [1, 2, 3])
    assert not got["measured"] and got["reason"] == "failed (exit 1): llama_cpp: cannot open the model file"


@pytest.mark.slow  # SmolLM2 with its weights and transformers: about a minute
def test_transformers_peers_give_exact_modes_greedy_tokens(tmp_path, cache_dir):
    out = tmp_path / "run"
    assert main(["bench", "--model", "smollm2-135m", "--contexts", "600", "--modes", "exact", "--placements",
                 "device", "--decode-tokens", "4", "--reps", "3", "--no-peers", "llamacpp,vllm", "--quiet",
                 "--cache-dir", str(cache_dir), "--out", str(out)]) == 0
    (ctx,) = json.loads((out / "results.json").read_text())["contexts"]
    hf = [p for p in ctx["peers"] if p["name"] in ("transformers DynamicCache", "transformers StaticCache")]
    assert len(hf) == 2 and all(p["measured"] and p["same_tokens"] is True for p in hf)
    assert all(len(p["decode_s_per_token"]) == 3 for p in hf)
    assert "| transformers StaticCache |" in (out / "report.md").read_text()


@pytest.mark.slow  # writes 8K tokens of random K/V for a 2-layer Llama-3.1-8B shape: about half a minute
def test_synthetic_kv_stands_in_for_a_prefill_of_a_random_shape(tmp_path):
    out = tmp_path / "run"
    assert main(["bench", "--model", "llama-3.1-8b", "--random-weights", "--num-layers", "2", "--dtype", "bf16",
                 "--synthetic-kv", "--contexts", "8K", "--modes", "exact,quest", "--placements", "disk",
                 "--decode-tokens", "2", "--reps", "1", "--quiet", "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(out)]) == 0
    blob = json.loads((out / "results.json").read_text())
    assert blob["config"]["synthetic_kv"] is True
    (ctx,) = blob["contexts"]
    assert ctx["prefill"][0]["synthetic"] is True
    rows = {r["mode"]: r for r in ctx["rows"]}
    exact_disk = rows["exact"]["bytes_per_token"]["disk"]
    # 2 layers x 8 KV heads x 128 dims x (K, V) x 2 bytes per token: nearly all of it read from DISK
    assert 0.9 * 2 * 8 * 128 * 2 * 2 * ctx["tokens"] <= exact_disk <= 2 * 8 * 128 * 2 * 2 * ctx["tokens"]
    assert rows["quest"]["sparse_stats"]["kv_fraction_read_max"] <= 0.1 + 1e-9
    assert "synthetic KV:" in (out / "report.md").read_text()


def test_synthetic_kv_needs_random_weights(capsys, tmp_path):
    assert main(["bench", "--synthetic-kv", "--cache-dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--synthetic-kv writes random K/V instead of a prefill: it needs --random-weights" in capsys.readouterr().err


def test_the_fidelity_harness_json_becomes_a_table_and_a_plot(small_sweep, tmp_path):
    """`--render FILE --fidelity FID` attaches a harness run (its own keys) to the results, and the
    renders after it keep it, from results.json alone."""
    (tmp_path / "results.json").write_bytes((small_sweep / "results.json").read_bytes())
    summary = {"exact@1": {"cases": 4, "hits": 3, "misses_of_exact_right": 0, "exact_right": 3, "median_gold_gap": 0.0,
                           "kv_fraction_read_max": 1.0},
               "quest@0.1": {"cases": 4, "hits": 3, "misses_of_exact_right": 0, "exact_right": 3,
                             "median_gold_gap": -0.1, "kv_fraction_read_max": 0.09},
               "kvpress-snapkv@0.1": {"cases": 4, "hits": 1, "misses_of_exact_right": 2, "exact_right": 3,
                                      "median_gold_gap": -1.5, "kv_fraction_read_max": 0.1}}
    harness = {"model": "gemma3-270m", "summary_4k_plus": summary, "peers": {"kvpress": "measured"}, "cases": [],
               "continuation": {"8192": {"quest@0.1": {"top1_agreement": 0.9, "kl": 0.05, "kv_fraction_read_max": 0.09}}}}
    (tmp_path / "fidelity.json").write_text(json.dumps(harness))
    path = tmp_path / "results.json"
    assert main(["bench", "--render", str(path), "--fidelity", str(tmp_path / "fidelity.json")]) == 0
    assert json.loads(path.read_text())["fidelity"]["summary_4k_plus"] == summary
    (tmp_path / "report.md").unlink()
    assert main(["bench", "--render", str(path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| kvpress-snapkv@0.1 | 1/4 | 2/3 | -1.500 | 0.100 |" in report
    assert "| quest@0.1 (8192 tokens) | 0.900 | 0.0500 | 0.090 |" in report
    assert (tmp_path / "fidelity.png").read_bytes()[:4] == b"\x89PNG" and "](fidelity.png)" in report
    (tmp_path / "bad.json").write_text("{}")
    assert main(["bench", "--render", str(path), "--fidelity", str(tmp_path / "bad.json")]) == 2
