"""Fidelity peers of ``bench/fidelity.py``: kvpress (SnapKV, StreamingLLM) on the same QA cases,
at the same fraction F of the growing layers' KV as each sparse budget, in its own venv
(``make peer-kvpress``; ``bench/peers/kvpress_peer.py``). Its rows join each case's results as
``kvpress-<press>@F``, scored as ours are (a hit by ``answer_hits``, the gold continuation's
log-probability against exact's), so the harness's summaries carry them."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESSES = ("snapkv", "streamingllm")
TIMEOUT_S = 7200


def kvpress_reason() -> str | None:
    """Why the kvpress peer cannot run here, or None."""
    if not (ROOT / ".peers" / "kvpress" / "bin" / "python").is_file():
        return "not installed: `make peer-kvpress` builds its own venv in .peers/kvpress"
    return None


def run_kvpress(rows: list[dict], inputs: list[dict], budgets: list[float], qa, *, max_new_tokens: int,
                say) -> str | None:
    """Add kvpress's results to ``rows`` (in place); None, or why it did not run."""
    from bench.qa_set import answer_hits
    from offload.commands.bench_peers import run_runner

    why = kvpress_reason()
    if why is not None:
        return why
    engine = qa.engine
    request = {"checkpoint": str(qa.source.weights_dir), "dtype": str(engine.dtype).removeprefix("torch."),
               "presses": list(PRESSES), "budgets": list(budgets), "max_new_tokens": max_new_tokens,
               "eos_ids": list(qa.source.config.eos_token_ids or []), "cases": inputs}
    say(f"kvpress: {len(inputs)} cases x {len(PRESSES)} presses x {len(budgets)} budgets")
    runner = ROOT / "bench" / "peers" / "kvpress_peer.py"
    out, failed = run_runner(ROOT / ".peers" / "kvpress" / "bin" / "python", runner, request, TIMEOUT_S)
    if out is None:
        return failed
    got = out["results"]
    for row, inp in zip(rows, inputs):
        exact = row["results"]["exact@1"]
        for key, r in got[inp["name"]].items():
            press, f = key.split("@")
            text = qa.codec.decode([t for t in r["answer_ids"] if t not in set(request["eos_ids"])])
            row["results"][f"kvpress-{press}@{f}"] = {
                "mode": f"kvpress-{press}", "budget": float(f), "answer": text, "token_ids": r["answer_ids"],
                "hit": answer_hits(text, row["expected"]), "kv_fraction_read": float(f),
                "kv_fraction_read_max": float(f), "kv_fraction_fetched": None, "sparse_fallback": "",
                "gold_log_prob": r["gold_log_prob"], "gold_gap": r["gold_log_prob"] - exact["gold_log_prob"]}
    return None
