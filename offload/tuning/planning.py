"""The runtime's side of the planner: model shapes -> ``PlanProblem``, ``Plan`` -> ``Placement``.

Two uses, with two meanings of the budgets (said in every help text):

- ``offload plan`` (``model_problem``) plans a whole run on a machine: a budget is a tier's
  memory for everything the run keeps there — DEVICE holds the weights, the working buffers
  and its KV pages; HOST holds the DISK staging and write buffers and its KV pages — with the
  planner's 0.8 slack (the question "what fits on a 24 GB card with 64 GB of RAM").
- The engine (``engine_problem``) plans the pages one forward pass adds, into the room its
  arenas have left: its ``--device-memory``/``--host-memory`` are already KV budgets (the
  Tiers issue's meaning), so the rooms go to the planner exactly (slack 1, weights outside).

In executed plans the sparse budget is 1, and the LP keeps HOST pages as activations (KVPR)
only when the engine runs it (``RuntimeConfig(recompute="kvpr")``; ``offload plan
--recompute kvpr|auto`` or ``--what-if`` for a whole run, ``planner.recompute`` says why). CPU
delegation is executed (the Kernels issue's in-place Numba attention), so the LP may use it
wherever a CPU and a separate device exist.
"""
from __future__ import annotations

import logging

from offload.model.model_config import ModelConfig
from offload.kv.paged_kv import ring_pages
from offload.kv.placement import Placement
from planner import Plan, PlanProblem
from storage.aligned import DISK_ALIGNMENT, round_up

__all__ = ["DEVICE_RESERVE_PAGES", "QUESTION_TOKENS", "ANSWER_TOKENS", "WRITE_STAGING_BYTES", "model_problem",
           "engine_problem", "plan_placement", "plan_summary", "weight_bytes", "decode_weight_bytes", "working_bytes",
           "staging_bytes"]

logger = logging.getLogger(__name__)

# Bytes of DISK writes in flight at most (counted in the HOST budget).
WRITE_STAGING_BYTES = 8 * 2**20
# DEVICE pages per layer kept free when pages spill (a whole-run plan, ``model_problem``; the
# engine's passes other than a document's): tails, a question's scratch pages (its
# copy-on-write tails), decode growth.
DEVICE_RESERVE_PAGES = 8
# The question every ingested document must be able to take: this many question tokens and
# answer tokens on a fork of it. The engine keeps the DEVICE room for it free when it places
# a document's pages (``Engine.question_reserve``) and refuses up front a document it could
# not take (``Engine.check_document``).
QUESTION_TOKENS = 64
ANSWER_TOKENS = 128


def weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of the model's weights: embeddings, every layer's projections and norms, the
    final norm and (when untied) the LM head."""
    h, hd = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_heads + 2 * cfg.num_kv_heads) * hd + cfg.num_heads * hd * h
    bias = ((cfg.num_heads + 2 * cfg.num_kv_heads) * hd if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    mlp = 3 * h * cfg.intermediate_size + (2 * cfg.intermediate_size + h if cfg.mlp_bias else 0)
    per_layer = attn + bias + mlp + 2 * h
    embed = cfg.vocab_size * h * (1 if cfg.tie_word_embeddings else 2)
    return (cfg.num_layers * per_layer + embed + h) * dtype_bytes


def decode_weight_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Weight bytes one decode step streams: all but the embedding table (one row is read),
    which is also the LM head when tied."""
    table = cfg.vocab_size * cfg.hidden_size * dtype_bytes
    return weight_bytes(cfg, dtype_bytes) - (0 if cfg.tie_word_embeddings else table)


def working_bytes(cfg: ModelConfig, *, dtype_bytes: int, prefill_chunk_tokens: int, scores_bytes: int) -> int:
    """DEVICE bytes of one prefill chunk's working set (the largest transient): the chunk's
    activations through q/k/v, the MLP and the residual, one attention partial's scores, and
    the logits of one position."""
    t = prefill_chunk_tokens
    proj = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    acts = t * (3 * cfg.hidden_size + proj + 3 * cfg.intermediate_size) * dtype_bytes
    return acts + scores_bytes + cfg.vocab_size * 4


def stored_chunk_pages(staging_chunk_pages: int, page_bytes: int, stored_bytes: int) -> int:
    """Pages one DISK staging chunk holds: ``staging_chunk_pages`` (``RuntimeConfig``) counts
    full-precision pages of ``page_bytes``, so a chunk of 4-bit pages (``stored_bytes`` each)
    holds as many DISK bytes as an exact chunk, in more pages: the same extent sizes, reads per
    step and staging memory, and fewer kernel calls per layer."""
    exact, stored = round_up(page_bytes, DISK_ALIGNMENT), round_up(stored_bytes, DISK_ALIGNMENT)
    return max(1, staging_chunk_pages * exact // stored)


def staging_bytes(page_bytes: int, *, staging_chunk_pages: int, staging_buffers: int) -> int:
    """HOST bytes of the DISK read staging area plus the write buffers in flight."""
    disk_page = round_up(page_bytes, DISK_ALIGNMENT)
    return staging_buffers * staging_chunk_pages * disk_page + WRITE_STAGING_BYTES


def _shape(cfg: ModelConfig) -> dict[str, int]:
    return dict(num_layers=cfg.num_layers, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                head_dim=cfg.head_dim, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size)


def model_problem(cfg: ModelConfig, *, context_tokens: int, dtype_bytes: int, kv_dtype_bytes: int,
                  device_budget_bytes: int | None, host_budget_bytes: int | None,
                  disk_budget_bytes: int | None, page_size: int = 32, batch_size: int = 1,
                  prefill_chunk_tokens: int = 1024, scores_bytes: int = 64 * 2**20,
                  staging_chunk_pages: int = 64, staging_buffers: int = 4, allow_recompute: bool = False,
                  sparse_budget: float = 1.0, sparse_fetch: float = 1.0, num_layer_groups: int = 1,
                  packed_page_bytes: int | None = None) -> PlanProblem:
    """The planning problem of a whole run (``offload plan``): budgets cover weights and buffers.
    DEVICE reserves the working set of a prefill chunk, ``DEVICE_RESERVE_PAGES`` pages per
    layer (tails, a question's scratch pages, decode growth) and the sliding-window
    rings; HOST the DISK staging and writes. Only global layers' pages are placed (all of a
    Llama-family model's; Gemma 3's global ones), while every layer's weights count.

    Args:
        allow_recompute: the LP may keep HOST pages as activations and recompute their K/V
            (KVPR, ``offload plan --recompute``); without it the plan is one the engine can execute.
        sparse_budget: F, the share of the K/V bytes a decode step reads (``--sparse quest
            --sparse-budget F``; 1 = exact). The cost model scales each layer's reads by it.
        sparse_fetch: pages moved from HOST/DISK per page attended there (a pool read ahead).
            A sparse plan also holds the pages' key bounds on DEVICE (``1 / page_size`` of the
            K/V bytes); an exact plan leaves them out, as the engine's DEVICE budget does.
        packed_page_bytes: the placed pages are 4-bit pages of this many bytes (``--kv-format
            4bit``); the reserved pages (tails, windows, rings) stay exact.
    """
    page_bytes = 2 * cfg.num_kv_heads * page_size * cfg.head_dim * kv_dtype_bytes
    stored = packed_page_bytes or page_bytes
    staging_chunk_pages = stored_chunk_pages(staging_chunk_pages, page_bytes, stored)
    # Only global layers' pages are placed; sliding-window layers keep DEVICE rings (Gemma 3).
    windows = cfg.layer_windows
    placed = sum(1 for w in windows if w is None)
    rings = sum(ring_pages(w, page_size) for w in windows if w is not None) * batch_size * page_bytes
    return PlanProblem(
        **(_shape(cfg) | {"num_layers": placed}), context_tokens=context_tokens,
        weight_bytes=weight_bytes(cfg, dtype_bytes),
        batch_size=batch_size, page_size=page_size, kv_dtype_bytes=kv_dtype_bytes,
        device_budget_bytes=device_budget_bytes, host_budget_bytes=host_budget_bytes,
        disk_budget_bytes=disk_budget_bytes,
        device_working_bytes=(working_bytes(cfg, dtype_bytes=dtype_bytes, prefill_chunk_tokens=prefill_chunk_tokens,
                                            scores_bytes=scores_bytes)
                              + DEVICE_RESERVE_PAGES * cfg.num_layers * page_bytes + rings),
        host_staging_bytes=staging_bytes(stored, staging_chunk_pages=staging_chunk_pages,
                                         staging_buffers=staging_buffers),
        disk_extent_bytes=staging_chunk_pages * round_up(stored, DISK_ALIGNMENT),
        staging_buffers=staging_buffers, num_layer_groups=num_layer_groups, allow_delegation=True,
        allow_recompute=allow_recompute,
        sparse_budget=sparse_budget, sparse_fetch=sparse_fetch,
        metadata_bytes_per_layer=(0 if sparse_budget >= 1 else
                                  -(-context_tokens // page_size) * batch_size * page_bytes // page_size),
        packed_page_bytes=packed_page_bytes)


def engine_problem(cfg: ModelConfig, *, new_pages: int, page_size: int, dtype_bytes: int, kv_dtype_bytes: int,
                   device_room_pages: int, host_room_pages: int, disk_room_pages: int,
                   staging_chunk_pages: int, allow_delegation: bool, num_layers: int | None = None,
                   staging_buffers: int = 0, packed_page_bytes: int | None = None,
                   allow_recompute: bool = False) -> PlanProblem:
    """The planning problem of one forward pass's new pages into the rooms the engine's arenas
    have left (in pages; slack 1: the arenas already are the budgets). The weights count only
    in the predicted compute time, not in the DEVICE room.

    Args:
        staging_buffers: the engine's DISK read-ahead buffers; > 0 prices whole-page plans
            with reads running ahead across layers through them (``planner.cost.staged_step_s``,
            plus the profile's read interference), 0 with FlexGen's per-layer overlap.
        num_layers: the layers whose pages are placed (Gemma 3's global layers; default all).
            The weights of every layer still count in the compute time.
        packed_page_bytes: the placed pages are 4-bit pages of this many bytes each (a staging
            chunk then holds ``stored_chunk_pages`` of them).
        allow_recompute: the engine executes KVPR (``RuntimeConfig(recompute="kvpr")``): the LP
            may keep HOST pages as activations, each in a whole K/V slot."""
    exact_bytes = 2 * cfg.num_kv_heads * page_size * cfg.head_dim * kv_dtype_bytes
    page_bytes = packed_page_bytes or exact_bytes
    staging_chunk_pages = stored_chunk_pages(staging_chunk_pages, exact_bytes, page_bytes)
    weights = decode_weight_bytes(cfg, dtype_bytes)
    shape = _shape(cfg) | ({} if num_layers is None else {"num_layers": num_layers})
    return PlanProblem(
        **shape, context_tokens=new_pages * page_size, weight_bytes=weights, page_size=page_size,
        kv_dtype_bytes=kv_dtype_bytes, device_budget_bytes=weights + device_room_pages * page_bytes,
        host_budget_bytes=host_room_pages * page_bytes, disk_budget_bytes=disk_room_pages * page_bytes, slack=1.0,
        disk_extent_bytes=staging_chunk_pages * round_up(page_bytes, DISK_ALIGNMENT),
        staging_buffers=staging_buffers, allow_delegation=allow_delegation, allow_recompute=allow_recompute,
        activations_in_kv_slots=True, packed_page_bytes=packed_page_bytes)


def plan_placement(plan: Plan, *, first_page: int, layers: tuple[int, ...] | None = None,
                   num_layers: int | None = None) -> Placement:
    """The placement that executes ``plan`` for pages numbered from ``first_page`` (the pages
    a sequence already holds keep their tiers): per layer, the plan's DEVICE pages first, then
    its HOST pages, then DISK; the share of HOST pages attended on the CPU per layer and the
    share kept as activations (KVPR).

    Args:
        layers / num_layers: the model layers the plan's layers are (Gemma 3's global
            layers) out of ``num_layers``; the others keep everything on DEVICE."""
    device: tuple[int | None, ...] = tuple(first_page + d for d in plan.device_pages)
    host: tuple[int | None, ...] = tuple(plan.host_pages)
    # Delegation takes the HOST pages kept as K/V; KVPR's are recomputed on the device.
    share = tuple(dl / (h - rc) if h > rc else 0.0
                  for dl, h, rc in zip(plan.delegated_pages, plan.host_pages, plan.recomputed_pages))
    rshare = tuple(rc / h if h else 0.0 for rc, h in zip(plan.recomputed_pages, plan.host_pages))
    if layers is not None:
        assert num_layers is not None and len(layers) == len(device)
        where = {layer: i for i, layer in enumerate(layers)}
        device = tuple(device[where[i]] if i in where else None for i in range(num_layers))
        host = tuple(host[where[i]] if i in where else 0 for i in range(num_layers))
        share = tuple(share[where[i]] if i in where else 0.0 for i in range(num_layers))
        rshare = tuple(rshare[where[i]] if i in where else 0.0 for i in range(num_layers))
    return Placement(device_pages=device, host_pages=host, delegated_share=share, recomputed_share=rshare)


def plan_summary(plan: Plan) -> dict[str, object]:
    """What the stats keep of an executed plan."""
    d = plan.to_dict()
    keep = ("method", "decode_step_s", "bottleneck", "tier_bytes", "delegated_share")
    return {k: d[k] for k in keep} | {"pages_per_layer": plan.pages_per_layer}
