"""What the benchmarks run, shared by ``offload bench``'s single-context rows and its sweep:
the essay prompt, a timed prefill, decode steps on a copy-on-write fork, the DISK reads of a
step without compute (the cold read bandwidth), and transformers' greedy loops as peers."""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch

from offload.commands.bench_report import Result
from offload.engine import Engine
from offload.model.model_source import ModelSource
from offload.stats import RunStats

__all__ = ["prompt_ids", "prefilled", "decode_fork", "time_disk_reads", "hf_loop", "HFPeers"]


def prompt_ids(source: ModelSource, n: int) -> list[int]:
    if source.tokenizer_dir is None:  # random weights of a named shape: random ids
        gen = torch.Generator().manual_seed(0)
        return torch.randint(0, source.config.vocab_size, (n,), generator=gen).tolist()
    from offload.commands.needle import package_essays_dir
    from offload.model.text import load_codec

    codec = load_codec(source.tokenizer_dir, source.config.vocab_size, source.config.eos_token_ids)
    text, ids = "", []
    for path in sorted(package_essays_dir().glob("*.txt")):
        text += path.read_text(encoding="utf-8") + "\n\n"
        if len(text) > 6 * n:
            ids = codec.encode(text)
            if len(ids) >= n:
                break
    ids = codec.encode(text) if not ids else ids
    while len(ids) < n:  # short essays: repeat
        ids = ids + ids
    return ids[:n]


def prefilled(engine: Engine, ids: list[int]) -> Any:
    seq = engine.new_sequence()
    engine.forward(seq, ids)
    engine.kv.writes.flush()
    return seq


def decode_fork(engine: Engine, doc: Any, tok: int, decode: int) -> tuple[RunStats, list[int]]:
    """Decode ``decode`` steps after ``tok`` on a copy-on-write fork of ``doc`` (released after):
    the run's stats and the generated ids."""
    fork = engine.fork(doc)
    stats = RunStats()
    toks = list(engine.generate(fork, [tok], max_new_tokens=decode + 1, stats=stats))
    engine.release(fork)
    return stats, toks


def time_disk_reads(engine: Engine, seq: Any) -> tuple[int, float]:
    """Read every DISK page of ``seq`` once as a decode step does (the chunks of the step's
    exact read sets, the same staging depth and reader threads), without compute:
    (bytes, seconds)."""
    kv = engine.kv
    if kv.readahead is None or kv.disk is None:
        return 0, 0.0
    kv.writes.flush()
    routes = engine.decode_attention.routes
    chunks = [c for layer in range(engine.model_config.num_layers)
              for c in kv.reader.layer_reads(seq, layer, rule=routes).chunks()]
    t0 = time.perf_counter()
    kv.readahead.plan(chunks)
    for c in chunks:
        buf, _ = kv.readahead.take(c)
        kv.readahead.give_back(buf)
    return sum(c.num_pages for c in chunks) * kv.disk.disk_page_bytes, time.perf_counter() - t0


def hf_loop(model: Any, cache: Any, ids: list[int], decode: int) -> tuple[float, float, list[int]]:
    # past_key_values= works in every transformers 5.x (its rename to cache= warns in 5.24)
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    dev = next(model.parameters()).device
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(torch.tensor([ids], device=dev), past_key_values=cache, logits_to_keep=1, use_cache=True)
        tok = int(out.logits[0, -1].argmax())  # .item() syncs: the clock reads after the device is done
        t1 = time.perf_counter()
        toks = [tok]
        for i in range(decode):
            pos = torch.tensor([len(ids) + i], device=dev)
            out = model(torch.tensor([[tok]], device=dev), past_key_values=cache, cache_position=pos, use_cache=True)
            tok = int(out.logits[0, -1].argmax())
            toks.append(tok)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1, toks


class HFPeers:
    """transformers on the same checkpoint, with its DynamicCache and StaticCache: one untimed
    forward at load (the process's first is slower; of the first ``warm_tokens`` of the prompt, default
    all of it), then ``rep`` times one repetition of each."""

    def __init__(self, source: ModelSource, ids: list[int], decode: int, progress, device: torch.device,
                 dtype: torch.dtype, warm_tokens: int | None = None) -> None:
        import transformers
        from transformers import AutoModelForCausalLM

        transformers.utils.logging.disable_progress_bar()  # the bench shows its own progress
        self.model = AutoModelForCausalLM.from_pretrained(str(source.weights_dir), dtype=dtype).to(device).eval()
        config = self.model.config
        self.makers = {
            "HF DynamicCache": lambda: transformers.DynamicCache(config=config),
            "HF StaticCache": lambda: transformers.StaticCache(config=config, max_cache_len=len(ids) + decode + 1),
        }
        self.results = {name: Result(name, "transformers") for name in self.makers}
        self.ids, self.decode, self.progress = ids, decode, progress
        hf_loop(self.model, self.makers["HF DynamicCache"](), ids[:warm_tokens], 1)

    def rep(self) -> None:
        for name, make in self.makers.items():
            pre, dec, toks = hf_loop(self.model, make(), self.ids, self.decode)
            res = self.results[name]
            res.prefill_s.append(pre)
            res.decode_s.append(dec)
            res.tokens = toks
            self.progress()
