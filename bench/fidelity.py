"""Fidelity of the sparse decode modes against exact attention, in one process.

    python bench/fidelity.py [--model gemma3-270m] [--lengths 2048 4096 8192] [--budgets 0.05 0.1 0.2]
                             [--modes quest speculative] [--kv-formats 4bit [4bit-exact-prefill]]
                             [--essay-tokens 8192] [--json-out fidelity.json]

Each document is ingested once (its prefill is exact in every mode); then every mode answers
on the same pages: ``exact``, the query-agnostic control ``sink+window`` (StreamingLLM's sink
and recent pages, page-granular, at the same F) and each sparse mode at each F. The engine
and its spilled KV (DEVICE small, HOST none: the global layers' pages go to DISK) are shared,
only the page selector changes.

Reported per mode and F:
- QA (``bench/qa_set.py``: single facts, look-alike keys, value chains; invented facts in
  essays; depths 2% to 98%): hits, misses among the cases exact gets right, and the gold
  continuation's log-prob gap to exact (teacher-forced; the continuation is exact's own
  answer up to the expected value when exact hits, else the expected value alone);
- teacher-forced continuation of essays: next-token top-1 agreement with exact and mean
  KL(exact || mode) over ``--essay-steps`` steps after ``--essay-tokens`` tokens;
- bytes: ``kv_fraction_read`` (mean, max over steps), ``kv_fraction_fetched``, and DISK
  bytes read per step, against exact's.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"
# Page formats beside exact: the RuntimeConfig fields of each. With 4-bit pages a prefill in
# chunks attends the earlier chunks' pages as stored (4-bit); one chunk attends itself exactly.
FORMATS = {"exact": {"kv_format": "exact"}, "4bit": {"kv_format": "4bit"},
           "4bit-exact-prefill": {"kv_format": "4bit", "prefill_chunk_tokens": 1 << 16},
           "exact-blas": {"matvec_kernel": "torch"}}
# Exact under another kernel (a decode token's products through torch's BLAS instead of the
# row kernel: the same sums in another order). Its agreement with exact is the floor of the
# metrics: how often exact itself flips a near-tied token when only rounding changes. It runs
# alone, with no sparse mode.
FLOOR_FORMATS = ("exact-blas",)


def _selectors(engine, source, budgets, modes):
    """(label, F, selector) of every configuration, exact first."""
    from offload.attention.quest import QuestSelector
    from offload.attention.selection import ExactSelector
    from offload.attention.streaming import SinkWindowSelector

    kinds, ps = engine.kv.kinds, engine.config.page_size
    out = [("exact", 1.0, ExactSelector())]
    for f in budgets:
        out.append(("sink+window", f, SinkWindowSelector(budget=f, page_size=ps, kinds=kinds)))
        if "quest" in modes:
            out.append(("quest", f, QuestSelector(budget=f, page_size=ps, kinds=kinds, scale=engine.runner.scale)))
        if "oracle" in modes:
            out.append(("oracle", f, OracleSelector(engine, f)))
        if "quest-classic" in modes:  # every candidate's bounds, no prompt prior
            out.append(("quest-classic", f, QuestSelector(budget=f, page_size=ps, kinds=kinds,
                                                          scale=engine.runner.scale, use_prior=False)))
        if "speculative" in modes:  # Quest's pages at its own split (the pool's bounds paid twice)
            from offload.attention.speculative import speculative_selector

            out.append(("speculative", f, speculative_selector(engine, source, budget=f)))
        # lsh-prior: the prompt prior's best pages exact, the rest sampled. The engine's sequences
        # carry SimHash tables (main sets engine.lsh_params).
        for label, prior_share in (("lsh", 0.0), ("lsh-prior", 0.75)):
            if label in modes:
                from offload.attention.lsh import lsh_selector

                quest = QuestSelector(budget=f, page_size=ps, kinds=kinds, scale=engine.runner.scale)
                out.append((label, f, lsh_selector(engine, quest, budget=f, prior_share=prior_share)))
    return out


class OracleSelector:
    """The upper bar, not a mode: each step's pages by the live query's true attention mass
    (every key read to find them, so no real run could do this), as many as F allows with no
    metadata to pay; shows whether a miss comes from the budget or from the scores."""

    def __init__(self, engine, budget: float) -> None:
        self.engine, self.budget = engine, budget
        self.fallback, self.bounds_bytes, self.selection_s = "", 0, 0.0

    def choose(self, seq, layer, *, length, query):
        import math

        import torch

        from offload.attention.prompt_prior import PageMass
        from offload.attention.quest import fixed_pages
        from offload.kv.page_table import LayerKind, cdiv
        from offload.kv.reads import PageChoice

        eng = self.engine
        if eng.kv.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        ps = eng.config.page_size
        n = cdiv(length, ps)
        fixed = fixed_pages(n)
        allowed = math.floor(self.budget * n + 1e-9)
        if allowed <= len(fixed) or allowed >= n:
            self.fallback = "oracle: nothing to choose"
            return PageChoice(pages=None, needs_query=False)
        if query is None:
            return PageChoice(pages=tuple(fixed), needs_query=True)
        k = torch.cat([g.k for g in eng.kv.reader.layer_groups(seq, layer, 1 << 30)], 1).float()[:, :length]
        cfg = eng.model_config
        q = query.reshape(cfg.num_kv_heads, cfg.group_size, 1, cfg.head_dim).float()
        true_mass = PageMass(q, torch.tensor([length - 1]), scale=eng.runner.scale, page_size=ps, num_pages=n)
        true_mass.add(k, 0)
        mass = true_mass.result()
        mass[fixed] = -1
        best = torch.topk(mass, allowed - len(fixed)).indices.tolist()
        return PageChoice(pages=tuple(sorted({*fixed, *best})), needs_query=False)


def _forced(engine, base, prompt_ids: list[int], cont: list[int]):
    """Teacher-forced logits [len(cont), vocab] of ``cont`` after ``prompt_ids`` on a fork of
    ``base`` (the prompt's prefill exact, each continuation token a decode step), and the
    steps' read fractions."""
    import torch

    engine.check_request(base, len(prompt_ids), len(cont), allow_long_context=True, make_room=True)
    seq = engine.fork(base)
    try:
        rows = [engine.prefill(seq, prompt_ids)[-1]]
        steps = []
        for tok in cont[:-1]:
            rows.append(engine.decode_step(seq, tok)[-1])
            steps.append(engine.last_step)
        return torch.stack(rows).float(), steps
    finally:
        engine.release(seq)


def _log_prob(logits, cont: list[int]) -> float:
    import torch

    lp = torch.log_softmax(logits, dim=-1)
    return float(sum(lp[i, t] for i, t in enumerate(cont)))


def _gold_continuation(codec, exact_ids: list[int], expected: str, hit: bool) -> list[int]:
    """Exact's answer tokens up to the one that completes ``expected`` (every part of an
    aggregate answer; when exact hit), else the expected value's own tokens (parts joined by
    commas)."""
    from bench.qa_set import answer_hits

    if hit:
        for n in range(1, len(exact_ids) + 1):
            if answer_hits(codec.decode(exact_ids[:n]), expected):
                return exact_ids[:n]
    return codec.encode(", ".join(expected.split("|")))


def _with_formats(qa, qas: dict, budgets, modes):
    """(label, F, LongDocQA, selector) of every configuration, exact first: the exact engine's
    selectors (``_selectors``), then per other page format ``fmt`` (its own engine in ``qas``)
    ``fmt`` alone and ``fmt+mode`` for each sparse mode."""
    from offload.attention.selection import ExactSelector

    out = [(label, f, qa, sel) for label, f, sel in _selectors(qa.engine, qa.source, budgets, modes)]
    for fmt, other in qas.items():
        out.append((fmt, 1.0, other, ExactSelector()))
        if fmt in FLOOR_FORMATS:
            continue
        out += [(f"{fmt}+{label}", f, other, sel) for label, f, sel in _selectors(other.engine, other.source, budgets,
                                                                                   modes)
                if label not in ("exact", "sink+window")]
    return out


def run_qa(configs, cases, essays, *, max_new_tokens: int, say, peer_inputs: list | None = None) -> list[dict]:
    from bench.qa_set import answer_hits, fit_facts

    codec = configs[0][2].codec
    rows = []
    for ci, case in enumerate(cases):
        text = fit_facts(case, essays, lambda t: len(codec.qa_prompt(t, "").doc_ids))
        t0 = time.perf_counter()
        docs = {}
        for _, _, qa, _ in configs:  # each page format's own prefill
            if id(qa) not in docs:
                docs[id(qa)] = qa.ingest(text)
        q_ids = codec.qa_prompt("", case.question).question_ids
        results: dict[str, dict] = {}
        for label, f, qa, sel in configs:
            doc = docs[id(qa)]
            qa.engine.selector = sel
            ans = qa.ask(doc, case.question, max_new_tokens=max_new_tokens)
            results[f"{label}@{f:g}"] = {
                "mode": label, "budget": f, "answer": ans.text, "token_ids": ans.token_ids,
                "hit": answer_hits(ans.text, case.expected),
                "kv_fraction_read": ans.stats.kv_fraction_read, "kv_fraction_read_max": ans.stats.kv_fraction_read_max,
                "kv_fraction_fetched": ans.stats.kv_fraction_fetched, "sparse_fallback": ans.stats.sparse_fallback,
                "disk_bytes_per_token": ans.stats.bytes_read_per_token.get("disk", 0),
                "decode_tok_s": ans.stats.decode_tok_s, "selection_s": ans.stats.selection_s}
        exact = results["exact@1"]
        cont = _gold_continuation(codec, exact["token_ids"], case.expected, exact["hit"])
        for label, f, qa, sel in configs:
            qa.engine.selector = sel
            logits, _ = _forced(qa.engine, docs[id(qa)]._seq, q_ids, cont)
            results[f"{label}@{f:g}"]["gold_log_prob"] = _log_prob(logits, cont)
        for r in results.values():
            r["gold_gap"] = r["gold_log_prob"] - exact["gold_log_prob"]
        num_tokens = docs[id(configs[0][2])].num_tokens
        for _, _, qa, _ in configs:
            if id(qa) in docs:
                qa.forget(docs.pop(id(qa)))
        rows.append({"case": case.name, "task": case.task, "tokens": num_tokens, "depth": case.depth,
                     "expected": case.expected, "gold_tokens": len(cont), "results": results})
        if peer_inputs is not None:  # what a peer needs to answer the same case
            peer_inputs.append({"name": case.name, "doc_ids": codec.qa_prompt(text, "").doc_ids,
                                "question_ids": q_ids, "cont_ids": cont})
        marks = " ".join(f"{k}:{'Y' if r['hit'] else '-'}" for k, r in results.items())
        say(f"[{ci + 1}/{len(cases)}] {case.name} {num_tokens} tok depth {case.depth:.2f} "
            f"({time.perf_counter() - t0:.0f}s) {marks}")
    _reset_selectors(configs)
    return rows


def _reset_selectors(configs) -> None:
    """Each engine back to its first configuration's selector (exact)."""
    seen: set[int] = set()
    for _, _, qa, sel in configs:
        if id(qa) not in seen:
            seen.add(id(qa))
            qa.engine.selector = sel


def run_essays(configs, essays, *, tokens: int, steps: int, windows: int, say) -> dict:
    """Teacher-forced next-token agreement and KL against exact over essay continuations:
    ``windows`` texts, each starting at another essay, ``steps`` tokens after ``tokens``."""
    import torch

    from offload.attention.prompt_prior import PRIOR_QUERIES

    codec = configs[0][2].codec
    per: dict[str, list] = {}
    for w in range(windows):
        first = 5 + (w * 11) % max(1, len(essays) - 5)  # each window starts at another essay
        ids = codec.encode("\n\n".join(essays[first:] + essays[:first]))[: tokens + steps]
        if len(ids) < tokens + steps:
            raise SystemExit(f"the essays hold {len(ids)} tokens, fewer than {tokens + steps}")
        bases = {}
        for _, _, qa, _ in configs:  # each page format's own prefill
            eng = qa.engine
            if id(eng) in bases:
                continue
            eng.check_document(tokens, allow_long_context=True)
            bases[id(eng)] = base = eng.new_sequence()
            # The last PRIOR_QUERIES tokens are each fork's own prefill: a prompt tail whose
            # attention makes the prompt prior, as a generate over the whole text would have.
            eng.prefill(base, ids[:tokens - PRIOR_QUERIES], document=True)
            eng.add_document(base)
        prompt, cont = ids[tokens - PRIOR_QUERIES:tokens], ids[tokens:tokens + steps]
        ref = None
        for label, f, qa, sel in configs:
            eng = qa.engine
            eng.selector = sel
            logits, step_reads = _forced(eng, bases[id(eng)], prompt, cont)
            if ref is None:
                ref = logits
            agree = (logits.argmax(-1) == ref.argmax(-1)).float()
            kl = torch.nn.functional.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1),
                                            log_target=True, reduction="none").sum(-1)
            per.setdefault(f"{label}@{f:g}", []).append((label, f, agree, kl, [s.fraction_read for s in step_reads]))
        for _, _, qa, _ in configs:
            if id(qa.engine) in bases:
                qa.engine.release(bases.pop(id(qa.engine)))
        _reset_selectors(configs)
    out = {}
    for key, items in per.items():
        agree = torch.cat([a for *_, a, _, _ in items])
        kl = torch.cat([k for *_, k, _ in items])
        fr = [x for *_, f in items for x in f]
        out[key] = {"mode": items[0][0], "budget": items[0][1], "top1_agreement": float(agree.mean()),
                    "kl": float(kl.mean()), "tokens_compared": int(agree.numel()), "windows": windows,
                    "top1_by_window": [float(a.mean()) for *_, a, _, _ in items],
                    "kv_fraction_read": statistics.fmean(fr), "kv_fraction_read_max": max(fr)}
        say(f"essays {tokens} tok: {key} top-1 {out[key]['top1_agreement']:.3f} over {agree.numel()} tokens "
            f"(windows {', '.join(f'{x:.2f}' for x in out[key]['top1_by_window'])}) KL {out[key]['kl']:.4f} "
            f"read max {max(fr):.3f}")
    return out


def summarize(rows: list[dict], min_tokens: int) -> dict[str, dict]:
    """Per configuration over the cases of at least ``min_tokens`` tokens."""
    rows = [r for r in rows if r["tokens"] >= min_tokens]
    if not rows:
        return {}
    out = {}
    for key in rows[0]["results"]:
        exact_right = [r for r in rows if r["results"]["exact@1"]["hit"]]
        res = [r["results"][key] for r in rows]
        out[key] = {
            "cases": len(rows), "hits": sum(x["hit"] for x in res),
            "misses_of_exact_right": sum(not r["results"][key]["hit"] for r in exact_right),
            "exact_right": len(exact_right),
            "median_gold_gap": statistics.median(r["results"][key]["gold_gap"] for r in rows),
            "kv_fraction_read_max": max(x["kv_fraction_read_max"] or 0 for x in res),
            "kv_fraction_fetched": statistics.fmean(x["kv_fraction_fetched"] or 0 for x in res),
            "fallback_cases": sum(bool(x["sparse_fallback"]) for x in res)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--per-task", type=int, nargs="+", default=[3],
                   help="cases per task and length: one count, or one per length (fewer at the longest lengths)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--modes", nargs="+", default=["quest"], choices=["quest", "quest-classic", "oracle", "speculative", "lsh", "lsh-prior"])
    p.add_argument("--kv-formats", nargs="+", default=[], choices=[f for f in FORMATS if f != "exact"],
                   help="page formats run beside exact, each on its own engine and prefill: the format alone "
                        "and with each sparse mode (4bit-exact-prefill: 4-bit pages, the prompt prefilled as one "
                        "chunk, so it attends itself exactly and is quantized at the end; exact-blas: exact "
                        "with torch's BLAS for a decode token's products, the floor of the agreement metrics)")
    p.add_argument("--lsh-bits", type=int, default=None, help="lsh mode: SimHash bits per table (default: the engine's)")
    p.add_argument("--lsh-tables", type=int, default=None, help="lsh mode: tables (default: the engine's)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--device-memory", default="24MiB", help="DEVICE KV budget (small: the KV spills)")
    p.add_argument("--essay-tokens", type=int, nargs="*", default=[8192])
    p.add_argument("--essay-steps", type=int, default=64)
    p.add_argument("--essay-windows", type=int, default=3, help="essay texts continued (each its own prefill)")
    p.add_argument("--limit", type=int, default=None, help="only the first N QA cases")
    p.add_argument("--tasks", nargs="+", default=["single", "lookalike", "chain"],
                   choices=["single", "lookalike", "chain", "aggregate"],
                   help="QA tasks (aggregate: three facts far apart, all asked at once; not in the default set)")
    p.add_argument("--peers", nargs="*", default=[], choices=["kvpress"],
                   help="kvpress (SnapKV, StreamingLLM at each budget; make peer-kvpress) on the same QA cases")
    p.add_argument("--json-out", type=Path, default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    say = (lambda *_: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if not SHARED_ESSAYS.is_dir():
        print(f"no essays at {SHARED_ESSAYS.relative_to(ROOT.parent)}: nothing to measure", file=sys.stderr)
        return 0
    from bench.qa_set import build_cases, qa_essays
    from offload.api import LongDocQA
    from offload.config import RuntimeConfig

    config = RuntimeConfig(device_memory_bytes=args.device_memory, host_memory_bytes=0)
    per_task = args.per_task[0] if len(args.per_task) == 1 else tuple(args.per_task)
    cases = build_cases(tuple(args.lengths), per_task=per_task, tasks=tuple(args.tasks))[: args.limit]
    essays = qa_essays(SHARED_ESSAYS)
    with contextlib.ExitStack() as stack:
        def open_qa(fmt: str):
            cfg = dataclasses.replace(config, **FORMATS[fmt])
            return stack.enter_context(LongDocQA(args.model, config=cfg, doc_cache=False, allow_long_context=True))

        qa = open_qa("exact")
        if {"lsh", "lsh-prior"} & set(args.modes):  # every sequence hashes its keys, so the lsh selector can sample them
            from offload.attention.lsh import lsh_params

            qa.engine.lsh_params = lsh_params(seed=0, bits=args.lsh_bits, tables=args.lsh_tables)
        configs = _with_formats(qa, {fmt: open_qa(fmt) for fmt in args.kv_formats}, args.budgets, args.modes)
        print(f"model {args.model}; DEVICE {args.device_memory}, HOST 0 (global KV on DISK); page "
              f"{qa.engine.config.page_size} tokens; {len(cases)} QA cases at {args.lengths} tokens; "
              f"configurations: {', '.join(f'{l}@{f:g}' for l, f, _, _ in configs)}")
        inputs: list[dict] = []
        rows = run_qa(configs, cases, essays, max_new_tokens=args.max_new_tokens, say=say, peer_inputs=inputs)
        peers = {}
        if "kvpress" in args.peers:
            from bench.fidelity_peers import run_kvpress

            why = run_kvpress(rows, inputs, args.budgets, qa, max_new_tokens=args.max_new_tokens, say=say)
            peers["kvpress"] = why or "measured"
            print(f"peer kvpress: {why or 'measured'}")
        continuation = {n: run_essays(configs, essays, tokens=n, steps=args.essay_steps,
                                       windows=args.essay_windows, say=say)
                        for n in args.essay_tokens}
    report = {"model": args.model, "lengths": args.lengths, "budgets": args.budgets, "cases": rows,
              "summary_4k_plus": summarize(rows, 4000), "summary_short": summarize([r for r in rows if r["tokens"] < 4000], 0),
              "continuation": continuation, "peers": peers}
    for title, summ in (("cases of 4K tokens and more", report["summary_4k_plus"]),
                        ("cases under 4K tokens", report["summary_short"])):
        if not summ:
            continue
        print(f"\n{title}")
        print(f"{'config':<24}{'hits':>6}{'misses/exact-right':>20}{'median gap':>12}{'read max':>10}"
              f"{'fetched':>9}{'fallback':>9}")
        for key, s in summ.items():
            print(f"{key:<24}{s['hits']:>3}/{s['cases']:<3}{s['misses_of_exact_right']:>12}/{s['exact_right']:<7}"
                  f"{s['median_gold_gap']:>12.3f}{s['kv_fraction_read_max']:>10.3f}{s['kv_fraction_fetched']:>9.3f}"
                  f"{s['fallback_cases']:>9}")
    for n, cont in continuation.items():
        print(f"\nessay continuation at {n} tokens ({args.essay_windows} texts x {args.essay_steps} teacher-forced steps)")
        for key, c in cont.items():
            print(f"{key:<24} top-1 agreement {c['top1_agreement']:.3f}  KL {c['kl']:.4f}  read max "
                  f"{c['kv_fraction_read_max']:.3f}")
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
