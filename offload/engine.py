"""The engine: layer-wise prefill and paged decode of a Llama-family or Gemma 3 model.

Two named paths. ``prefill`` (T prompt tokens)::

    h = embed(ids)                                  [T, hidden]
    for layer l:                                    (one layer at a time: layer-wise prefill)
        for each chunk of <= prefill_chunk tokens:
            q, k, v = qkv(l, h[chunk]); k, v -> the layer's buffer of new tokens
            attention of q as (out, lse) partials merged by log-sum-exp: over the layer's
                stored pages (earlier tokens, no mask) and over the new tokens so far (causal)
            h[chunk] = o_proj + MLP
        the layer's new K/V join its pages
    logits of the last positions

``decode_step`` (one token)::

    page moves of the step (tail pages, evictions, sliding rings)    PagedKV.prepare_decode
    one read set per layer (the selector's pages, routes, chunks)    step_reads
    DISK chunks of every layer read ahead                            KVReader.plan
      (a speculative selector: layer l+1's set is made from layer l's input at the start
       of layer l and its chunks join the plan then, KVReader.plan_more)
    for layer l:
        q, k, v = qkv(l, h); k, v -> the layer's tail page
        attention over the layer's read set (global and sliding layers alike)
        counters from the read set; CUDA: the next layer's pieces copied ahead
        h = o_proj + MLP

Peak memory is the weights + the KV pages + h + one layer's new K/V + one chunk's working
set (scores of one partial are bounded by ``attn_scores_bytes``); no other layer's K/V
exists outside its pages.

Sliding-window layers (Gemma 3) keep a DEVICE ring of the pages their window still sees
(``PagedKV``); their prefill queries attend with the window mask, their decode query over the
ring with the window's first key cut inside the kernels. Only global layers' pages are placed
by the planner and reach HOST or DISK.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from offload.attention.decode import DecodeAttention
from offload.attention.lsh import lsh_selector
from offload.attention.prefill import PrefillAttention
from offload.attention.prompt_prior import PRIOR_QUERIES, PageMass
from offload.attention.quest import QuestSelector
from offload.attention.read_account import ReadAccount, StepReads
from offload.attention.selection import ExactSelector, PageSelector
from offload.attention.speculative import speculative_selector
from offload.kv.page_cache import page_cache_for
from offload.config import MatvecKernel, RuntimeConfig, Sparse
from offload.engine_admission import EngineAdmission
from offload.errors import InputError, UnsupportedModelError
from offload.model.gemma3 import Gemma3Config, Gemma3Runner, gemma3_random_weights, load_gemma3_weights
from offload.model.llama import LlamaRunner
from offload.model.model_source import AnyModelConfig, ModelSource
from offload.kv.counters import IOSnapshot, kind_strings, tier_strings
from offload.kv.kvpr import activation_pages
from offload.kv.lsh_index import LshIndex, LshParams
from offload.kv.paged_kv import KVSequence, PagedKV, ring_pages
from offload.kv.readahead import Chunk
from offload.kv.reads import LayerReads
from offload.kv.placement import Placement
from offload.tiers import build_tiers, remove_disk_tier
from offload.tuning.planning import plan_summary
from offload.sampling import Sampler, SamplingConfig
from offload.stats import RunStats
from offload.model.weights import load_checkpoint, random_weights
from planner.profile import HardwareProfile
from storage import Tier
from offload.kv.page_table import cdiv

if TYPE_CHECKING:
    from planner import Plan, PlanProblem

__all__ = ["Engine", "LayerCallback"]

logger = logging.getLogger(__name__)

LayerCallback = Callable[[int, int], None]  # (layers done, num layers)



def make_runner(source: ModelSource, *, dtype: torch.dtype, device: torch.device,
                seed: int = 0, row_kernel: bool = True) -> LlamaRunner | Gemma3Runner:
    """The runner of the source's architecture with its checkpoint's weights (random ones,
    from ``seed``, for a shape-only source); ``row_kernel``: see ``offload.model.matvec``."""
    cfg = source.config
    if isinstance(cfg, Gemma3Config):
        if cfg.attn_logit_softcapping is not None:
            raise UnsupportedModelError("attention soft-capping (attn_logit_softcapping) is not implemented by "
                                        "the paged engine (released Gemma 3 configs set it to null)")
        weights = (gemma3_random_weights(cfg, dtype=dtype, device=device, seed=seed) if source.weights_dir is None
                   else load_gemma3_weights(source.weights_dir, cfg, dtype=dtype, device=device))
        return Gemma3Runner(cfg, weights, device=device, row_kernel=row_kernel)
    weights = (random_weights(cfg, dtype=dtype, device=device, seed=seed) if source.weights_dir is None
               else load_checkpoint(source.weights_dir, cfg, dtype=dtype, device=device))
    return LlamaRunner(cfg, weights, device=device, row_kernel=row_kernel)


class Engine(EngineAdmission):
    """Runs one model over paged KV sequences.

    Args:
        source: where config, weights and tokenizer come from.
        config: runtime options.
    """

    def __init__(self, source: ModelSource, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.device = self.config.resolved_device()
        self.prefill_chunk = self.config.resolved_prefill_chunk(self.device)  # tokens per prefill chunk
        self.dtype = self.config.resolved_dtype(self.device)
        self.kv_dtype = self.config.kv_dtype or self.dtype
        self.model_config: AnyModelConfig = source.config
        cfg = self.model_config
        if self.config.placement is not None:
            self.config.placement.check_layers(cfg.num_layers)
        # Per layer: None (global attention, pages placed on the tiers) or a sliding window
        # (a DEVICE ring of pages).
        self.windows: tuple[int | None, ...] = cfg.layer_windows
        self.global_layers = tuple(i for i, w in enumerate(self.windows) if w is None)
        self.ring_pages = tuple(0 if w is None else ring_pages(w, self.config.page_size) for w in self.windows)
        # The tiers first: a budget too small for them fails before the weights load.
        tiers = build_tiers(self.config, cfg, device=self.device, kv_dtype=self.kv_dtype, ring_pages=self.ring_pages)
        self.arena, self.host_arena, self.disk = tiers.arena, tiers.host_arena, tiers.disk
        packed = tiers.packed
        # With 4-bit pages: their blob layout (exact pages in the arena, 4-bit ones elsewhere).
        self.packed_layout = packed.layout if packed is not None else None
        if tiers.disk is not None and tiers.run_dir is not None:
            self._finalizer = weakref.finalize(self, remove_disk_tier, tiers.disk, tiers.run_dir)
        self.runner = make_runner(source, dtype=self.dtype, device=self.device, seed=self.config.seed,
                                  row_kernel=self.config.matvec_kernel is MatvecKernel.AUTO)
        self.kv = PagedKV(self.arena, cfg.num_layers, host_arena=self.host_arena, disk=self.disk,
                          disk_slots_limit=tiers.disk_limit, staging_chunk_pages=tiers.chunk_pages,
                          staging_buffers=self.config.staging_buffers, compute_device=self.device,
                          shuffle_seed=self.config.shuffle_pages_seed, max_write_bytes=tiers.write_staging,
                          windows=self.windows, packed=packed)
        self.kv.acts = activation_pages(self)  # KVPR (recompute="kvpr" or "auto"), else None
        self.spills = self.disk is not None or self.kv.free_slots(Tier.HOST, packed is not None) > 0  # pages can move
        if self.config.overlap and self.spills:
            # CUDA: the next layer's HOST/DISK pages cross PCIe on a side stream, at most as
            # many pages as the DISK staging area holds (transient DEVICE working memory).
            self.kv.enable_fetch_ahead(self.config.staging_buffers * tiers.chunk_pages)
        self._profile: HardwareProfile | None = None
        self._host_shares: tuple[float, ...] | None = None
        self.last_problem: PlanProblem | None = None  # the problem of last_plan
        self.last_plan: Plan | None = None  # the planner's last executed Plan (None while everything fits DEVICE)
        self.decode_attention = DecodeAttention(
            self.kv, num_kv_heads=cfg.num_kv_heads, group_size=cfg.group_size, head_dim=cfg.head_dim,
            scale=self.runner.scale, device=self.device, scores_bytes=self.config.attn_scores_bytes,
            kernel=self.config.decode_kernel)
        self.prefill_attention = PrefillAttention(
            self.kv, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, group_size=cfg.group_size,
            head_dim=cfg.head_dim, scale=self.runner.scale, scores_bytes=self.config.attn_scores_bytes)
        # Which pages a decode step attends (exact mode: all); the sparse modes are selectors.
        self.selector: PageSelector = ExactSelector()
        if self.config.sparse in (Sparse.QUEST, Sparse.LSH):
            self.selector = QuestSelector(budget=self.config.sparse_budget, page_size=self.config.page_size,
                                          kinds=self.kv.kinds, scale=self.runner.scale)
        self.lsh_params: LshParams | None = None  # set: new sequences hash their keys (lsh mode)
        if self.config.sparse == Sparse.LSH:
            self.selector = lsh_selector(self, self.selector)
            self.lsh_params = self.selector.params
        self.last_step = StepReads()  # the last decode step's global-layer bytes (``read_account``)
        # The last prefill's seconds per chunk over the layers (CPU only: CUDA would need syncs).
        self.prefill_chunk_s: list[float] = []
        # Documents' sequences (``add_document``): their pages may move off DEVICE to make
        # room for a question or another document's ingest.
        self._documents: list[KVSequence] = []
        logger.info("engine: %s on %s, %s weights %.2f GiB, KV arena %d pages of %d tokens (%.2f GiB, %s)",
                    source.name, self.device, self.dtype, self.runner.weights_bytes / 2**30, self.arena.num_slots,
                    self.config.page_size, self.arena.num_slots * self.arena.slot_bytes / 2**30, self.kv_dtype)
        self.kv.page_cache = page_cache_for(self)  # sparse steps' DISK pages kept in memory (sparse_cache_bytes)
        if self.config.sparse == Sparse.SPECULATIVE:  # its calibration prefills on this engine: built last
            self.selector = speculative_selector(self, source)

    def close(self) -> None:
        """Finish DISK writes and remove the DISK tier's files (also done at exit)."""
        try:
            self.kv.close()
        finally:  # a failed write must not leave the files behind
            if self.disk is not None:
                self._finalizer()

    # ----- sequences ----------------------------------------------------------------------
    def new_sequence(self) -> KVSequence:
        seq = self.kv.new_sequence()
        if self.lsh_params is not None:  # lsh mode: the sequence's keys are hashed as they come
            seq.lsh = LshIndex(self.global_layers, self.lsh_params)
        return seq

    def fork(self, seq: KVSequence) -> KVSequence:
        return self.kv.fork(seq)

    def release(self, seq: KVSequence) -> None:
        self.kv.release(seq)

    # ----- compute ------------------------------------------------------------------------
    def forward(self, seq: KVSequence, ids: Sequence[int] | torch.Tensor, *, num_logits: int = 1,
                on_layer: LayerCallback | None = None, document: bool = False) -> torch.Tensor:
        """``prefill`` for several tokens, ``decode_step`` for one (returns [num_logits, vocab]
        float32 logits, at most one row for a decode step)."""
        ids_t = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids_t.numel() == 1 and seq.num_tokens:
            return self.decode_step(seq, int(ids_t[0]), on_layer=on_layer)
        return self.prefill(seq, ids_t, num_logits=num_logits, on_layer=on_layer, document=document)

    @torch.inference_mode()
    def prefill(self, seq: KVSequence, ids: Sequence[int] | torch.Tensor, *, num_logits: int = 1,
                on_layer: LayerCallback | None = None, document: bool = False,
                placement: Placement | None = None) -> torch.Tensor:
        """Run a prompt through the model layer by layer, appending its K/V to ``seq``'s pages.

        Args:
            ids: [T] token ids (T >= 1).
            num_logits: logits are returned for the last ``num_logits`` positions.
            on_layer: called after each layer with (layers done, num layers).
            document: the prompt is a document that questions will fork: its placement keeps
                the DEVICE room of a question free (``placement_for``).
            placement: where the new pages go (None = ``placement_for``; a split restore's prefix).

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
        if placement is None:
            placement = self.placement_for(seq, t, document=document)
        reader = self.kv.reader
        if t <= self.prefill_chunk and self.config.overlap:
            # One pass over the stored pages per layer (a question over a DocCache): read
            # their DISK chunks ahead, in the order the layers will take them.
            reader.plan([reader.layer_reads(seq, layer) for layer in range(num_layers)])
        if self.kv.fetcher is not None:
            self.kv.fetcher.begin_layer()  # pieces a previous pass fetched and nobody took
        self.prefill_chunk_s = [0.0] * cdiv(t, self.prefill_chunk) if self.device.type == "cpu" else []
        for layer in range(num_layers):
            self._prefill_layer(seq, layer, h, positions, start, placement)
            if on_layer is not None:
                on_layer(layer + 1, num_layers)
        return self.runner.logits(h[t - min(num_logits, t):])

    @torch.inference_mode()
    def decode_step(self, seq: KVSequence, token: int, *, on_layer: LayerCallback | None = None) -> torch.Tensor:
        """One token through the model: its K/V go to each layer's DEVICE tail page and its
        query attends over the layer's read set. Returns [1, vocab] float32 logits.

        The step's page moves are made first (``PagedKV.prepare_decode``), then one read set
        per layer (``step_reads``), which the DISK read-ahead, the CUDA fetch-ahead, attention
        and the counters all consume."""
        pos = torch.tensor([seq.num_tokens], device=self.device)
        h = self.runner.embed(torch.tensor([token], dtype=torch.int64, device=self.device))
        num_layers = self.model_config.num_layers
        self.kv.prepare_decode(seq)
        # A speculative selector names layer l+1's pages from layer l's input: its sets are
        # made (and read ahead) one layer ahead, the first one from the step's own input.
        speculates = getattr(self.selector, "speculates", False)
        spent0 = self._selector_spent()  # what the selector spends on this step, from here
        if speculates:
            self.selector.fallback = ""
            first, need = self._speculated_reads(seq, 0, h, pos)
            reads, needs_query = [first], [need]
        else:
            reads, needs_query = self.step_reads(seq)
        reader, fetcher = self.kv.reader, self.kv.fetcher
        if self.config.overlap:
            reader.plan(reads)
        if fetcher is not None:
            fetcher.begin_layer()  # pieces a previous pass fetched and nobody took
        fetch = fetcher is not None and self.config.overlap
        group_tokens = self.decode_attention.max_group_tokens
        if fetch:
            reader.fetch_ahead(reads[0], group_tokens)
        step = StepReads()
        for layer in range(num_layers):
            if speculates and layer + 1 < num_layers:
                nxt, need = self._speculated_reads(seq, layer + 1, h, pos)
                reads.append(nxt)
                needs_query.append(need)
                if self.config.overlap:
                    reader.plan_more(reads[layer + 1])
            q, k, v = self.runner.qkv(layer, h, pos)
            self.kv.append(seq, layer, k, v, prepared=True)
            layer_reads = reads[layer]
            if needs_query[layer]:
                layer_reads = self._reads_with_query(seq, layer_reads, q)
            attn = self.decode_attention(layer_reads, q)
            reader.count(layer_reads)
            step.add_layer(reads[layer], layer_reads, exact_pages=cdiv(layer_reads.length, self.config.page_size)
                           - seq.table.first_live(layer), page_bytes=self.kv.page_bytes, stored=reader.page_bytes)
            if fetch and layer + 1 < num_layers:  # layer's kernels are queued: copy the next one's pages
                reader.fetch_ahead(reads[layer + 1], group_tokens)
            h = self.runner.finish_layer(layer, h, attn)
            if on_layer is not None:
                on_layer(layer + 1, num_layers)
        bounds, selection, hits, chosen = (b - a for a, b in zip(spent0, self._selector_spent()))
        step.finish(bounds_bytes=bounds, selection_s=selection, fallback=self.selector.fallback)
        step.speculated(hits=hits, chosen=chosen)
        self.last_step = step
        return self.runner.logits(h)

    def _selector_spent(self) -> tuple[int, float, int, int]:
        """Key-bound bytes the selector has scanned, seconds it has spent, and (speculative
        mode) the live-chosen pages it had predicted and the live-chosen pages, so far (0 in
        exact mode)."""
        sel = self.selector
        return (sel.bounds_bytes, sel.selection_s, getattr(sel, "spec_hits", 0), getattr(sel, "spec_chosen", 0))

    def step_reads(self, seq: KVSequence) -> tuple[list[LayerReads], list[bool]]:
        """The decode step's read set of every layer, from the selector's answers before the
        query exists, and per layer whether the selector must be asked again with the query.
        Called after ``prepare_decode``: each layer's length counts the step's own token."""
        reads, needs = [], []
        self.selector.fallback = ""
        for layer in range(self.model_config.num_layers):
            layer_reads, need = self._reads_before_query(seq, layer)
            reads.append(layer_reads)
            needs.append(need)
        return reads, needs

    def _reads_before_query(self, seq: KVSequence, layer: int) -> tuple[LayerReads, bool]:
        """``layer``'s set from the selector's answer before the query, and whether the query
        must be asked too (``length`` counts the step's own token)."""
        length = seq.lengths[layer] + 1
        choice = self.selector.choose(seq, layer, length=length, query=None)
        return self._layer_reads(seq, layer, length, choice.pages, None), choice.needs_query

    def _speculated_reads(self, seq: KVSequence, layer: int, h: torch.Tensor,
                          pos: torch.Tensor) -> tuple[LayerReads, bool]:
        """``layer``'s set before its query, with the pages predicted from ``h`` (the input of
        the layer before it, or its own for the first), and whether the query must be asked."""
        self.selector.speculate(seq, layer, h, pos, length=seq.lengths[layer] + 1)
        return self._reads_before_query(seq, layer)

    def _layer_reads(self, seq: KVSequence, layer: int, length: int, pages: Sequence[int] | None,
                     planned: set[Chunk] | None, **sampled: Any) -> LayerReads:
        return self.kv.reader.layer_reads(seq, layer, rule=self.decode_attention.routes, length=length, pages=pages,
                                          host_share=self.host_share(layer), window=self.windows[layer],
                                          planned=planned, cached=pages is not None, **sampled)

    def _reads_with_query(self, seq: KVSequence, before: LayerReads, q: torch.Tensor) -> LayerReads:
        """The layer's final read set once its query exists: pages read ahead stay planned,
        pages added are read on demand, planned pages no longer named are dropped."""
        layer = before.layer
        choice = self.selector.choose(seq, layer, length=before.length, query=q)
        after = self._layer_reads(seq, layer, before.length, choice.pages, set(before.chunks(ahead=True)),
                                  sampled=choice.sampled, sample=choice.sample)
        self.kv.reader.drop_unused(before, after)
        return after

    def _prefill_layer(self, seq: KVSequence, layer: int, h: torch.Tensor, pos: torch.Tensor, start: int,
                       placement: Placement) -> None:
        """Several tokens, in chunks; h [T, hidden] is updated in place.

        The new tokens' K/V of this layer are its working set: queries attend to the stored
        pages (earlier tokens) and to this buffer, and the tokens join the pages after the
        layer, so a layer's keys are never read back from slower tiers during prefill.
        """
        cfg, t, chunk = self.model_config, h.shape[0], self.prefill_chunk
        kbuf = torch.empty(cfg.num_kv_heads, t, cfg.head_dim, dtype=self.kv_dtype, device=self.device)
        vbuf = torch.empty_like(kbuf)
        xbuf = (torch.empty(t, cfg.hidden_size, dtype=self.kv_dtype, device=self.device)  # KVPR: the normed input
                if self.kv.acts is not None and placement.recomputes(layer) else None)
        times = self.prefill_chunk_s
        for c0 in range(0, t, chunk):
            c1 = min(t, c0 + chunk)
            t0 = time.perf_counter()
            if xbuf is not None:
                xbuf[c0:c1] = self.runner.attn_input(layer, h[c0:c1])
            q, k, v = self.runner.qkv(layer, h[c0:c1], pos[c0:c1])
            kbuf[:, c0:c1] = k.transpose(0, 1)
            vbuf[:, c0:c1] = v.transpose(0, 1)
            mass = self._page_mass(layer, q, pos[c0:c1], start + t) if c1 == t else None
            attn = self.prefill_attention(seq, layer, q, pos[c0:c1], kbuf[:, :c1], vbuf[:, :c1], start,
                                          q_first=start + c0, window=self.windows[layer], mass=mass)
            if mass is not None:
                seq.prior[layer] = mass.result()
            h[c0:c1] = self.runner.finish_layer(layer, h[c0:c1], attn)
            if times:
                times[c0 // chunk] += time.perf_counter() - t0
        self.kv.append(seq, layer, kbuf.transpose(0, 1), vbuf.transpose(0, 1), placement)
        if xbuf is not None:
            assert self.kv.acts is not None
            self.kv.acts.store(seq, layer, start, xbuf, placement)

    def _page_mass(self, layer: int, q: torch.Tensor, pos: torch.Tensor, end: int) -> PageMass | None:
        """The prompt prior's collector for a global layer's last prefill chunk, when the
        selector reads priors (``offload.attention.prompt_prior``); None otherwise."""
        if not getattr(self.selector, "wants_prior", False) or self.windows[layer] is not None:
            return None
        cfg = self.model_config
        m = min(PRIOR_QUERIES, q.shape[0])
        qg = q[-m:].reshape(m, cfg.num_kv_heads, cfg.group_size, cfg.head_dim).permute(1, 2, 0, 3)
        return PageMass(qg, pos[-m:], scale=self.runner.scale, page_size=self.config.page_size,
                        num_pages=cdiv(end, self.config.page_size))

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
        logits = self.prefill(seq, prompt_ids, num_logits=num_prompt_logits, on_layer=on_layer)
        tok = sampler(logits[-1])
        self.sync()
        stats.prefill_s = stats.ttft_s = time.perf_counter() - t0
        stats.prefill_tokens += len(prompt_ids)
        if record_logits is not None:
            record_logits.append(logits)
        self.fill_stats(stats, seq)
        io0 = self.kv.io.snapshot()
        account = ReadAccount()
        stats.generated_tokens = 1
        stats.stop_reason = "eos" if tok in stops else "max_new_tokens"
        yield tok
        t1 = time.perf_counter()
        while stats.generated_tokens < max_new_tokens and tok not in stops:
            logits = self.decode_step(seq, tok)
            account.add(self.last_step)
            account.fill(stats)
            tok = sampler(logits[-1])
            if record_logits is not None:
                record_logits.append(logits)
            stats.generated_tokens += 1
            stats.decode_tokens += 1
            stats.decode_s = time.perf_counter() - t1
            self.fill_stats(stats, seq)
            self._decode_io(stats, self.kv.io.snapshot().minus(io0))
            stats.stop_reason = "eos" if tok in stops else "max_new_tokens"
            yield tok

    def _decode_io(self, stats: RunStats, io: IOSnapshot) -> None:
        """Per-token decode I/O from the counters' change over the decode (``io``)."""
        n = max(1, stats.decode_tokens)
        stats.bytes_read_per_token = tier_strings(io.bytes_read, n)
        stats.bytes_read_per_token_by_kind = kind_strings(io.read_by_kind, n)
        stats.cpu_attended_bytes_per_token = tier_strings(io.cpu_attended_bytes, n)
        stats.copied_to_device_bytes_per_token = io.copied_to_device_bytes // n
        stats.fetch_wait_s = io.fetch_wait_s
        stats.compute_s = max(0.0, stats.decode_s - stats.fetch_wait_s)

    def fill_stats(self, stats: RunStats, seq: KVSequence) -> None:
        stats.peak_bytes = self.kv.peak_bytes()
        stats.cold_reads = self.disk.cold_read_mode if self.disk is not None else "none (no disk tier)"
        stats.disk_backend = self.disk.backend if self.disk is not None else "none (no disk tier)"
        stats.disk_bytes_written = self.kv.io.disk_bytes_written
        stats.kv_written_bytes_by_kind = kind_strings(self.kv.io.written_by_kind)
        stats.kv_held_bytes_by_kind = kind_strings(self.kv.held_bytes(seq))
        stats.plan = plan_summary(self.last_plan) if self.last_plan is not None else None
        stats.profile = f"{self._profile.name} ({self._profile_origin})" if self._profile is not None else None
        stats.weights_bytes = self.runner.weights_bytes
        stats.kv_bytes_per_token = self.kv_bytes_per_token
        stats.page_size = self.config.page_size
        stats.context_tokens = seq.num_tokens
        stats.device = str(self.device)
        stats.dtype = str(self.dtype).removeprefix("torch.")
        stats.kv_dtype = str(self.kv_dtype).removeprefix("torch.")
        stats.sparse = self.config.sparse.value
        stats.kv_format = self.config.kv_format.value
        stats.sparse_budget = self.config.sparse_budget if self.config.sparse != Sparse.EXACT else None
        stats.key_bounds_bytes = seq.bounds.nbytes() if seq.bounds is not None else 0
        stats.lsh_table_bytes = seq.lsh.nbytes() if seq.lsh is not None else 0
