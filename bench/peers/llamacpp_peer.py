"""llama.cpp peer of `offload bench`, run in its own venv (`make peer-llamacpp`) as
``.peers/llamacpp/bin/python bench/peers/llamacpp_peer.py REQUEST.json``.

The request (written by ``offload.commands.bench_peers``) names the GGUF file, the prompts'
ids (one per context: the model loads once), the decode steps, the repetitions and the threads. The same ids are evaluated (no tokenizer
round trip), greedy decode by argmax of the logits, the KV cache in fp32 (``type_k``/``type_v``
GGML F32, flash attention off so that an F32 V cache is allowed), batch size 1. One untimed
short evaluation first. Prints one JSON line: per prompt, prefill seconds and decode seconds per
token per repetition and the tokens of the last repetition; what ran.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama, __version__

GGML_TYPE_F32 = 0


def measure(llm: Llama, ids: list[int], decode: int, reps: int) -> dict:
    vocab = llm.n_vocab()

    def last() -> int:  # the last evaluated token's logits (the only row kept without logits_all)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    prefill, per_token, toks = [], [], []
    for _ in range(reps):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        tok = last()
        t1 = time.perf_counter()
        toks = [tok]
        for _ in range(decode):
            llm.eval([tok])
            tok = last()
            toks.append(tok)
        t2 = time.perf_counter()
        prefill.append(t1 - t0)
        per_token.append((t2 - t1) / decode)
    return {"prefill_s": prefill, "decode_s_per_token": per_token, "tokens": toks}


def main(path: str) -> int:
    req = json.loads(open(path).read())
    prompts, decode, reps, threads = req["prompts"], req["decode"], req["reps"], req["threads"]
    longest = max(len(ids) for ids in prompts)
    llm = Llama(model_path=req["gguf"], n_ctx=longest + decode + 8, n_batch=512, n_ubatch=512, n_threads=threads,
                n_threads_batch=threads, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False,
                logits_all=False, verbose=False)
    llm.reset()
    llm.eval(prompts[0][:32])  # untimed: first touches of the weights
    results = [{**measure(llm, ids, decode, reps), "threads": threads} for ids in prompts]
    print(json.dumps({"results": results, "note": f"llama-cpp-python {__version__}, built with GGML_NATIVE=OFF; "
                      f"n_batch 512, n_ctx {longest + decode + 8}"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
