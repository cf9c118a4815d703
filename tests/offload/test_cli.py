"""The CLI: one-line errors with a fix and exit status 2 (no traceback), --json output."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offload.commands.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("offload: error: ")
    return lines[0]


@pytest.fixture()
def doc_file(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text("The museum opens at nine. Tickets cost five euros.\n")
    return p


def test_missing_document(capsys, tmp_path, cache_dir):
    assert main(["ask", "--doc", str(tmp_path / "nope.txt"), "--question", "q", "--cache-dir", str(cache_dir)]) == 2
    assert "does not exist" in _err(capsys)


def test_empty_document(capsys, tmp_path, cache_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["ask", "--doc", str(empty), "--question", "q", "--cache-dir", str(cache_dir)]) == 2
    assert "is empty" in _err(capsys)


def test_unknown_model(capsys, doc_file, cache_dir):
    assert main(["ask", "--doc", str(doc_file), "--question", "q", "--model", "gpt-17-huge",
                 "--cache-dir", str(cache_dir)]) == 2
    line = _err(capsys)
    assert "unknown model 'gpt-17-huge'" in line and "smollm2-135m" in line


def test_shape_without_random_weights(capsys, doc_file, cache_dir):
    assert main(["ask", "--doc", str(doc_file), "--question", "q", "--model", "llama-3.1-8b",
                 "--cache-dir", str(cache_dir)]) == 2
    assert "--random-weights" in _err(capsys)


def test_unwritable_cache_dir(capsys, doc_file, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a directory cannot be created below a file, even by root
    assert main(["ask", "--doc", str(doc_file), "--question", "q", "--cache-dir", str(blocker / "cache")]) == 2
    line = _err(capsys)
    assert "not writable" in line and "--cache-dir" in line


@pytest.mark.parametrize("flag, value, words", [
    ("--device-memory", "lots", "not a size"),
    ("--dtype", "fp8", "unknown dtype"),
    ("--page-size", "0", "--page-size must be between 1 and 4096"),
    ("--top-p", "1.5", "--top-p must be in (0, 1]"),
    ("--kv-format", "int4", "invalid choice: 'int4'"),
    ("--restore-recompute", "1.0", "--restore-recompute is the share of a restored document to recompute, in [0, 1)"),
    ("--restore-recompute", "-0.1", "in [0, 1)"),
    ("--recompute", "lowrank", "--recompute lowrank is not executed by the engine yet"),
    ("--recompute", "all", "invalid choice: 'all'"),
])
def test_bad_option_values(capsys, doc_file, cache_dir, flag, value, words):
    assert main(["ask", "--doc", str(doc_file), "--question", "q", "--cache-dir", str(cache_dir), flag, value]) == 2
    assert words in _err(capsys)


def test_prompt_longer_than_context(capsys, tmp_path, smollm2_source, cache_dir):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)
    assert main(["generate", "--prompt-file", str(long), "--cache-dir", str(cache_dir), "--quiet"]) == 2
    line = _err(capsys)
    assert "context is 8192" in line and "--allow-long-context" in line


def test_long_context_override(capsys, tmp_path, cache_dir):
    """With the override, a prompt past the context window runs (random weights, one layer)."""
    long = tmp_path / "long.txt"
    long.write_text("x" * 8300)  # byte codec: 8300 tokens > 8192
    args = ["generate", "--prompt-file", str(long), "--model", "smollm2-135m", "--random-weights",
            "--num-layers", "1", "--max-new-tokens", "2", "--json", "--quiet", "--cache-dir", str(cache_dir)]
    assert main(args) == 2
    assert "--allow-long-context" in _err(capsys)
    assert main(args + ["--allow-long-context"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["prefill_tokens"] == 8300 and len(out["token_ids"]) == 2


@pytest.mark.slow  # a fresh interpreter loads torch and the model: subprocess tests run with make test-slow
def test_json_output_in_a_subprocess(tmp_path, smollm2_source, cache_dir):
    prompt = tmp_path / "p.txt"
    prompt.write_text("The three primary colours are")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "offload", "generate", "--prompt-file", str(prompt),
                        "--max-new-tokens", "5", "--json", "--quiet", "--cache-dir", str(cache_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert isinstance(out["text"], str) and len(out["token_ids"]) == 5
    s = out["stats"]
    for key in ("ttft_s", "prefill_tokens", "prefill_tok_s", "decode_tok_s", "peak_bytes"):
        assert key in s
    assert s["peak_bytes"]["device"] > 0 and s["prefill_tokens"] > 3


@pytest.mark.slow
def test_error_in_a_subprocess_has_no_traceback(tmp_path, cache_dir):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "offload", "ask", "--doc", str(tmp_path / "missing.txt"),
                        "--question", "q", "--cache-dir", str(cache_dir)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("offload: error: document")


def test_ingest_then_ask_reuses_the_doc_cache_and_cache_commands(tmp_path, capsys):
    """`offload ingest` builds a DocCache, `offload ask` on the same document reports a hit,
    `offload cache list/verify/remove/gc` manage it."""
    import json as _json

    from offload.commands.cli import main

    doc = tmp_path / "doc.txt"
    doc.write_text("The ferry leaves at seven. " * 30)
    common = ["--model", "smollm2-135m", "--random-weights", "--num-layers", "2", "--cache-dir", str(tmp_path),
              "--quiet", "--json"]
    assert main(["ingest", str(doc), *common]) == 0
    first = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["stats"]["doc_cache"] == "miss" and len(first["doc_id"]) == 32
    assert main(["ask", "--doc", str(doc), "--question", "When?", "--max-new-tokens", "4", *common]) == 0
    out = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stats"]["doc_cache"] == "hit" and out["stats"]["ingest"]["prefill_tokens"] == 0
    assert out["stats"]["doc_id"] == first["doc_id"]
    assert main(["cache", "list", "--cache-dir", str(tmp_path), "--json"]) == 0
    assert [r["doc_id"] for r in _json.loads(capsys.readouterr().out)] == [first["doc_id"]]
    assert main(["cache", "verify", "--cache-dir", str(tmp_path)]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["cache", "remove", "nope", "--cache-dir", str(tmp_path)]) == 2
    assert "'nope' is not a DocCache id" in capsys.readouterr().err
    assert main(["cache", "remove", "0" * 32, "--cache-dir", str(tmp_path)]) == 2
    assert f"no DocCache '{'0' * 32}'" in capsys.readouterr().err
    assert main(["cache", "remove", first["doc_id"], "--cache-dir", str(tmp_path)]) == 0
    assert main(["cache", "gc", "--cache-dir", str(tmp_path)]) == 0
    assert "removed" in capsys.readouterr().out
    assert main(["ask", "--doc", str(doc), "--question", "When?", "--max-new-tokens", "4", "--no-doc-cache",
                 *common]) == 0
    assert _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]["doc_cache"] == ""


@pytest.mark.slow  # (15 s; the API test test_kv_format.py::test_4bit_doc_cache_hit_answers_like_a_fresh_ingest
# holds the same DocCache rules in the default run)
def test_4bit_ingest_then_ask_hits_its_own_doc_cache_only(tmp_path, capsys):
    import json as _json

    doc = tmp_path / "doc.txt"
    doc.write_text("The ferry leaves at seven. " * 30)
    common = ["--model", "smollm2-135m", "--random-weights", "--num-layers", "2", "--cache-dir", str(tmp_path),
              "--quiet", "--json"]
    ask = ["ask", "--doc", str(doc), "--question", "When?", "--max-new-tokens", "4", *common]
    assert main(["ingest", str(doc), "--kv-format", "4bit", *common]) == 0
    assert _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]["kv_format"] == "4bit"
    assert main([*ask, "--kv-format", "4bit"]) == 0
    assert _json.loads(capsys.readouterr().out.strip().splitlines()[-1])["stats"]["doc_cache"] == "hit"
    assert main(ask) == 0  # exact mode: the 4-bit DocCache is not served to it
    out = _json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["stats"]["doc_cache"] == "miss" and out["stats"]["kv_format"] == "exact"


def test_disk_backend_kvikio_where_it_cannot_run_is_refused(capsys, tmp_path, cache_dir):
    """Without CUDA (or the kvikio package) --disk-backend kvikio is a clear error naming why
    and the fix; posix runs and says so in the stats."""
    from storage import kvikio_status

    prompt = tmp_path / "p.txt"
    prompt.write_text("x" * 3000)  # 94 pages of 48 KiB: past a 1 MiB DEVICE arena
    args = ["generate", "--prompt-file", str(prompt), "--model", "smollm2-135m", "--random-weights",
            "--num-layers", "1", "--max-new-tokens", "2", "--json", "--quiet", "--cache-dir", str(cache_dir),
            "--device-memory", "1MiB", "--device", "cpu"]
    if kvikio_status() is not None:
        assert main(args + ["--disk-backend", "kvikio"]) == 2
        line = _err(capsys)
        assert "kvikio disk backend cannot run here" in line and "--disk-backend posix" in line
    assert main(args + ["--disk-backend", "posix"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["disk_backend"] == "posix" and stats["peak_bytes"]["disk"] > 0


def test_a_spilling_command_measures_the_profile_once_and_says_so_even_quiet(capsys, tmp_path, monkeypatch):
    """No profile saved under --cache-dir and a budget that spills: the first run measures one
    (faked here) before building its engine, with one notice line that --quiet keeps and no
    step lines; the next run finds it saved."""
    import dataclasses

    from offload.tuning import profile as prof
    from planner import HardwareProfile

    calls: list[dict] = []

    def measure(**kwargs):
        calls.append(kwargs)
        return dataclasses.replace(HardwareProfile.preset("cpu-2core"), name="measured by the test (quick)")

    monkeypatch.setattr(prof, "measure_profile", measure)
    prompt = tmp_path / "p.txt"
    prompt.write_text("x" * 3000)  # 94 pages of 48 KiB: past a 1 MiB DEVICE arena
    args = ["generate", "--prompt-file", str(prompt), "--model", "smollm2-135m", "--random-weights",
            "--num-layers", "1", "--max-new-tokens", "2", "--json", "--quiet", "--cache-dir", str(tmp_path / "cache"),
            "--device-memory", "1MiB", "--device", "cpu", "--disk-backend", "posix"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [prof.MEASURE_NOTICE]
    assert len(calls) == 1 and calls[0]["quick"] and not calls[0]["progress"]
    assert json.loads(captured.out)["stats"]["profile"] == "measured by the test (quick) (given)"
    assert main(args) == 0
    assert capsys.readouterr().err == "" and len(calls) == 1
