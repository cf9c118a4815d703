"""A new user's mistakes: each gives one clean error that says what to pass, and nothing is lost.

Two parts:
- the failures issue 17 found (numbered as there), one test each, which failed before the fix;
- the misuse suite: should-fail inputs over every CLI command and API entry point, each of
  which must end in one ``offload: error:`` line and exit 2 (CLI) or an ``OffloadError``
  (API), never a traceback. It prints its count.
"""
from __future__ import annotations

import io
import math
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from offload import InputError, LongDocQA, RuntimeConfig, SamplingConfig
from offload.commands.cli import main
from offload.errors import ClosedError, ContextTooLongError, OffloadError
from storage import Tier

MAX_NEW = 16  # "The secret code of the blue lighthouse is 7319" is 13 tokens
LIGHTHOUSE_Q = "What is the secret code of the blue lighthouse?"


def _document(code: str, filler_seed: int) -> str:
    """A short document with one invented fact among plain filler sentences."""
    places = ["harbour", "market", "bakery", "library", "station", "garden", "bridge", "museum"]
    colours = ["red", "green", "yellow", "white", "grey", "brown", "orange", "black"]
    rows = []
    for i in range(18):
        j = (i * 5 + filler_seed) % len(places)
        rows.append(f"The {colours[(i + filler_seed) % 8]} {places[j]} opens at {(i + filler_seed) % 12 + 1} "
                    f"o'clock and closes when the {places[(j + 3) % 8]} does.")
    rows.insert(9, f"The secret code of the blue lighthouse is {code}.")
    return " ".join(rows)


def _one_error_line(capsys) -> str:
    out = capsys.readouterr()
    err = out.err.strip()
    assert "Traceback" not in err and "Traceback" not in out.out
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("offload: error: "), lines[0]
    return lines[0]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if a model would be resolved (and loaded): checks must come first."""
    import offload.api
    import offload.model.model_source

    def refuse(*args, **kwargs):
        raise AssertionError("a model was resolved before the arguments were checked")

    monkeypatch.setattr(offload.model.model_source, "resolve_model", refuse)
    monkeypatch.setattr(offload.api, "resolve_model", refuse)


@pytest.fixture(scope="module")
def qa(smollm2_source, cache_dir) -> LongDocQA:
    return LongDocQA("smollm2-135m", config=RuntimeConfig(device="cpu"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def doc(qa):
    return qa.ingest(_document("7319", 0))


@pytest.fixture()
def doc_file(tmp_path) -> Path:
    p = tmp_path / "doc.txt"
    p.write_text(_document("4021", 3), encoding="utf-8")
    return p


# ----- the twelve failures ------------------------------------------------------------------------------

@pytest.mark.slow  # (11 s: a second LongDocQA ingests and answers with the real model)
def test_failure_01_a_doc_asked_through_another_longdocqa_is_refused(qa, doc, cache_dir):
    other = LongDocQA("smollm2-135m", config=RuntimeConfig(device="cpu"), cache_dir=cache_dir)
    try:
        other_doc = other.ingest(_document("5555", 1))
        with pytest.raises(InputError, match="another LongDocQA"):
            other.ask(doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW)
        with pytest.raises(InputError, match="another LongDocQA"):
            qa.ask(other_doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW)
        with pytest.raises(InputError, match="another LongDocQA"):
            other.forget(doc)
        # Each object still answers from its own document.
        assert "5555" in other.ask(other_doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW).text
        assert "7319" in qa.ask(doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW).text
    finally:
        other.close()


@pytest.mark.parametrize("spill", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["all-device", "spilled-to-disk"])
def test_failure_06_a_closed_longdocqa_refuses_every_call(smollm2_source, cache_dir, tmp_path, spill):
    config = RuntimeConfig(device="cpu", device_memory_bytes="16MiB", disk_space_bytes="1GiB",
                           kv_dir=str(tmp_path / "kv")) if spill else RuntimeConfig(device="cpu")
    qa = LongDocQA("smollm2-135m", config=config, cache_dir=cache_dir, doc_cache=False)
    doc = qa.ingest(_document("2468", 2) * (6 if spill else 1))
    if spill:
        assert sum(tiers[Tier.DISK] for tiers in qa.engine.kv.held_bytes(doc._seq).values()) > 0
    qa.close()
    qa.close()  # twice is allowed
    for call in (lambda: qa.ask(doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW), lambda: qa.ingest("Some text."),
                 lambda: qa.generate("Once upon", max_new_tokens=2), lambda: qa.forget(doc),
                 lambda: qa.ask_stream(doc, LIGHTHOUSE_Q)):
        with pytest.raises(ClosedError, match="closed; make a new LongDocQA"):
            call()


def test_failure_07_api_misuse_raises_input_errors_that_say_what_to_pass(qa, doc):
    # A size string is accepted as what it says.
    assert RuntimeConfig(device_memory_bytes="32MiB").device_memory_bytes == 32 * 2**20
    assert RuntimeConfig(host_memory_bytes="1.5GiB", disk_space_bytes="0").host_memory_bytes == int(1.5 * 2**30)
    with pytest.raises(InputError, match="device_memory_bytes .*size"):
        RuntimeConfig(device_memory_bytes="lots")
    with pytest.raises(InputError, match=r"decode it first"):
        qa.ingest(b"The code is 1234.")
    with pytest.raises(InputError, match="as str, got NoneType"):
        qa.ingest(None)
    with pytest.raises(InputError, match=r"takes a Doc returned by LongDocQA.ingest, got str"):
        qa.ask("The code is 1234.", "What is the code?")
    scratch = qa.ingest(_document("1357", 4))
    qa.forget(scratch)
    with pytest.raises(InputError, match="forgotten"):
        qa.forget(scratch)
    with pytest.raises(InputError, match="forgotten"):
        qa.ask(scratch, LIGHTHOUSE_Q)
    assert "7319" in qa.ask(doc, LIGHTHOUSE_Q, max_new_tokens=MAX_NEW).text  # the other document is untouched


@pytest.mark.parametrize("argv, flag, internal", [
    (["--device-memory", "0"], "--device-memory", "device_memory_bytes"),
    (["--max-new-tokens", "0"], "--max-new-tokens", "max_new_tokens"),
    (["--top-p", "1.5"], "--top-p", "top_p"),
    (["--temperature", "-1"], "--temperature", "temperature ="),
    (["--page-size", "0"], "--page-size", "page_size"),
    (["--prefill-chunk", "0"], "--prefill-chunk", "prefill_chunk_tokens"),
    (["--host-memory", "-1"], "--host-memory", "host_memory_bytes"),
])
def test_failure_08_messages_name_the_flag_not_the_field(capsys, doc_file, cache_dir, no_model_load, argv, flag,
                                                         internal):
    assert main(["ask", "--doc", str(doc_file), "--question", "q?", "--cache-dir", str(cache_dir), *argv]) == 2
    line = _one_error_line(capsys)
    assert flag in line and internal not in line


@pytest.mark.parametrize("argv", [
    ["--question", ""], ["--question", "   "], ["--question", "q?", "--max-new-tokens", "0"],
    ["--question", "q?", "--cache-limit", "1.2.3"], ["--question", "q?", "--temperature", "nan"],
], ids=["empty-question", "blank-question", "max-new-tokens-0", "bad-cache-limit", "nan-temperature"])
def test_failure_09_arguments_are_checked_before_the_model_loads(capsys, doc_file, cache_dir, no_model_load, argv):
    assert main(["ask", "--doc", str(doc_file), "--cache-dir", str(cache_dir), *argv]) == 2
    _one_error_line(capsys)


def test_failure_10_plan_past_the_context_window_says_so(capsys, cache_dir):
    argv = ["plan", "--model", "smollm2-135m", "--preset", "cpu-2core", "--cache-dir", str(cache_dir)]
    assert main([*argv, "--context", "10000000"]) == 2
    line = _one_error_line(capsys)
    assert "context window of 8192" in line and "--allow-long-context" in line
    assert main([*argv, "--context", "20000", "--allow-long-context"]) == 0
    out = capsys.readouterr()
    assert "past smollm2-135m's context window of 8192" in out.err and "20000 tokens" in out.out
    assert main([*argv, "--context", "8192"]) == 0
    assert "context window" not in capsys.readouterr().err


def test_failure_11a_quiet_hides_the_gguf_conversion_bar():
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from offload.model.model_source import _gguf_progress

    original = gguf_utils.tqdm
    with _gguf_progress(False):
        hidden = gguf_utils.tqdm(range(3), file=io.StringIO())
        assert hidden.disable
        hidden.close()
    assert gguf_utils.tqdm is original
    with _gguf_progress(True):
        assert gguf_utils.tqdm is original


@pytest.mark.slow
def test_failure_11a_quiet_first_run_converts_the_model_without_a_bar(capfd, doc_file, tmp_path, smollm2_source):
    """End to end: a first `ask -q` into an empty cache dir converts the GGUF with nothing on stderr."""
    from tests.conftest import save_test_profile

    save_test_profile(tmp_path / "fresh")
    rc = main(["ask", "--doc", str(doc_file), "--question", LIGHTHOUSE_Q, "--cache-dir", str(tmp_path / "fresh"),
               "-q", "--no-doc-cache", "--max-new-tokens", "4"])
    err = capfd.readouterr().err
    assert rc == 0
    assert "Converting" not in err and "%|" not in err, err


@pytest.mark.slow
def test_failure_11b_interrupted_answer_ends_its_line(capsys, doc_file, cache_dir, monkeypatch):
    from offload.engine import Engine

    real = Engine.decode_step
    calls = {"n": 0}

    def interrupted_after_two(self, *args, **kwargs):  # Ctrl-C arrives during the third decode step
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "decode_step", interrupted_after_two)
    rc = main(["ask", "--doc", str(doc_file), "--question", LIGHTHOUSE_Q, "--cache-dir", str(cache_dir), "-q",
               "--no-doc-cache", "--max-new-tokens", "20"])
    out = capsys.readouterr()
    assert rc == 130
    assert out.out.strip() and out.out.endswith("\n")  # the partial answer, then a newline
    assert out.err.strip().splitlines()[-1] == "offload: interrupted"


def test_failure_12a_ask_reads_the_document_from_standard_input(capsys, doc_file, cache_dir, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(doc_file.read_bytes()), encoding="utf-8"))
    rc = main(["ask", "--doc", "-", "--question", LIGHTHOUSE_Q, "--cache-dir", str(cache_dir), "-q",
               "--max-new-tokens", str(MAX_NEW)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "4021" in out.out
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"  \n"), encoding="utf-8"))
    assert main(["ask", "--doc", "-", "--question", "q?", "--cache-dir", str(cache_dir)]) == 2
    assert "standard input is empty" in _one_error_line(capsys)


def test_failure_12b_a_document_alone_over_the_window_gets_no_max_new_tokens_advice(smollm2_engine):
    seq = smollm2_engine.new_sequence()
    window = smollm2_engine.max_context
    with pytest.raises(ContextTooLongError) as alone:
        smollm2_engine.check_request(seq, window + 100, 1)
    assert "max-new-tokens" not in str(alone.value) and "shorten the input" in str(alone.value)
    with pytest.raises(ContextTooLongError) as with_answer:
        smollm2_engine.check_request(seq, window - 100, 500)
    assert "lower --max-new-tokens (max_new_tokens) to at most 100" in str(with_answer.value)
    smollm2_engine.release(seq)


# ----- the misuse suite ---------------------------------------------------------------------------------

def _files(root: Path) -> dict[str, str]:
    """Bad documents and helper files for the CLI cases, by placeholder name."""
    root.mkdir(parents=True, exist_ok=True)
    made = {
        "empty": b"", "blank": b"   \n\t\n", "binary": bytes(range(256)) * 4, "badutf8": b"caf\xe9 au lait\n",
        "nul": b"text\x00with a NUL\n", "good": _document("8080", 5).encode(), "badjson": b"{not json",
        "file": b"a regular file\n",
    }
    out = {}
    for name, data in made.items():
        (root / name).write_bytes(data)
        out[name] = str(root / name)
    (root / "folder").mkdir(exist_ok=True)
    out["folder"] = str(root / "folder")
    out["missing"] = str(root / "missing.txt")
    out["under_file"] = str(root / "file" / "cache")
    return out


# ask's flags given bad values: (flag, values). Each value alone makes `ask` fail.
_ASK_FLAG_VALUES = {
    "--device-memory": ["0", "-1", "-5MiB", "lots", "12XB", "1.5.3GiB", "", "1"],
    "--host-memory": ["-1", "abc", "64QiB", "1KiB"],
    "--disk-space": ["-1", "many", "5 5GiB"],
    "--page-size": ["0", "-1", "5000", "abc"],
    "--prefill-chunk": ["0", "-3"],
    "--max-new-tokens": ["0", "-1", "abc", "1.5"],
    "--temperature": ["-1", "nan", "inf", "hot"],
    "--top-p": ["0", "1.5", "-0.1", "nan"],
    "--cache-limit": ["0", "-1", "abc", "1.2.3"],
    "--dtype": ["fp8"],
    "--kv-dtype": ["int4"],
    "--device": ["tpu", "cuda:x"],
    "--disk-backend": ["spdk"],
    "--model": ["no-such-model", "llama-3.1-8b"],
    "--seed": ["x"],
}


def _cli_cases(f: dict[str, str], cache: str) -> list[tuple[str, list[str]]]:
    ask = ["ask", "--cache-dir", cache, "--question", "What is the code?", "--doc"]
    cases: list[tuple[str, list[str]]] = []
    for kind in ("missing", "folder", "empty", "blank", "binary", "badutf8", "nul"):
        cases.append((f"ask document {kind}", [*ask, f[kind]]))
        cases.append((f"ingest document {kind}", ["ingest", f[kind], "--cache-dir", cache]))
    for kind in ("missing", "empty", "folder", "binary"):
        cases.append((f"generate prompt {kind}", ["generate", "--prompt-file", f[kind], "--cache-dir", cache]))
    for question in ("", "   ", "\n\t"):
        cases.append((f"question {question!r}", ["ask", "--doc", f["good"], "--cache-dir", cache,
                                                 "--question", question]))
    for flag, values in _ASK_FLAG_VALUES.items():
        for value in values:
            cases.append((f"ask {flag} {value!r}", [*ask, f["good"], flag, value]))
    cases += [
        ("ask --num-layers without --random-weights", [*ask, f["good"], "--num-layers", "2"]),
        ("ask --num-layers 0", [*ask, f["good"], "--random-weights", "--num-layers", "0"]),
        ("ask cache dir under a file", ["ask", "--doc", f["good"], "--question", "q?", "--cache-dir",
                                        f["under_file"]]),
        ("ask without --question", ["ask", "--doc", f["good"], "--cache-dir", cache]),
        ("ask without --doc", ["ask", "--question", "q?", "--cache-dir", cache]),
        ("ask unknown flag", [*ask, f["good"], "--fast"]),
        ("unknown command", ["summarize", f["good"]]),
        ("no command", []),
        ("generate --max-new-tokens 0", ["generate", "--prompt-file", f["good"], "--max-new-tokens", "0",
                                         "--cache-dir", cache]),
        ("ingest --cache-limit 0", ["ingest", f["good"], "--cache-dir", cache, "--cache-limit", "0"]),
    ]
    plan = ["plan", "--preset", "cpu-2core", "--cache-dir", cache]
    cases += [(f"plan {' '.join(extra)}", [*plan, *extra]) for extra in (
        ["--context", "0"], ["--context", "-5"], ["--context", "abc"], ["--context", "10000000"],
        ["--context", "4096", "--model", "no-such-model"], ["--context", "4096", "--page-size", "0"],
        ["--context", "4096", "--batch-size", "0"], ["--context", "4096", "--layer-groups", "0"],
        ["--context", "4096", "--what-if", "--sparse-fraction", "0"],
        ["--context", "4096", "--what-if", "--sparse-fraction", "1.5"],
        ["--context", "4096", "--sparse-fraction", "0.5"],
        ["--context", "4096", "--device-memory", "abc"], ["--context", "4096", "--host-memory", "-1"],
        ["--context", "4096", "--disk-space", "x"], ["--context", "4096", "--dtype", "fp8"],
        ["--context", "4096", "--kv-dtype", "int4"], [],
    )]
    cases += [
        ("plan unknown preset", ["plan", "--context", "4096", "--preset", "tpu-v9", "--cache-dir", cache]),
        ("plan missing profile", ["plan", "--context", "4096", "--profile", f["missing"], "--cache-dir", cache]),
        ("plan profile not JSON", ["plan", "--context", "4096", "--profile", f["badjson"], "--cache-dir", cache]),
        ("plan profile a folder", ["plan", "--context", "4096", "--profile", f["folder"], "--cache-dir", cache]),
        ("plan preset and profile", [*plan, "--context", "4096", "--profile", f["good"]]),
    ]
    store = ["cache", "--cache-dir", cache]
    cases += [(f"cache {' '.join(extra)}", [*store, *extra]) for extra in (
        ["remove"], ["remove", "0" * 32], ["remove", ""], ["remove", "../docs"], ["remove", "/etc/passwd"],
        ["verify", "../x"], ["verify", "f" * 32], ["gc", "--cache-limit", "abc"], ["gc", "--cache-limit", "0"],
        ["list", "0" * 32], ["shrink"],
    )]
    return cases


def _api_cases(qa: LongDocQA, doc, cache: Path, f: dict[str, str]) -> list[tuple[str, Callable[[], object]]]:
    forgotten = qa.ingest(_document("9999", 6))
    qa.forget(forgotten)
    cases: list[tuple[str, Callable[[], object]]] = [
        ("RuntimeConfig device_memory_bytes='lots'", lambda: RuntimeConfig(device_memory_bytes="lots")),
        ("RuntimeConfig device_memory_bytes=1.5", lambda: RuntimeConfig(device_memory_bytes=1.5)),
        ("RuntimeConfig device_memory_bytes=True", lambda: RuntimeConfig(device_memory_bytes=True)),
        ("RuntimeConfig device_memory_bytes=0", lambda: RuntimeConfig(device_memory_bytes=0)),
        ("RuntimeConfig host_memory_bytes=-1", lambda: RuntimeConfig(host_memory_bytes=-1)),
        ("RuntimeConfig disk_space_bytes='-1GiB'", lambda: RuntimeConfig(disk_space_bytes="-1GiB")),
        ("RuntimeConfig page_size=0", lambda: RuntimeConfig(page_size=0)),
        ("RuntimeConfig page_size='32'", lambda: RuntimeConfig(page_size="32")),
        ("RuntimeConfig device='tpu'", lambda: RuntimeConfig(device="tpu")),
        ("RuntimeConfig planner='magic'", lambda: RuntimeConfig(planner="magic")),
        ("RuntimeConfig disk_backend='spdk'", lambda: RuntimeConfig(disk_backend="spdk")),
        ("RuntimeConfig kv_dtype='fp8'", lambda: RuntimeConfig(kv_dtype="fp8")),
        ("RuntimeConfig kv_dtype=int8", lambda: RuntimeConfig(kv_dtype=torch.int8)),
        ("SamplingConfig temperature=-1", lambda: SamplingConfig(temperature=-1)),
        ("SamplingConfig temperature=nan", lambda: SamplingConfig(temperature=math.nan)),
        ("SamplingConfig top_p=0", lambda: SamplingConfig(top_p=0)),
        ("SamplingConfig temperature='hot'", lambda: SamplingConfig(temperature="hot")),
        ("ingest bytes", lambda: qa.ingest(b"The code is 1234.")),
        ("ingest None", lambda: qa.ingest(None)),
        ("ingest ''", lambda: qa.ingest("")),
        ("ingest blank", lambda: qa.ingest(" \n ")),
        ("ingest int", lambda: qa.ingest(1234)),
        ("ask str as doc", lambda: qa.ask("The code is 1234.", "What is the code?")),
        ("ask None as doc", lambda: qa.ask(None, "What is the code?")),
        ("ask empty question", lambda: qa.ask(doc, "")),
        ("ask None question", lambda: qa.ask(doc, None)),
        ("ask bytes question", lambda: qa.ask(doc, b"what?")),
        ("ask max_new_tokens=0", lambda: qa.ask(doc, "q?", max_new_tokens=0)),
        ("ask max_new_tokens=1.5", lambda: qa.ask(doc, "q?", max_new_tokens=1.5)),
        ("ask sampling dict", lambda: qa.ask(doc, "q?", sampling={"temperature": 1.0})),
        ("ask forgotten doc", lambda: qa.ask(forgotten, "q?")),
        ("forget twice", lambda: qa.forget(forgotten)),
        ("ask_stream blank question", lambda: qa.ask_stream(doc, "  ")),
        ("generate ''", lambda: qa.generate("")),
        ("generate bytes", lambda: qa.generate(b"Once upon")),
        ("generate max_new_tokens=-1", lambda: qa.generate("Once upon", max_new_tokens=-1)),
        ("LongDocQA unknown model", lambda: LongDocQA("no-such-model", cache_dir=cache)),
        ("LongDocQA cache dir under a file", lambda: LongDocQA("smollm2-135m", cache_dir=f["under_file"])),
        ("LongDocQA tiny device budget", lambda: LongDocQA("smollm2-135m", cache_dir=cache,
                                                            config=RuntimeConfig(device_memory_bytes=1))),
    ]
    return cases


def test_misuse_suite_every_should_fail_input_fails_cleanly(qa, doc, cache_dir, tmp_path, capsys, monkeypatch):
    f = _files(tmp_path / "inputs")
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b""), encoding="utf-8"))
    unclean: list[str] = []
    cli = _cli_cases(f, str(cache_dir)) + [("ask --doc - with empty stdin", [
        "ask", "--doc", "-", "--question", "q?", "--cache-dir", str(cache_dir)])]
    for name, argv in cli:
        capsys.readouterr()
        try:
            rc = main(list(argv))
        except BaseException as e:  # noqa: BLE001 - anything escaping main is a failure of the case
            unclean.append(f"CLI {name}: raised {type(e).__name__}: {e}")
            continue
        out = capsys.readouterr()
        lines = out.err.strip().splitlines()
        if rc != 2 or len(lines) != 1 or not lines[0].startswith("offload: error: ") or "Traceback" in out.err:
            unclean.append(f"CLI {name}: exit {rc}, stderr {out.err.strip()[-300:]!r}")
    # OFFLOAD_CACHE pointing below a regular file, no --cache-dir.
    monkeypatch.setenv("OFFLOAD_CACHE", f["under_file"])
    rc = main(["ask", "--doc", f["good"], "--question", "q?"])
    out = capsys.readouterr()
    cli.append(("ask with OFFLOAD_CACHE under a file", []))
    if rc != 2 or len(out.err.strip().splitlines()) != 1 or "OFFLOAD_CACHE" not in out.err and "cache" not in out.err:
        unclean.append(f"CLI OFFLOAD_CACHE under a file: exit {rc}, stderr {out.err.strip()[-300:]!r}")
    monkeypatch.undo()

    api = _api_cases(qa, doc, cache_dir, f)
    for name, call in api:
        try:
            call()
        except OffloadError:
            continue
        except BaseException as e:  # noqa: BLE001
            unclean.append(f"API {name}: {type(e).__name__}: {e}")
            continue
        unclean.append(f"API {name}: no error")
    total = len(cli) + len(api)
    print(f"\nmisuse suite: {total} inputs ({len(cli)} CLI, {len(api)} API), {total - len(unclean)} clean")
    assert total >= 75
    assert not unclean, "\n".join(unclean)
