"""The engine's admission and sizing: how many pages a request or a document takes, where a
pass's new pages go (the configured placement or the planner's), and whether it fits the
tiers, refused up front with a message that names the budget to raise.

``EngineAdmission`` is a base of ``offload.engine.Engine`` and reads the engine's state:
``config``, ``model_config``, ``device``, ``kv`` (``PagedKV``), ``arena``, ``spills``,
``packed_layout``, ``global_layers``, ``ring_pages``, ``runner``, ``kv_dtype``, ``_documents``,
``_profile``, ``_host_shares``, ``last_plan``, ``last_problem``.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from offload.config import HostAttention, Planner
from offload.errors import CapacityError, ContextTooLongError
from offload.kv.page_table import cdiv
from offload.kv.paged_kv import KVSequence
from offload.kv.placement import Placement
from offload.kv.quant_pages import PackedPools
from offload.tuning.planning import (ANSWER_TOKENS, DEVICE_RESERVE_PAGES, QUESTION_TOKENS, engine_problem,
                                     plan_placement)
from offload.tuning.profile_store import DEFAULT_PRESETS, load_saved
from planner.profile import HardwareProfile
from storage import Tier

if TYPE_CHECKING:
    from planner import Plan

__all__ = ["EngineAdmission"]

logger = logging.getLogger("offload.engine")  # the engine's own log name: its messages moved here, not their source

# The budgets capacity errors ask to raise, as the CLI flag and the API field that set them.
_DEVICE_BUDGET = "--device-memory (RuntimeConfig.device_memory_bytes)"
_TIER_BUDGETS = ("--device-memory, --host-memory or --disk-space (RuntimeConfig.device_memory_bytes, "
                 "host_memory_bytes or disk_space_bytes)")


class EngineAdmission:
    """Sizing, placement and admission of the engine's requests (a base of ``Engine``)."""

    # ----- tiers --------------------------------------------------------------------------
    def _spare_pages(self) -> int:
        """Free page slots over all tiers (with 4-bit pages: the packed ones and the exact arena's)."""
        exact = self.kv.free_slots(Tier.DEVICE) if self.packed_layout is not None else 0
        return exact + sum(self._free_pages(t) for t in (Tier.DEVICE, Tier.HOST, Tier.DISK))

    def _free_pages(self, tier: Tier) -> int:
        """Free slots of ``tier`` for the pages that may leave DEVICE (exact mode: exact pages;
        with 4-bit pages: packed ones; DISK holds only those)."""
        return self.kv.free_slots(tier, self.packed_layout is not None)

    def placement_for(self, seq: KVSequence, new_tokens: int, *, document: bool = False) -> Placement:
        """Where this forward pass's new full pages go: the configured placement; all DEVICE
        for a decode step (its new page is the DEVICE tail), on an engine with DEVICE alone
        (``check_request`` refused what does not fit), and when the pass fits DEVICE with
        ``reserve`` pages to spare; else the planner's placement of the new pages into the
        rooms the tiers have left, DEVICE's less the reserve and the pages the pass puts there
        whatever the plan (``_device_bound``).

        The reserve: for a ``document`` (an ingest or a DocCache restore, which questions
        fork), the DEVICE room a question about it takes (``question_reserve``: its tails,
        copy-on-write copies and sliding-window rings live on DEVICE only), so that an ingest
        never leaves too little for it (other documents' pages move off DEVICE to make it,
        ``make_device_room``); for other passes, nothing (a request's own tails were
        counted by ``check_request``; pages move off DEVICE as decode needs its room), and
        ``DEVICE_RESERVE_PAGES`` per layer and the rings when the planner places them."""
        if self.config.placement is not None:
            return self.config.placement
        ps = self.config.page_size
        have = cdiv(seq.num_tokens, ps)
        new_pages = cdiv(seq.num_tokens + new_tokens, ps) - have
        free = self._free_pages(Tier.DEVICE)
        # (With 4-bit pages the question's tails and the rings live in the exact arena.)
        packed = self.packed_layout is not None
        reserve = self.question_reserve(seq.num_tokens + new_tokens) if document and not packed else 0
        need = new_pages * len(self.global_layers) if packed else self.pages_needed(seq, new_tokens) + reserve
        if new_tokens == 1 or not self.spills or new_pages == 0 or free >= need:
            return Placement(None, 0)
        if packed:
            room = free
        elif document:
            bound = self._device_bound(seq.num_tokens, new_tokens)
            if free < reserve + bound:  # other documents' pages make the room
                self.make_device_room(reserve + bound - free)
                free = self.kv.free_slots(Tier.DEVICE)
            room = free - reserve - bound
        else:
            room = free - DEVICE_RESERVE_PAGES * self.model_config.num_layers - sum(self.ring_pages)
        plan = self._plan(new_pages, max(0, room))
        placement = plan_placement(plan, first_page=have, layers=self.global_layers,
                                   num_layers=self.model_config.num_layers)
        self._host_shares = placement.delegated_share
        return placement

    def _plan(self, new_pages: int, device_room: int) -> Plan:
        """The planner's split of ``new_pages`` pages per global layer (LP, or the greedy rule)
        with ``device_room`` DEVICE pages for it (``placement_for`` has taken out the rings,
        tails and reserve).

        The LP minimises FlexGen's per-layer model; its rounded plan, the even split and the
        greedy split are then priced as the read-ahead runs them (DISK reads running ahead
        across layers through the staging buffers, plus the profile's read interference), and
        greedy is kept unless another is predicted ``plan_min_gain`` faster. The per-layer
        model alone over-priced greedy's last-layer DISK pages, which the read-ahead starts
        reading during earlier layers (bench/validate_planner.py: 4K tokens, predicted 13%
        slower, measured the same).

        Raises:
            CapacityError: no split fits (the planner's message says which tier is short)."""
        from planner import PlanInfeasibleError, greedy_plan, plan

        cfg, c = self.model_config, self.config
        elem = torch.empty((), dtype=self.kv_dtype).element_size()
        problem = engine_problem(
            cfg, num_layers=len(self.global_layers), new_pages=new_pages, page_size=c.page_size,
            dtype_bytes=self.runner.dtype.itemsize,
            kv_dtype_bytes=elem, device_room_pages=device_room,
            host_room_pages=self._free_pages(Tier.HOST),
            disk_room_pages=min(self.kv.free_slots(Tier.DISK), 1 << 40),
            staging_chunk_pages=c.staging_chunk_pages, staging_buffers=c.staging_buffers,
            allow_delegation=self.device.type == "cuda" and c.host_attention == HostAttention.CPU,
            packed_page_bytes=self.packed_layout.page_bytes if self.packed_layout is not None else None,
            allow_recompute=self.kv.acts is not None)
        try:
            self.last_plan = (greedy_plan(problem, self.hardware_profile()) if c.planner == Planner.GREEDY
                              else plan(problem, self.hardware_profile(), min_gain=c.plan_min_gain))
            self.last_problem = problem
            return self.last_plan
        except PlanInfeasibleError as e:
            raise CapacityError(f"the KV tiers cannot place {new_pages} new pages per layer ({e}); raise "
                                f"{_TIER_BUDGETS}") from None

    def hardware_profile(self) -> HardwareProfile:
        """The profile the planner prices placements with, chosen on first use and never
        measured here: ``RuntimeConfig.profile`` ("given"); else this machine's saved
        ``offload profile`` under ``default_cache_dir()`` ("saved"); else a preset by device
        type, ``DEFAULT_PRESETS`` ("preset"). Measuring takes seconds and runs an engine of its
        own, so the entry points do it before building one (``offload.tuning.profile.profile_for``)."""
        if self._profile is None:
            if self.config.profile is not None:
                self._profile, self._profile_origin = self.config.profile, "given"
            elif (saved := load_saved(device=self.device, dtype=self.kv_dtype)) is not None:
                self._profile, self._profile_origin = saved, "saved"
            else:
                preset = HardwareProfile.preset(DEFAULT_PRESETS[self.device.type])
                self._profile, self._profile_origin = preset, "preset"
            logger.info("hardware profile: %s (%s)", self._profile.name, self._profile_origin)
        return self._profile

    def host_share(self, layer: int) -> float:
        """Share of the layer's HOST pages attended on the CPU in decode: the configured
        placement's, else the last executed plan's, else all or none by ``host_attention``."""
        if self.config.placement is not None:
            return self.config.placement.host_share(layer)
        if self._host_shares is not None:
            return self._host_shares[layer]
        return 1.0 if self.config.host_attention == HostAttention.CPU else 0.0

    # ----- sizing -------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V per token of the layers whose KV grows with the context (all
        layers of a Llama-family model; Gemma 3's global layers)."""
        return self.model_config.kv_bytes_per_token(torch.empty((), dtype=self.kv_dtype).element_size())

    @property
    def max_context(self) -> int:
        return self.model_config.max_position_embeddings

    def pages_needed(self, seq: KVSequence, new_tokens: int) -> int:
        """Slots a sequence must newly take to hold ``new_tokens`` more tokens: the new pages
        of each global layer, at most a ring (plus a copy-on-write tail) per sliding layer."""
        ps = self.config.page_size
        total = cdiv(seq.num_tokens + new_tokens, ps)
        grow = total - cdiv(seq.num_tokens, ps)
        return sum(grow if r == 0 else min(r, grow + 1) for r in self.ring_pages)

    def _span(self, num_tokens: int, new_tokens: int) -> int:
        """Pages that tokens [num_tokens, num_tokens + new_tokens) of a layer touch."""
        return cdiv(num_tokens % self.config.page_size + new_tokens, self.config.page_size)

    def _device_bound(self, num_tokens: int, new_tokens: int) -> int:
        """DEVICE pages a pass of ``new_tokens`` after ``num_tokens`` takes whatever the
        placement: per global layer its partly filled last page, per sliding layer its ring's."""
        ps = self.config.page_size
        grow = cdiv(num_tokens + new_tokens, ps) - cdiv(num_tokens, ps)
        partial = 1 if (num_tokens + new_tokens) % ps else 0
        return sum(partial if r == 0 else min(r, grow + 1) for r in self.ring_pages)

    def request_pages(self, num_tokens: int, prompt_tokens: int, max_new_tokens: int) -> int:
        """Slots a request takes at most on a fork of a ``num_tokens``-token sequence (or on a
        new sequence): per global layer the pages its tokens touch, the fork's copy-on-write
        copy of a partly filled tail included; per sliding layer at most a ring."""
        span = self._span(num_tokens, prompt_tokens + max_new_tokens)
        return sum(span if r == 0 else min(r, span) for r in self.ring_pages)

    def request_device_pages(self, num_tokens: int, prompt_tokens: int, max_new_tokens: int) -> int:
        """Of ``request_pages``, those that live on DEVICE whatever the placement: per sliding
        layer its ring pages; per global layer the fork's copy of the tail, the prompt's
        partly filled last page and the decode pages. A global layer's other new pages go
        where the planner places them, or to HOST or DISK when DEVICE runs short
        (``PagedKV.add_pages``)."""
        span = self._span(num_tokens, prompt_tokens + max_new_tokens)
        tail = min(span, 2 + cdiv(max_new_tokens, self.config.page_size))
        return sum(tail if r == 0 else min(r, span) for r in self.ring_pages)

    def question_reserve(self, num_tokens: int) -> int:
        """DEVICE pages a document's pass leaves free when it can (``placement_for``): what a
        question of ``QUESTION_TOKENS`` tokens with ``ANSWER_TOKENS`` new tokens takes there
        on a fork of the ``num_tokens``-token document."""
        return self.request_device_pages(num_tokens, QUESTION_TOKENS, ANSWER_TOKENS)

    def add_document(self, seq: KVSequence) -> None:
        """Register a document's sequence (``LongDocQA.ingest``): its pages may move off
        DEVICE to make room for a question or for another document (``make_device_room``).
        A released sequence drops out."""
        self._documents = [*self._live_documents(), seq]

    def _live_documents(self) -> list[KVSequence]:
        return [d for d in self._documents if not d.released]

    def make_device_room(self, pages: int, *, first: KVSequence | None = None) -> int:
        """Free up to ``pages`` DEVICE slots by moving documents' full pages of global layers
        to HOST or DISK (``PagedKV.move_off_device``: their contents are unchanged, a page a
        question's fork shares stays): ``first``'s, then the registered documents'. Returns
        how many moved."""
        moved = 0
        others = [d for d in self._live_documents() if d is not first]
        for seq in [first, *others] if first is not None else others:
            if moved >= pages:
                break
            moved += self.kv.move_off_device(seq, pages - moved, self.global_layers)
        if moved:
            logger.info("moved %d documents' pages off DEVICE to make room", moved)
        return moved

    def _device_fix(self, pages: int) -> str:
        """The advice for a DEVICE arena that must hold ``pages`` slots beside those in use."""
        minimum = (self.arena.num_used + pages) * self.arena.slot_bytes
        return f"use {_DEVICE_BUDGET} of at least {cdiv(minimum, 2**20)}MiB"

    def check_document(self, num_tokens: int, *, allow_long_context: bool = False) -> None:
        """Refuse up front, before its prefill or DocCache restore, a document of
        ``num_tokens`` tokens after which a question could not be answered: the document and
        a question of ``QUESTION_TOKENS`` tokens with ``ANSWER_TOKENS`` new tokens on a fork
        of it must fit the tiers' free pages. DEVICE must hold the question's tails and rings
        (``request_device_pages``) beside the document's pages that stay there: its rings,
        tails and each global layer's first page (``PagedKV.move_off_device`` keeps it), or
        every page on an engine with DEVICE alone. Other documents' pages that can move off
        DEVICE count as room (``make_device_room`` moves them when it is needed).

        Raises:
            ContextTooLongError: the document alone exceeds the context window.
            CapacityError: the budgets are too small; the message says which to raise.
        """
        empty = self.new_sequence()
        self.check_request(empty, num_tokens, 1, allow_long_context=allow_long_context)
        doc = self.pages_needed(empty, num_tokens)
        question = self.request_pages(num_tokens, QUESTION_TOKENS, ANSWER_TOKENS)
        free, slot = self.kv.free_slots(Tier.DEVICE), self.arena.slot_bytes
        what = (f"this document ({num_tokens} tokens) and a question about it ({QUESTION_TOKENS} tokens, "
                f"{ANSWER_TOKENS} new tokens)")
        packed = self.packed_layout is not None
        if not self.spills:
            if doc + question > free + (self._free_pages(Tier.DEVICE) if packed else 0):
                raise CapacityError(f"the DEVICE KV arena cannot hold {what}: they need {doc + question} pages of "
                                    f"{slot} bytes and {free} are free; {self._device_fix(doc + question)}")
            return
        spare = self._spare_pages()
        if doc + question > spare:
            raise CapacityError(f"the KV tiers cannot hold {what}: they need {doc + question} pages of {slot} "
                                f"bytes and {spare} are free over all tiers; raise {_TIER_BUDGETS}")
        # On DEVICE stay the tails, rings and first pages (with 4-bit pages, the exact windows too).
        stays = self._device_bound(0, num_tokens) + len(self.global_layers) * (
            1 + (PackedPools.window_pages if packed else 0))
        device = stays + self.request_device_pages(num_tokens, QUESTION_TOKENS, ANSWER_TOKENS)
        movable = 0 if packed else sum(self.kv.movable_device_pages(d, self.global_layers)
                                       for d in self._live_documents())
        # Moving them off frees DEVICE as far as HOST and DISK hold them beside the pages of
        # the document and question that are not on DEVICE.
        free += max(0, min(movable, spare - free - (doc + question - device)))
        if device > free:
            raise CapacityError(
                f"the DEVICE KV arena cannot hold {what}: the document keeps {stays} pages there (its tails, "
                f"first pages and sliding-window rings) and the question takes {device - stays}, {device} pages of "
                f"{slot} bytes, and {free} are free; {self._device_fix(device)}")

    def check_request(self, seq: KVSequence, prompt_tokens: int, max_new_tokens: int,
                      *, allow_long_context: bool = False, make_room: bool = False) -> None:
        """Refuse up front a request on ``seq``, or on a fork of it (the fork's copy-on-write
        tails are counted), that exceeds the context window or the KV tiers.

        Args:
            make_room: when DEVICE lacks the room the request's tails and rings need there
                (``request_device_pages``), first move ``seq``'s own full pages of global
                layers to HOST or DISK, then other documents' (``make_device_room``; their
                contents are unchanged). For a document about to be forked for a question: the
                documents' pages move, the question's are scratch.

        Raises:
            ContextTooLongError, CapacityError.
        """
        total = seq.num_tokens + prompt_tokens + max_new_tokens
        if total > self.max_context and not allow_long_context:
            # Fewer new tokens help only when the input alone fits the window.
            fix = ("shorten the input (alone it fills the window, leaving no room for an answer)"
                   if seq.num_tokens + prompt_tokens >= self.max_context else
                   f"shorten the input or lower --max-new-tokens (max_new_tokens) to at most "
                   f"{self.max_context - seq.num_tokens - prompt_tokens}")
            raise ContextTooLongError(
                f"the request needs {total} tokens ({seq.num_tokens} cached + {prompt_tokens} prompt + "
                f"{max_new_tokens} to generate) but the model's context is {self.max_context}; {fix}, "
                "or pass --allow-long-context (allow_long_context=True) to go past it anyway"
            )
        need = self.request_pages(seq.num_tokens, prompt_tokens, max_new_tokens)
        free, slot = self.kv.free_slots(Tier.DEVICE), self.arena.slot_bytes
        packed = self.packed_layout is not None
        if not self.spills:
            if need > free + (self._free_pages(Tier.DEVICE) if packed else 0):
                raise CapacityError(f"the DEVICE KV arena cannot hold this request: it needs {need} more pages of "
                                    f"{slot} bytes and {free} are free; {self._device_fix(need)}")
            return
        spare = self._spare_pages()
        if need > spare:
            raise CapacityError(f"the KV tiers cannot hold this request: it needs {need} more pages of {slot} bytes "
                                f"and {spare} are free over all tiers; raise {_TIER_BUDGETS}")
        # Tails (and their copy-on-write copies), decode growth and sliding-window rings
        # always live on DEVICE.
        device_need = self.request_device_pages(seq.num_tokens, prompt_tokens, max_new_tokens)
        if free < device_need and make_room and not packed:  # (moving 4-bit pages frees no exact slot)
            self.make_device_room(device_need - free, first=seq)
            free = self.kv.free_slots(Tier.DEVICE)
        if free < device_need:
            what = "tail pages and sliding-window rings" if any(self.ring_pages) else "tail pages"
            raise CapacityError(
                f"the DEVICE KV arena cannot hold this request's {what}: it needs {device_need} pages of {slot} "
                f"bytes and {free} are free; {self._device_fix(device_need)}")
