"""The sweep's peers, on the same prompt ids as its rows. Each is measured or says why not.

- transformers (in the runtime's own venv, the exactness oracle): DynamicCache and StaticCache
  as manual greedy loops (``bench_runs.hf_loop``), their repetitions interleaved with exact
  all-DEVICE's; their greedy tokens are checked against exact mode's. On CUDA also its
  offloaded caches (``DynamicCache(offloading=True)`` and ``StaticCache(offloading=True)``,
  what ``cache_implementation="offloaded"`` / ``"offloaded_static"`` build).
- llama.cpp (``llama-cpp-python``) and vLLM's CPU build, each in its own venv under ``.peers/``
  (``make peer-llamacpp``, ``make peer-vllm``), run as subprocesses of ``bench/peers/*.py`` that
  print one JSON line. llama.cpp runs the same GGUF file (its quantized weights, labelled);
  vLLM the checkpoint converted from it (fp32 or bf16 weights, as ours).
"""
from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from offload.commands.bench_results import first_difference

__all__ = ["Peers", "PEER_CONTEXT_LIMIT", "run_runner"]

PEER_CONTEXT_LIMIT = 8192  # peers run up to here unless --peers-all-contexts
ROOT = Path(__file__).resolve().parents[2]
SUBPROCESS_PEERS = {"llama.cpp": ("llamacpp", "llamacpp_peer.py"), "vLLM (CPU)": ("vllm", "vllm_peer.py")}
PEER_TIMEOUT_S = 1800


class _Run:
    """The peers of one context: HF repetitions interleaved with exact all-DEVICE's, the
    subprocess peers after the rows."""

    def __init__(self, peers: "Peers", tokens: int, ids: list[int]) -> None:
        self.peers, self.tokens, self.ids = peers, tokens, ids
        self.hf = None
        self.hf_error = ""
        if peers.hf_available:
            try:
                from offload.commands.bench_runs import HFPeers

                plan = peers.plan
                # a short untimed warm-up: the sweep's process has run long prefills already
                self.hf = HFPeers(plan.source, ids, plan.decode, lambda: None, plan.device, plan.dtype, warm_tokens=512)
                if plan.device.type == "cuda":
                    _add_offloaded(self.hf, len(ids) + plan.decode + 1)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
                self.hf_error = f"transformers failed to load the checkpoint: {type(e).__name__}: {e}"

    def rep(self) -> None:
        if self.hf is not None:
            self.hf.rep()

    def finish(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        exact = next((r for r in rows if (r["mode"], r["placement"]) == ("exact", "device")), None)
        out: list[dict[str, Any]] = []
        for p in self.peers.declared():
            if not p["name"].startswith("transformers"):
                continue
            if not p["available"]:
                out.append({**p, "measured": False})
                continue
            if self.hf is None:
                out.append({**p, "measured": False, "reason": self.hf_error or p["reason"]})
                continue
            res = self.hf.results.get(p["cache"])
            if res is None or not res.decode_s:
                why = "not run with exact all-DEVICE (not in --modes/--placements)"
                out.append({**p, "measured": False, "reason": why})
                continue
            d = {**p, "measured": True, "reason": "", "prompt_tokens": len(self.ids),
                 "threads": torch.get_num_threads(),
                 "prefill_s": res.prefill_s, "decode_s_per_token": [s / self.peers.plan.decode for s in res.decode_s],
                 "tokens": res.tokens, "same_tokens": None}
            if exact is not None:
                diff = first_difference(res.tokens, exact["tokens"])
                d["same_tokens"] = diff is None
                d["first_difference"] = diff
            out.append(d)
        self.hf = None  # its model's memory goes before the next context
        for p in self.peers.declared():
            if p["name"] in SUBPROCESS_PEERS:
                out.append(self.peers.run_subprocess(p, self.ids) if p["available"] else {**p, "measured": False})
        return out


def _add_offloaded(hf: Any, max_len: int) -> None:
    import transformers

    from offload.commands.bench_report import Result

    config = hf.model.config
    hf.makers["HF DynamicCache offloaded"] = lambda: transformers.DynamicCache(config=config, offloading=True)
    hf.makers["HF StaticCache offloaded"] = lambda: transformers.StaticCache(
        config=config, max_cache_len=max_len, offloading=True)
    for name in ("HF DynamicCache offloaded", "HF StaticCache offloaded"):
        hf.results[name] = Result(name, "transformers")


class Peers:
    """Which peers this run has, decided (and declared) before anything is measured."""

    def __init__(self, plan: Any, args: Any, cache: Path) -> None:
        self.plan, self.cache = plan, cache
        self.all_contexts = bool(getattr(args, "peers_all_contexts", False))
        self.skip = set(getattr(args, "no_peers", None) or [])
        self.hf_available = plan.source.weights_dir is not None and "transformers" not in self.skip
        self._paths: dict[str, tuple[Path, Path, Path | None]] = {}
        self.prompts: dict[int, list[int]] = {}
        self._answers: dict[str, dict[int, dict[str, Any]]] = {}
        self._declared = self._declare()

    def _declare(self) -> list[dict[str, Any]]:
        plan = self.plan
        dtype = str(plan.dtype).removeprefix("torch.")
        hf_why = ("left out by --no-peers" if "transformers" in self.skip else
                  "random weights: there is no checkpoint to load into transformers")
        caches = ["HF DynamicCache", "HF StaticCache"]
        cuda_caches = ["HF DynamicCache offloaded", "HF StaticCache offloaded"]
        out = [{"name": f"transformers {c.removeprefix('HF ')}", "cache": c, "available": self.hf_available,
                "label": f"weights {dtype} (same checkpoint), KV {dtype}, greedy loop", "reason": hf_why}
               for c in caches]
        for c in cuda_caches:
            ok = self.hf_available and plan.device.type == "cuda"
            out.append({"name": f"transformers {c.removeprefix('HF ')}", "cache": c, "available": ok,
                        "label": f"weights {dtype}, KV {dtype} offloaded to pinned host memory",
                        "reason": hf_why if not self.hf_available else "CUDA only: the offloaded caches move "
                        "KV between GPU and host memory, which a CPU-only run has no use for"})
        for name, (env, script) in SUBPROCESS_PEERS.items():
            out.append(self._subprocess_declared(name, env, script))
        out.append({"name": "kvpress", "available": False, "label": "SnapKV and StreamingLLM keeping F of the KV",
                    "reason": "a fidelity peer, not a throughput one: `bench/fidelity.py --peers kvpress` (make "
                              "peer-kvpress) runs it on the QA cases; attach that JSON with --fidelity FILE"})
        return out

    def _subprocess_declared(self, name: str, env: str, script: str) -> dict[str, Any]:
        py = ROOT / ".peers" / env / "bin" / "python"
        path = ROOT / "bench" / "peers" / script
        d: dict[str, Any] = {"name": name, "available": False, "label": "", "reason": ""}
        gguf = _gguf_path(self.plan, self.cache)
        if env in self.skip:
            d["reason"] = "left out by --no-peers"
        elif self.plan.source.weights_dir is None:
            d["reason"] = "random weights: no model file for it to load"
        elif not path.is_file():
            d["reason"] = f"its runner bench/peers/{script} is not here (run the bench from a clone of the project)"
        elif not py.is_file():
            d["reason"] = f"not installed: `make peer-{env}` builds its own venv in .peers/{env}"
        elif name == "llama.cpp" and gguf is None:
            d["reason"] = "no GGUF file for this model (llama.cpp runs GGUF files only)"
        elif name == "vLLM (CPU)" and self.plan.device.type == "cuda":
            d["reason"] = "this run is on CUDA; the installed build is vLLM's CPU wheel"
        else:
            d["available"] = True
        self._paths[name] = (py, path, gguf)  # kept out of the results: no machine's paths in a report
        d["label"] = (f"GGUF weights as shipped ({_quant(gguf)}), KV fp32"
                      if name == "llama.cpp" else f"weights {str(self.plan.dtype).removeprefix('torch.')} "
                      "(the converted checkpoint), KV as vLLM's CPU backend keeps it")
        return d

    def units(self, prefill_units: float) -> float:
        """The progress display's cost of one context's peers, given what one prefill of the
        prompt costs: each peer prefills it once per repetition, and vLLM compiles its model."""
        avail = {p["name"] for p in self._declared if p["available"]}
        runs = 2 * self.hf_available + ("llama.cpp" in avail) + 2 * ("vLLM (CPU)" in avail)
        return runs * self.plan.reps * prefill_units + 40.0 * ("vLLM (CPU)" in avail)

    def declared(self) -> list[dict[str, Any]]:
        return [dict(p) for p in self._declared]

    def start(self, tokens: int, ids: list[int]) -> "_Run | _Skipped":
        if not self.runs_at(tokens):
            return _Skipped(self, tokens)
        return _Run(self, tokens, ids)

    def runs_at(self, tokens: int) -> bool:
        return tokens <= PEER_CONTEXT_LIMIT or self.all_contexts

    def prepare(self, prompts: dict[int, list[int]]) -> None:
        """The prompt of every context (those the peers run at are kept): a subprocess peer starts
        once (vLLM compiles its model for minutes) and answers all of them, the first time it is asked."""
        self.prompts = {t: ids for t, ids in prompts.items() if self.runs_at(t)}
        self._answers = {}

    def run_subprocess(self, p: dict[str, Any], ids: list[int]) -> dict[str, Any]:
        """The measurement of the prompt ``ids`` by the peer ``p``: every prepared prompt's is taken
        on its first use; a prompt not prepared is run alone."""
        tokens = next((t for t, x in self.prompts.items() if x == ids), None)
        prompts = self.prompts if tokens is not None else {len(ids): ids}
        tokens = len(ids) if tokens is None else tokens
        answers = self._answers.setdefault(p["name"], {})
        if tokens not in answers:
            answers.update(self._launch(p, prompts))
        return answers[tokens]

    def _launch(self, p: dict[str, Any], prompts: dict[int, list[int]]) -> dict[int, dict[str, Any]]:
        plan = self.plan
        python, script, gguf = self._paths[p["name"]]
        request = {"prompts": list(prompts.values()), "decode": plan.decode, "reps": plan.reps,
                   "threads": torch.get_num_threads(), "gguf": None if gguf is None else str(gguf),
                   "checkpoint": str(plan.source.weights_dir), "dtype": str(plan.dtype).removeprefix("torch.")}
        got, failed = run_runner(python, script, request, PEER_TIMEOUT_S)
        if got is None:
            return {t: {**p, "measured": False, "reason": failed} for t in prompts}
        return {t: {**p, **r, "note": got.get("note", ""), "measured": True, "reason": "", "prompt_tokens": len(x)}
                for (t, x), r in zip(prompts.items(), got["results"])}


def run_runner(python: Path, script: Path, request: dict[str, Any], timeout_s: float) -> tuple[dict | None, str]:
    """Run a peer's runner in its own venv on ``request`` (passed as a temporary JSON file): the
    last JSON line it printed, or None and why it failed (its last error line, or the timeout)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        proc = subprocess.run([str(python), str(script), f.name], capture_output=True, text=True, timeout=timeout_s,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s"
    finally:
        Path(f.name).unlink(missing_ok=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = proc.stderr.strip().splitlines() or ["no output"]
        tail = next((line for line in reversed(err) if "Error" in line), err[-1])[:300]
        return None, f"failed (exit {proc.returncode}): {tail}"
    return json.loads(lines[-1]), ""


class _Skipped:
    """A context beyond the peers' limit: every peer says why it did not run there."""

    def __init__(self, peers: Peers, tokens: int) -> None:
        self.peers, self.tokens = peers, tokens

    def rep(self) -> None:
        pass

    def finish(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        why = f"peers run at contexts up to {PEER_CONTEXT_LIMIT} tokens; --peers-all-contexts lifts that"
        return [{**p, "measured": False, "reason": p["reason"] if not p["available"] else why}
                for p in self.peers.declared()]


def _quant(gguf: Path | None) -> str:
    """The weights' format named at the end of a GGUF file's name (Q4_K_M, Q4_1, F16), else its name."""
    if gguf is None:
        return "?"
    m = re.search(r"[-._]((?:i?q\d[_a-z0-9]*)|f16|bf16|f32)$", gguf.stem, re.IGNORECASE)
    return m.group(1).upper() if m else gguf.name


def _gguf_path(plan: Any, cache: Path) -> Path | None:
    """The GGUF file the model came from (a packaged name or a .gguf path), if any."""
    name = plan.model
    if name.endswith(".gguf"):
        return Path(name)
    try:
        from offload.model.model_source import _packaged_gguf

        return _packaged_gguf(name, cache)
    except Exception:  # noqa: BLE001 - not a packaged GGUF model: no llama.cpp peer
        return None

