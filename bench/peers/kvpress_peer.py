"""kvpress peer of the fidelity harness (``bench/fidelity.py --peers kvpress``), run in its own
venv (`make peer-kvpress`: kvpress needs transformers < 5.3) as
``.peers/kvpress/bin/python bench/peers/kvpress_peer.py REQUEST.json``.

The request (written by the harness) names the converted checkpoint and, per QA case, the
document's ids, the question's ids and the gold continuation's ids (exact mode's answer), the
presses and the budgets F. For each case, press and F: the document is prefilled through the
press with ``compression_ratio = 1 - F`` (kvpress keeps F of the pressed layers' KV; its
pipeline does the same: the question comes after the compression, so one compressed document
serves every question, as a DocCache does); then the question and a greedy answer, with
position ids continuing the document's (kvpress's pipeline does that too); and, on a copy of the
compressed cache, the question and the gold continuation teacher-forced for its log-probability.

On Gemma 3 the press is hooked on the global layers only: kvpress does so for
``Gemma3ForConditionalGeneration`` (a sliding layer keeps its window), and our F counts the
global layers' bytes alone. Prints one JSON line: per case, per "press@F", the answer ids and the
gold log-probability.
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys

import torch
from importlib.metadata import version

from kvpress import SnapKVPress, StreamingLLMPress
from transformers import AutoModelForCausalLM, DynamicCache

PRESSES = {"snapkv": SnapKVPress, "streamingllm": StreamingLLMPress}


@contextlib.contextmanager
def pressed(press, model):
    """kvpress's hooks on the attention layers that grow with the context."""
    press.post_init_from_model(model)
    hooks = []
    try:
        for layer in model.model.layers:
            if getattr(layer.self_attn, "is_sliding", False):
                continue
            hooks.append(layer.self_attn.register_forward_hook(press.forward_hook, with_kwargs=True))
        yield
    finally:
        for h in hooks:
            h.remove()


def _step(model, ids: list[int], cache, start: int) -> torch.Tensor:
    pos = torch.arange(start, start + len(ids)).unsqueeze(0)
    out = model(input_ids=torch.tensor([ids]), past_key_values=cache, position_ids=pos, use_cache=True)
    return out.logits[0]


def main(path: str) -> int:
    req = json.loads(open(path).read())
    dtype = getattr(torch, req["dtype"])
    model = AutoModelForCausalLM.from_pretrained(req["checkpoint"], dtype=dtype, attn_implementation="eager").eval()
    eos = set(req.get("eos_ids") or [])
    out: dict[str, dict] = {}
    with torch.inference_mode():
        for case in req["cases"]:
            doc, question, cont = case["doc_ids"], case["question_ids"], case["cont_ids"]
            res = out.setdefault(case["name"], {})
            for name in req["presses"]:
                for f in req["budgets"]:
                    cache = DynamicCache(config=model.config)
                    with pressed(PRESSES[name](compression_ratio=1.0 - f), model):
                        _step(model, doc, cache, 0)
                    gold_cache = copy.deepcopy(cache)
                    logits = _step(model, question, cache, len(doc))
                    answer, pos = [], len(doc) + len(question)
                    for _ in range(req["max_new_tokens"]):
                        tok = int(logits[-1].argmax())
                        answer.append(tok)
                        if tok in eos:
                            break
                        logits = _step(model, [tok], cache, pos)
                        pos += 1
                    forced = _step(model, question + cont, gold_cache, len(doc))
                    logp = torch.log_softmax(forced[len(question) - 1:-1].double(), dim=-1)
                    gold = float(logp[torch.arange(len(cont)), torch.tensor(cont)].sum())
                    res[f"{name}@{f:g}"] = {"answer_ids": answer, "gold_log_prob": gold}
            print(f"kvpress: {case['name']} done", file=sys.stderr, flush=True)
    print(json.dumps({"results": out, "note": f"kvpress {version('kvpress')}, eager attention, {req['dtype']}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
