"""The engine: layer-wise prefill and paged decode of a Llama-family model.

Schedule of ``forward`` (prefill of T tokens, or a decode step when T = 1)::

    h = embed(ids)                                  [T, hidden]
    for layer l:                                    (one layer at a time: layer-wise prefill)
        for each chunk of <= prefill_chunk_tokens tokens:
            q, k, v = qkv(l, h[chunk])
            append k, v to the sequence's pages of layer l
            attention of q over the layer's pages, as (out, lse) partials over page groups,
                merged by log-sum-exp
            h[chunk] = o_proj + MLP
    logits of the last positions

Peak memory is the weights + the KV arena + h + one chunk's working set (scores of one
partial are bounded by ``attn_scores_bytes``); no layer's K/V exists outside its pages.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence

import psutil
import torch

from cpu_kernels import flash_torch
from gpu_kernels.reference import attention_partial_ref, merge_partials_ref
from offload.config import RuntimeConfig
from offload.errors import CapacityError, ContextTooLongError, InputError
from offload.llama import LlamaRunner
from offload.model_config import ModelConfig
from offload.model_source import ModelSource
from offload.paged_kv import KVSequence, PagedKV
from offload.sampling import Sampler, SamplingConfig
from offload.stats import RunStats
from offload.weights import load_checkpoint, random_weights
from storage import DeviceArena, Tier

__all__ = ["Engine", "LayerCallback"]

logger = logging.getLogger(__name__)

LayerCallback = Callable[[int, int], None]  # (layers done, num layers)

# Largest page group one fused attention partial covers.
FUSED_GROUP_TOKENS = 65536


class Engine:
    """Runs one model over paged KV sequences.

    Args:
        source: where config, weights and tokenizer come from.
        config: runtime options.
    """

    def __init__(self, source: ModelSource, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.device = self.config.resolved_device()
        self.dtype = self.config.resolved_dtype(self.device)
        self.kv_dtype = self.config.kv_dtype or self.dtype
        self.model_config: ModelConfig = source.config
        cfg = self.model_config
        if source.weights_dir is None:
            weights = random_weights(cfg, dtype=self.dtype, device=self.device, seed=self.config.seed)
        else:
            weights = load_checkpoint(source.weights_dir, cfg, dtype=self.dtype, device=self.device)
        self.runner = LlamaRunner(cfg, weights, device=self.device)
        self.arena = DeviceArena(
            num_slots=self._arena_slots(),
            num_kv_heads=cfg.num_kv_heads,
            page_size=self.config.page_size,
            head_dim=cfg.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.kv = PagedKV(self.arena, cfg.num_layers, shuffle_seed=self.config.shuffle_pages_seed)
        logger.info(
            "engine: %s on %s, %s weights %.2f GiB, KV arena %d pages of %d tokens (%.2f GiB, %s)",
            source.name, self.device, self.dtype, self.runner.weights_bytes / 2**30, self.arena.num_slots,
            self.config.page_size, self.arena.num_slots * self.arena.slot_bytes / 2**30, self.kv_dtype,
        )

    # ----- sizing -------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return self.model_config.kv_bytes_per_token(torch.empty((), dtype=self.kv_dtype).element_size())

    @property
    def max_context(self) -> int:
        return self.model_config.max_position_embeddings

    def _arena_slots(self) -> int:
        cfg, ps = self.model_config, self.config.page_size
        slot_bytes = 2 * cfg.num_kv_heads * ps * cfg.head_dim * torch.empty((), dtype=self.kv_dtype).element_size()
        budget = self.config.device_memory_bytes
        if budget is None:
            if self.device.type == "cuda":
                # GPU memory is reserved up front: the full context of one sequence plus
                # copy-on-write tails of a few forks, at most half of what is free.
                want = (-(-cfg.max_position_embeddings // ps) + 4) * cfg.num_layers * slot_bytes
                budget = min(want, torch.cuda.mem_get_info(self.device)[0] // 2)
            else:
                # RAM pages are touched only when written, so the budget can be generous.
                budget = psutil.virtual_memory().available // 2
        slots = budget // slot_bytes
        if slots < 1:
            raise CapacityError(
                f"--device-memory {budget} bytes holds no KV page; one page is {slot_bytes} bytes "
                f"({ps} tokens x {cfg.num_kv_heads} KV heads x {cfg.head_dim} x K,V); raise it"
            )
        return int(slots)

    def pages_needed(self, seq: KVSequence, new_tokens: int) -> int:
        """Arena slots a sequence must newly take to hold ``new_tokens`` more tokens."""
        ps = self.config.page_size
        total = -(-(seq.num_tokens + new_tokens) // ps)
        return (total - -(-seq.num_tokens // ps)) * self.model_config.num_layers

    def check_request(self, seq: KVSequence, prompt_tokens: int, max_new_tokens: int,
                      *, allow_long_context: bool = False) -> None:
        """Refuse up front a request that exceeds the context window or the KV arena.

        Raises:
            ContextTooLongError, CapacityError.
        """
        total = seq.num_tokens + prompt_tokens + max_new_tokens
        if total > self.max_context and not allow_long_context:
            raise ContextTooLongError(
                f"the request needs {total} tokens ({seq.num_tokens} cached + {prompt_tokens} prompt + "
                f"{max_new_tokens} to generate) but the model's context is {self.max_context}; shorten "
                "the input, lower --max-new-tokens, or pass --allow-long-context to go past it anyway"
            )
        need = self.pages_needed(seq, prompt_tokens + max_new_tokens)
        free = self.arena.num_slots - self.arena.num_used
        if need > free:
            minimum = (self.arena.num_used + need) * self.arena.slot_bytes
            raise CapacityError(
                f"the DEVICE KV arena cannot hold this request: it needs {need} more pages of "
                f"{self.arena.slot_bytes} bytes and {free} are free; use --device-memory of at least "
                f"{-(-minimum // 2**20)}MiB"
            )

    # ----- sequences ----------------------------------------------------------------------
    def new_sequence(self) -> KVSequence:
        return self.kv.new_sequence()

    def fork(self, seq: KVSequence) -> KVSequence:
        return self.kv.fork(seq)

    def release(self, seq: KVSequence) -> None:
        self.kv.release(seq)

    # ----- compute ------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        seq: KVSequence,
        ids: Sequence[int] | torch.Tensor,
        *,
        num_logits: int = 1,
        on_layer: LayerCallback | None = None,
    ) -> torch.Tensor:
        """Run new tokens through the model, appending their K/V to ``seq``'s pages.

        Args:
            ids: [T] token ids (T >= 1).
            num_logits: logits are returned for the last ``num_logits`` positions.
            on_layer: called after each layer with (layers done, num layers).

        Returns:
            [num_logits, vocab] float32 logits.
        """
        ids_t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1).to(self.device)
        t = int(ids_t.numel())
        if t == 0:
            raise InputError("no tokens to run; give a non-empty prompt")
        start = seq.num_tokens
        positions = torch.arange(start, start + t, device=self.device)
        h = self.runner.embed(ids_t)
        num_layers = self.model_config.num_layers
        chunk = self.config.prefill_chunk_tokens
        for layer in range(num_layers):
            for c0 in range(0, t, chunk):
                c1 = min(t, c0 + chunk)
                h[c0:c1] = self._layer_chunk(seq, layer, h[c0:c1], positions[c0:c1])
            if on_layer is not None:
                on_layer(layer + 1, num_layers)
        return self.runner.logits(h[t - min(num_logits, t):])

    def _layer_chunk(self, seq: KVSequence, layer: int, h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q, k, v = self.runner.qkv(layer, h, pos)
        self.kv.append(seq, layer, k, v)
        attn = self._attend(seq, layer, q, pos)
        return self.runner.finish_layer(layer, h, attn)

    def _attend(self, seq: KVSequence, layer: int, q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Exact attention of q [T, nq, hd] over all the layer's pages -> [T, nq * hd]."""
        cfg = self.model_config
        t = q.shape[0]
        qg = q.view(t, cfg.num_kv_heads, cfg.group_size, cfg.head_dim).permute(1, 2, 0, 3)
        first_q = int(pos[0])
        if flash_torch.is_available(q.device):
            # Fused and tiled: no score matrix, so groups are bounded only by gather copies.
            partial, max_tokens = flash_torch.attention_partial_flash, FUSED_GROUP_TOKENS
        else:
            partial = attention_partial_ref
            max_tokens = max(1, self.config.attn_scores_bytes // (4 * cfg.num_heads * t))
        outs, lses = [], []
        for g in self.kv.groups(seq, layer, max_tokens):
            # Keys up to the first query's position are visible to every query: no mask. Only
            # keys after it (this chunk's own later tokens) need the causal mask; a decode
            # step (one query) never does.
            split = min(max(first_q + 1 - g.start_pos, 0), g.k.shape[1])
            for lo, hi in ((0, split), (split, g.k.shape[1])):
                if lo == hi:
                    continue
                k, v = g.k[:, lo:hi].to(q.dtype), g.v[:, lo:hi].to(q.dtype)
                if lo == split:
                    k_pos = torch.arange(g.start_pos + lo, g.start_pos + hi, device=q.device)
                    out, lse = partial(qg, k, v, scale=self.runner.scale, q_pos=pos, k_pos=k_pos)
                else:
                    out, lse = partial(qg, k, v, scale=self.runner.scale)
                outs.append(out)
                lses.append(lse)
        out, _ = merge_partials_ref(outs, lses)  # [nkv, g, T, hd]
        return out.permute(2, 0, 1, 3).reshape(t, cfg.num_heads * cfg.head_dim).to(q.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(
        self,
        seq: KVSequence,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        sampling: SamplingConfig = SamplingConfig(),
        stop_ids: Sequence[int] = (),
        stats: RunStats | None = None,
        num_prompt_logits: int = 1,
        record_logits: list[torch.Tensor] | None = None,
        on_layer: LayerCallback | None = None,
    ) -> Iterator[int]:
        """Prefill ``prompt_ids`` onto ``seq`` and yield generated token ids one by one.

        Stops after ``max_new_tokens`` tokens or after yielding a token in ``stop_ids``. The
        last yielded token is not fed back into the KV.

        Args:
            record_logits: if given, receives the prompt's last ``num_prompt_logits`` logits
                [n, vocab] and then each decode step's logits [1, vocab] (tests).
        """
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        stats = stats if stats is not None else RunStats()
        sampler = Sampler(sampling)
        stops = set(stop_ids)
        t0 = time.perf_counter()
        logits = self.forward(seq, prompt_ids, num_logits=num_prompt_logits, on_layer=on_layer)
        tok = sampler(logits[-1])
        self.sync()
        stats.prefill_s = stats.ttft_s = time.perf_counter() - t0
        stats.prefill_tokens += len(prompt_ids)
        if record_logits is not None:
            record_logits.append(logits)
        self.fill_stats(stats, seq)
        stats.generated_tokens = 1
        stats.stop_reason = "eos" if tok in stops else "max_new_tokens"
        yield tok
        t1 = time.perf_counter()
        while stats.generated_tokens < max_new_tokens and tok not in stops:
            logits = self.forward(seq, [tok])
            tok = sampler(logits[-1])
            if record_logits is not None:
                record_logits.append(logits)
            stats.generated_tokens += 1
            stats.decode_tokens += 1
            stats.decode_s = time.perf_counter() - t1
            self.fill_stats(stats, seq)
            stats.stop_reason = "eos" if tok in stops else "max_new_tokens"
            yield tok

    def fill_stats(self, stats: RunStats, seq: KVSequence) -> None:
        stats.peak_bytes = {Tier.DEVICE.value: self.arena.peak_used_bytes, Tier.HOST.value: 0, Tier.DISK.value: 0}
        stats.weights_bytes = self.runner.weights_bytes
        stats.kv_bytes_per_token = self.kv_bytes_per_token
        stats.page_size = self.config.page_size
        stats.context_tokens = seq.num_tokens
        stats.device = str(self.device)
        stats.dtype = str(self.dtype).removeprefix("torch.")
        stats.kv_dtype = str(self.kv_dtype).removeprefix("torch.")
