"""How well page scores rank pages: attention mass captured by each scorer's choice at F.

    python bench/selector_quality.py [--model gemma3-270m] [--tokens 8192] [--cases 4] [--steps 8]

Each QA document (``bench/qa_set.py``) is ingested with every page on DEVICE; the question
is prefilled and an exact greedy answer decoded. At every decode step and global layer the
live query is scored against the layer's pages by each scorer, and the pages it would choose
at budget F (its own metadata paid from F, as ``QuestSelector`` pays its bounds) are compared
with the true attention of that query over every key:

- coverage: attention mass on the chosen pages (sink, window and tail included), averaged
  over query heads: 1 - coverage is the mass a sparse step drops;
- recall: share of the true top pages (ranked by their largest mass in any head, as many as
  the scorer chooses) that it chose;
- spearman: rank correlation of the score with that mass over the candidate pages.

Scorers: ``oracle`` (the true mass: an upper bar, not a selector), ``quest`` (page bounds,
each KV head's bounds softmaxed, max over heads: what ``QuestSelector`` does), ``quest-raw``
(the bounds maxed over heads, unnormalized), ``quest-G`` (bounds over G-token groups inside
a page, a page scoring its best group; 32/G times the metadata), ``center`` (q . the bounds'
midpoint), ``mean`` (q . the page's mean key; half the metadata of the bounds), and
``sink+window`` (no scores). The true mass is evaluation only: no scorer sees it.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHARED_ESSAYS = ROOT.parent / "shared" / "data" / "haystack" / "paul_graham"


def _spearman(a, b) -> float:
    if a.numel() < 3:
        return float("nan")
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum()) / den if den else float("nan")


class Probe:
    """A selector that attends every page (the answer stays exact's) and scores the pages
    with each scorer on the way (query=None asks for the query)."""

    def __init__(self, engine, budgets: list[float]) -> None:
        self.engine, self.budgets = engine, budgets
        self.fallback, self.bounds_bytes, self.selection_s = "", 0, 0.0
        self.rows: list[dict] = []
        self.fact_pages: set[int] = set()  # pages holding the case's facts (evaluation only)
        self.question_q: dict[int, object] = {}  # layer -> the question's queries [Tq, heads, hd]
        self.question_len = 0
        real_qkv = engine.runner.qkv

        def qkv(layer, h, pos):  # records the question prefill's queries (a few dozen tokens)
            q, k, v = real_qkv(layer, h, pos)
            if 1 < h.shape[0] < 512:
                self.question_q[layer] = q.detach().float().clone()
                self.question_len = int(pos[-1]) + 1
            return q, k, v
        engine.runner.qkv = qkv

    def choose(self, seq, layer, *, length, query):
        from offload.kv.page_table import LayerKind
        from offload.kv.reads import PageChoice

        if self.engine.kv.kinds[layer] == LayerKind.SLIDING:
            return PageChoice(pages=None, needs_query=False)
        if query is None:
            return PageChoice(pages=None, needs_query=True)
        self._measure(seq, layer, length, query)
        return PageChoice(pages=None, needs_query=False)

    def _measure(self, seq, layer: int, length: int, query) -> None:
        import torch

        from offload.attention.prompt_prior import PageMass
        from offload.attention.quest import fixed_pages

        eng = self.engine
        cfg, ps, scale = eng.model_config, eng.config.page_size, eng.runner.scale
        groups = list(eng.kv.reader.layer_groups(seq, layer, 1 << 30))
        k = torch.cat([g.k for g in groups], 1).float()[:, :length]  # [nkv, T, hd]
        nkv, t, hd = k.shape
        n = -(-t // ps)
        q = query.reshape(nkv, cfg.group_size, hd).float()
        true_mass = PageMass(q[:, :, None], torch.tensor([t - 1]), scale=scale, page_size=ps, num_pages=n)
        true_mass.add(k, 0)
        mass = true_mass.shares()[:, 0]  # [heads, n]: the live query's true attention per page
        importance = mass.amax(0)
        kp = torch.cat([k, k[:, -1:].expand(nkv, n * ps - t, hd)], 1).reshape(nkv, n, ps, hd)
        fixed = fixed_pages(n)
        cand = torch.tensor([p for p in range(n) if p not in set(fixed)], dtype=torch.long)
        if len(cand) < 2:
            return

        def bounds_score(g: int):
            kg = kp.reshape(nkv, n, ps // g, g, hd)
            lo, hi = kg.amin(3), kg.amax(3)  # [nkv, n, groups, hd]
            b = (torch.einsum("hgd,hnjd->hgnj", q, (lo + hi) / 2)
                 + torch.einsum("hgd,hnjd->hgnj", q.abs(), (hi - lo) / 2)) * scale
            return b.amax(-1).amax(1)  # [nkv, n]: best group, max over the KV group's heads

        page_bounds = bounds_score(ps)
        lo, hi = kp.amin(2), kp.amax(2)
        scorers = {
            "oracle": (importance, 0.0),
            "quest": (torch.softmax(page_bounds[:, cand], 1).amax(0), 1 / ps),
            "quest-raw": (page_bounds[:, cand].amax(0), 1 / ps),
            "center": ((torch.einsum("hgd,hnd->hgn", q, (lo + hi) / 2) * scale).amax(1)[:, cand]
                       .softmax(1).amax(0), 1 / ps),
            "mean": ((torch.einsum("hgd,hnd->hgn", q, kp.mean(2)) * scale).amax(1)[:, cand]
                     .softmax(1).amax(0), 0.5 / ps),
        }
        for g in (16, 8):
            if ps % g == 0 and g < ps:
                scorers[f"quest-{g}"] = (torch.softmax(bounds_score(g)[:, cand], 1).amax(0), 1 / g)
        scorers["oracle"] = (importance[cand], 0.0)
        qq = self.question_q.get(layer)
        if qq is not None:  # the question's own attention over the document (its exact prefill)
            tq = qq.shape[0]
            kq = k[:, : self.question_len]
            lq = torch.einsum("thd,hkd->thk", qq.reshape(tq, nkv, -1, hd).reshape(tq, -1, hd),
                              kq.repeat_interleave(cfg.group_size, 0)) * scale
            pq = torch.softmax(lq, -1)  # [tq, heads, keys] (causality ignored: the last few keys)
            nq = -(-kq.shape[1] // ps)
            pq = torch.cat([pq, torch.zeros(tq, pq.shape[1], nq * ps - kq.shape[1])], -1)
            per = pq.reshape(tq, -1, nq, ps).sum(-1).amax(1)  # [tq, nq]
            for name, pv in (("question", per.mean(0)), ("question-max", per.amax(0)), ("question-last", per[-1])):
                prior = torch.zeros(n)
                prior[:nq] = pv
                scorers[name] = (prior[cand] / prior[cand].sum().clamp_min(1e-12), 0.0)
            prior_c = scorers["question"][0]
            scorers["quest+question"] = (0.5 * scorers["quest"][0] / scorers["quest"][0].sum() + 0.5 * prior_c, 1 / ps)
            scorers["mean+question"] = (0.5 * scorers["mean"][0] / scorers["mean"][0].sum() + 0.5 * prior_c,
                                        0.5 / ps)
        row = {"layer": layer, "pages": n}
        pooled = {}
        if "question" in scorers:  # live bounds scanned only over a pool the question's attention names
            prior_c = scorers["question"][0]
            live = torch.softmax(page_bounds[:, cand], 1)  # per KV head, over the candidates
            for mult in (2, 3):
                pooled[f"pool{mult}"] = (prior_c, live, mult)
            for share in (0.5, 0.75):  # that share of the pages by the prior alone, the rest by live bounds
                pooled[f"split{int(share * 100)}"] = (prior_c, live, -share)
        for f in self.budgets:
            for name, (score, meta) in [*scorers.items(), ("sink+window", (None, 0.0)),
                                        *[(k, (None, 0.0)) for k in pooled]]:
                if name in pooled and pooled[name][2] < 0:
                    prior_c, live, share = pooled[name][0], pooled[name][1], -pooled[name][2]
                    base = math.floor(f * n + 1e-9) - len(fixed)
                    take = 0
                    for take_try in range(base, 0, -1):
                        by_prior = max(1, round(share * take_try))
                        rest = take_try - by_prior
                        pool_n = min(len(cand) - by_prior, 2 * rest)
                        if len(fixed) + take_try + pool_n / ps <= f * n + 1e-9:
                            take = take_try
                            break
                    if take < 1:
                        continue
                    order = torch.argsort(prior_c, descending=True)
                    first = order[:by_prior]
                    pool = order[by_prior:by_prior + pool_n]
                    lv = live[:, pool]
                    lv = (lv / lv.sum(1, keepdim=True).clamp_min(1e-12)).amax(0) if pool_n else lv.sum(0)
                    second = pool[torch.topk(lv, min(rest, pool_n)).indices] if rest and pool_n else pool[:0]
                    chosen = [*fixed, *cand[first].tolist(), *cand[second].tolist()]
                    score = torch.zeros(len(cand))
                    score[first] = 2.0
                    score[second] = 1.0
                elif name in pooled:
                    prior_c, live, mult = pooled[name]
                    base = math.floor(f * n + 1e-9) - len(fixed)
                    pool_n = take = 0
                    for take_try in range(base, 0, -1):  # the pool's bounds are paid from F
                        pool_n = min(len(cand), mult * take_try)
                        if len(fixed) + take_try + pool_n / ps <= f * n + 1e-9:
                            take = take_try
                            break
                    if take < 1:
                        continue
                    pool = torch.topk(prior_c, pool_n).indices
                    lv = live[:, pool]
                    lv = (lv / lv.sum(1, keepdim=True)).amax(0)
                    pr = prior_c[pool] / prior_c[pool].sum().clamp_min(1e-12)
                    sc = 0.5 * lv / lv.sum() + 0.5 * pr
                    chosen = [*fixed, *cand[pool[torch.topk(sc, take).indices]].tolist()]
                    score = torch.zeros(len(cand))
                    score[pool] = sc
                elif score is None:  # sink + the most recent pages
                    allowed = math.floor(f * n + 1e-9)
                    take = allowed - len(fixed)
                    if take < 1:
                        continue
                    chosen = [*fixed, *[p for p in range(n - 1, 0, -1) if p not in fixed][:take]]
                else:
                    allowed = math.floor(f * n - len(cand) * meta + 1e-9)
                    take = allowed - len(fixed)
                    if take < 1:
                        continue
                    chosen = [*fixed, *cand[torch.topk(score, min(take, len(cand))).indices].tolist()]
                idx = torch.tensor(sorted(set(chosen)), dtype=torch.long)
                coverage = float(mass[:, idx].sum(1).mean())
                true_top = set(cand[torch.topk(importance[cand], min(take, len(cand))).indices].tolist())
                recall = len(true_top & set(chosen)) / max(1, len(true_top))
                rho = _spearman(score, importance[cand]) if score is not None else float("nan")
                fact = float(all(p in set(chosen) for p in self.fact_pages)) if self.fact_pages else float("nan")
                row[f"{name}@{f:g}"] = {"coverage": coverage, "recall": recall, "spearman": rho, "take": take,
                                        "fact": fact}
        self.rows.append(row)


def _fact_pages(qa, text: str, case, page_size: int) -> set[int]:
    """Pages of the prompt's document tokens that hold the case's facts: each fact's tokens
    (its first and last dropped: they may merge with the neighbouring newlines) found in the
    prompt's ids."""
    ids = qa.codec.qa_prompt(text, "").doc_ids
    pages = set()
    for _, fact in case.facts:
        f = qa.codec.encode(fact)
        f = [t for t in f if t not in (qa.codec.tok.bos_token_id,)][1:-1]
        for i in range(len(ids) - len(f) + 1):
            if ids[i:i + len(f)] == f:
                pages.update(range(i // page_size, (i + len(f) - 1) // page_size + 1))
                break
        else:
            raise RuntimeError(f"fact not found in the prompt's tokens: {fact!r}")
    return pages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="decode steps per case")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    if not SHARED_ESSAYS.is_dir():
        print("no essays in the shared haystack directory: nothing to measure", file=sys.stderr)
        return 0
    from bench.qa_set import build_cases, fit_facts, qa_essays
    from offload.api import LongDocQA

    cases = build_cases((args.tokens,), per_task=-(-args.cases // 3), seed=1)[: args.cases]
    essays = qa_essays(SHARED_ESSAYS)
    rows: list[dict] = []
    with LongDocQA(args.model, doc_cache=False, allow_long_context=True) as qa:
        probe = Probe(qa.engine, args.budgets)
        for case in cases:
            text = fit_facts(case, essays, lambda s: len(qa.codec.qa_prompt(s, "").doc_ids))
            doc = qa.ingest(text)
            probe.fact_pages = _fact_pages(qa, text, case, qa.engine.config.page_size)
            qa.engine.selector = probe
            ans = qa.ask(doc, case.question, max_new_tokens=args.steps + 1)
            print(f"{case.name}: {ans.text!r} (expected {case.expected})", file=sys.stderr)
            qa.forget(doc)
        rows = probe.rows
    keys = sorted({k for r in rows for k in r if "@" in k}, key=lambda k: (float(k.split("@")[1]), k))
    print(f"model {args.model}, {args.tokens} tokens, {len(cases)} cases, {args.steps} steps: "
          f"{len(rows)} (step, global layer) samples")
    print(f"{'scorer@F':<22}{'coverage':>10}{'min':>8}{'recall':>8}{'spearman':>10}{'pages':>7}{'facts':>7}")
    summary = {}
    for key in keys:
        vals = [r[key] for r in rows if key in r]
        cov = [v["coverage"] for v in vals]
        rho = [v["spearman"] for v in vals if not math.isnan(v["spearman"])]
        summary[key] = {"coverage_mean": statistics.fmean(cov), "coverage_min": min(cov),
                        "recall": statistics.fmean(v["recall"] for v in vals),
                        "spearman": statistics.fmean(rho) if rho else None, "take": vals[0]["take"],
                        "facts": statistics.fmean(v["fact"] for v in vals)}
        s = summary[key]
        print(f"{key:<22}{s['coverage_mean']:>10.3f}{s['coverage_min']:>8.3f}{s['recall']:>8.3f}"
              f"{(s['spearman'] if s['spearman'] is not None else float('nan')):>10.3f}{s['take']:>7}"
              f"{s['facts']:>7.2f}")
    if args.json_out:
        args.json_out.write_text(json.dumps({"summary": summary, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
