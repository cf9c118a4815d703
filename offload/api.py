"""Python API for long-document QA: ingest a document once, ask it many questions.

    qa = LongDocQA("smollm2-135m")
    doc = qa.ingest(text)                  # prefill of the document, its KV kept in pages
    ans = qa.ask(doc, "Who wrote it?")     # the question's KV is scratch: doc is unchanged
    for piece in qa.ask_stream(doc, "When?"):
        print(piece, end="", flush=True)

Each question runs on a copy-on-write fork of the document's pages, released afterwards, so
any number of questions reuse one ingest and get the answers a fresh run would give.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from offload.config import RuntimeConfig
from offload.kv.doc_cache import DocCache, LoadResult
from offload.kv.doc_restore import RestoreReport
from offload.engine import Engine
from offload.errors import ClosedError, InputError
from offload.model.model_source import default_cache_dir, ensure_cache_dir, resolve_model
from offload.kv.paged_kv import KVSequence
from offload.commands.progress import PrefillProgress, say
from offload.sampling import SamplingConfig
from offload.stats import RunStats
from offload.model.text import first_line, load_codec
from offload.tuning.profile import profile_for

__all__ = ["LongDocQA", "Doc", "Answer", "AnswerStream"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(slots=True)
class Doc:
    """An ingested document: its KV pages stay in the engine until ``LongDocQA.forget``.

    Attributes:
        doc_id: sha256 prefix of the document's token ids.
        num_tokens: tokens of the document part of the prompt.
        stats: what the ingest cost.
        restore: on a DocCache hit, how it was restored (``offload.kv.doc_restore.RestoreReport``:
            the split, its cost model and predictions); None otherwise.
    """

    doc_id: str
    num_tokens: int
    stats: RunStats
    _seq: KVSequence = dataclasses.field(repr=False)
    # The engine holding the pages, weakly (a Doc kept after its LongDocQA closed must not keep
    # the weights and arenas alive): a Doc is usable only with the LongDocQA that ingested it
    # (another engine's pages sit in other arenas; its page ids would name wrong pages there).
    _engine: weakref.ref[Engine] | None = dataclasses.field(default=None, repr=False, compare=False)
    restore: RestoreReport | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclasses.dataclass(slots=True)
class Answer:
    """Generated text, the generated token ids (prompt excluded) and the run's stats."""

    text: str
    token_ids: list[int]
    stats: RunStats

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "stats": self.stats.to_dict()}


class AnswerStream:
    """Iterator over pieces of generated text; ``answer`` is set once it is exhausted.

    Args:
        produce: called once with this stream; yields the pieces and sets ``answer`` at the end.
    """

    def __init__(self, produce: Callable[["AnswerStream"], Iterator[str]]) -> None:
        self.answer: Answer | None = None
        self._pieces = produce(self)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)


class LongDocQA:
    """Long-document question answering over a paged KV cache.

    Args:
        model: a model name (``smollm2-135m``), a ``.gguf`` file or a checkpoint directory.
        config: runtime options (device, dtypes, budgets, page size). Without a ``profile``
            and with budgets that may spill, this machine's saved hardware profile under
            ``cache_dir`` is used, measured once first when there is none (a notice on stderr;
            ``offload.tuning.profile.profile_for``).
        cache_dir: where converted models, DocCaches, the DISK tier and the hardware profile
            live; default ``$OFFLOAD_CACHE`` or ``~/.cache/offload``.
        random_weights / num_layers: shape-only models for throughput runs.
        show_progress: show a prefill progress bar on stderr (and the steps of a profile
            measurement, if one is needed, and a line when an ingest waits for another
            process building the same document's DocCache).
        allow_long_context: allow prompts beyond the model's context window.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        *,
        config: RuntimeConfig | None = None,
        cache_dir: str | Path | None = None,
        random_weights: bool = False,
        num_layers: int | None = None,
        show_progress: bool = False,
        allow_long_context: bool = False,
        doc_cache: bool = True,
        cache_limit_bytes: int | None = None,
        rebuild: bool = True,
    ) -> None:
        cache = ensure_cache_dir(Path(cache_dir) if cache_dir is not None else default_cache_dir())
        self.source = resolve_model(model, cache_dir=cache, random_weights=random_weights,
                                    num_layers=num_layers, show_progress=show_progress)
        config = config or RuntimeConfig()
        if config.kv_dir is None:  # DISK tier files live beside the converted models
            config = dataclasses.replace(config, kv_dir=str(cache / "kv"))
        # Measured here, once per machine, when none is saved and the budgets may spill: the
        # engine never measures (a first prefill would stall for seconds inside forward).
        config = profile_for(config, progress=show_progress, cache_dir=cache)
        self.engine = Engine(self.source, config)
        cfg = self.source.config
        self.codec = load_codec(self.source.tokenizer_dir, cfg.vocab_size, cfg.eos_token_ids)
        self.show_progress = show_progress
        self.allow_long_context = allow_long_context
        self.doc_cache = (DocCache(self.engine, self.source, cache, limit_bytes=cache_limit_bytes, rebuild=rebuild,
                                   notice=say if show_progress else None)
                          if doc_cache else None)

    # ----- documents ----------------------------------------------------------------------
    def ingest(self, text: str, *, require_doc_cache: bool = False) -> Doc:
        """Prefill a document once; its pages are reused by every ``ask``.

        A document is refused before its prefill when, after it, a question of
        ``QUESTION_TOKENS`` (64) tokens with ``ANSWER_TOKENS`` (128) new tokens would not fit
        the KV budgets (``Engine.check_document``); any such question is answered after an
        ingest that succeeds.

        With the DocCache on, a document whose DocCache cannot be saved (larger than
        ``cache_limit_bytes`` or than the free space of the cache dir) is still ingested, not
        saved: ``doc.stats.doc_cache`` is "not saved" and ``doc.stats.doc_cache_reason`` says
        why. This is decided before the prefill.

        Args:
            require_doc_cache: raise ``DocCacheError`` instead, before the prefill, when the
                DocCache cannot be saved (``offload ingest``, whose only job is the DocCache).

        Raises:
            InputError: empty document; ContextTooLongError: longer than the context window;
            CapacityError: no room for the document and a question; DocCacheError (with
            ``require_doc_cache``).
        """
        self._check_open("ingest")
        _check_text(text, "document", "ingest")
        ids = self.codec.qa_prompt(text, "").doc_ids
        stats = RunStats()
        if require_doc_cache and self.doc_cache is None:
            raise InputError("require_doc_cache=True needs the DocCache; make the LongDocQA with doc_cache=True")
        self.engine.check_document(len(ids), allow_long_context=self.allow_long_context)
        t0 = time.perf_counter()
        report = None
        if self.doc_cache is None:
            seq = self._prefill(ids, stats)
            doc_id = hashlib.sha256(str(ids).encode()).hexdigest()[:16]
        else:
            seq, res = self.doc_cache.ingest(ids, lambda i: self._prefill(i, stats), required=require_doc_cache)
            doc_id, report = res.doc_id, res.restore
            _doc_cache_stats(stats, res)
        stats.ttft_s = time.perf_counter() - t0
        self.engine.add_document(seq)  # its pages may move off DEVICE to make room for questions
        self.engine.fill_stats(stats, seq)
        return Doc(doc_id, len(ids), stats, seq, weakref.ref(self.engine), report)

    def _prefill(self, ids: list[int], stats: RunStats) -> KVSequence:
        """The document's prefill onto a new sequence (progress shown), timed into ``stats``."""
        seq = self.engine.new_sequence()
        try:
            self.engine.check_request(seq, len(ids), 1, allow_long_context=self.allow_long_context)
            progress = PrefillProgress("ingest", len(ids), enabled=self.show_progress)
            try:
                stats.prefill_tokens = len(ids)
                t0 = time.perf_counter()
                self.engine.forward(seq, ids, on_layer=progress, document=True)
                self.engine.sync()
                stats.prefill_s = time.perf_counter() - t0
            finally:
                progress.close()
        except BaseException:
            self.engine.release(seq)
            raise
        return seq

    def close(self) -> None:
        """Finish DISK writes and remove the DISK tier's files; the object is unusable after
        (its methods raise ``ClosedError``). Closing twice is allowed."""
        if getattr(self, "_closed", False):
            return
        self._closed = True
        self.engine.close()

    def _check_open(self, what: str) -> None:
        if getattr(self, "_closed", False):
            raise ClosedError(f"{what}: this LongDocQA was closed; make a new LongDocQA (a document's DocCache "
                              "makes its ingest fast)")

    def _check_doc(self, doc: object, what: str) -> Doc:
        """``doc`` if it is a live Doc of this object's engine.

        Raises:
            InputError: not a Doc, another LongDocQA's Doc, or a forgotten one."""
        if not isinstance(doc, Doc):
            raise InputError(f"{what} takes a Doc returned by LongDocQA.ingest, got {type(doc).__name__}; "
                             "call doc = qa.ingest(text) first")
        if doc._engine is None or doc._engine() is not self.engine:
            raise InputError(f"{what}: this Doc ({doc.doc_id}) was ingested by another LongDocQA, and a Doc "
                             "belongs to the object that ingested it; ingest the document with this one "
                             "(its DocCache makes that fast)")
        if doc._seq.released:
            raise InputError(f"{what}: this document ({doc.doc_id}) was forgotten; ingest it again")
        return doc

    def __enter__(self) -> "LongDocQA":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def forget(self, doc: Doc) -> None:
        """Free a document's pages; the Doc must not be used afterwards.

        Raises:
            InputError: not this object's Doc, or forgotten already."""
        self._check_open("forget")
        self.engine.release(self._check_doc(doc, "forget")._seq)

    # ----- questions ----------------------------------------------------------------------
    def ask(self, doc: Doc, question: str, *, max_new_tokens: int = 128,
            sampling: SamplingConfig = SamplingConfig()) -> Answer:
        """Answer a question about an ingested document (the document's KV is unchanged)."""
        stream = self.ask_stream(doc, question, max_new_tokens=max_new_tokens, sampling=sampling)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, doc: Doc, question: str, *, max_new_tokens: int = 128,
                   sampling: SamplingConfig = SamplingConfig()) -> AnswerStream:
        """Like ``ask`` but yields text pieces as tokens are generated.

        A model without a chat template (a base model) gets the completion prompt
        (document, "Question: ...", "Answer:") and its answer ends at the end of its first
        non-empty line (``stop_reason`` "newline"): base models go on to invent more
        question-answer pairs."""
        self._check_open("ask")
        self._check_doc(doc, "ask")
        _check_text(question, "question", "ask")
        _check_generation(max_new_tokens, sampling)
        prompt = self.codec.qa_prompt("", question)
        return self._stream(doc._seq, prompt.question_ids, max_new_tokens, sampling,
                            stop=True, fork=True, one_line=not self.codec.has_chat_template,
                            doc_cache=doc.stats.doc_cache)

    # ----- raw generation -----------------------------------------------------------------
    def generate(self, prompt: str, *, max_new_tokens: int = 128,
                 sampling: SamplingConfig = SamplingConfig(), ignore_eos: bool = False) -> Answer:
        """Continue raw text (no chat template), tokenized as the model's tokenizer does by default."""
        stream = self.generate_stream(prompt, max_new_tokens=max_new_tokens, sampling=sampling,
                                      ignore_eos=ignore_eos)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def generate_stream(self, prompt: str, *, max_new_tokens: int = 128,
                        sampling: SamplingConfig = SamplingConfig(), ignore_eos: bool = False) -> AnswerStream:
        self._check_open("generate")
        _check_text(prompt, "prompt", "generate")
        _check_generation(max_new_tokens, sampling)
        ids = self.codec.encode(prompt)
        if not ids:
            raise InputError("the prompt tokenizes to nothing; give some text to continue")
        return self._stream(self.engine.new_sequence(), ids, max_new_tokens, sampling,
                            stop=not ignore_eos, fork=False)

    def _stream(self, base: KVSequence, ids: list[int], max_new_tokens: int,
                sampling: SamplingConfig, *, stop: bool, fork: bool, one_line: bool = False,
                doc_cache: str = "") -> AnswerStream:
        try:
            # Checked on the document before the fork (its copy-on-write tails counted): when
            # DEVICE is short, the document's pages move to HOST or DISK, not the question's.
            self.engine.check_request(base, len(ids), max_new_tokens, allow_long_context=self.allow_long_context,
                                      make_room=fork)
        except BaseException:
            if not fork:
                self.engine.release(base)
            raise
        seq = self.engine.fork(base) if fork else base
        return AnswerStream(lambda stream: self._pieces(stream, seq, ids, max_new_tokens, sampling, stop, one_line,
                                                        doc_cache))

    def _pieces(self, stream: AnswerStream, seq: KVSequence, ids: list[int], max_new_tokens: int,
                sampling: SamplingConfig, stop: bool, one_line: bool, doc_cache: str) -> Iterator[str]:
        stats = RunStats(doc_cache=doc_cache)
        stop_ids = self.codec.eos_ids if stop else ()
        progress = PrefillProgress("prefill", len(ids), enabled=self.show_progress and len(ids) > 256)
        out: list[int] = []
        shown = ""
        line_done = False
        try:
            for tok in self.engine.generate(seq, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                            stop_ids=stop_ids, stats=stats, on_layer=progress):
                progress.close()
                out.append(tok)
                text = self.codec.decode([t for t in out if t not in stop_ids])
                if one_line and (line := first_line(text)) is not None:
                    text, line_done = line, True
                    stats.stop_reason = "newline"
                # Hold back an incomplete multi-byte character until it is complete.
                if len(text) > len(shown) and not text.endswith("\ufffd"):
                    yield text[len(shown):]
                    shown = text
                if line_done:
                    break
        finally:
            progress.close()
            self.engine.release(seq)
        text = self.codec.decode([t for t in out if t not in stop_ids])
        if line_done:
            text = first_line(text) or ""
        if len(text) > len(shown):
            yield text[len(shown):]
        stream.answer = Answer(text, out, stats)


def _doc_cache_stats(stats: RunStats, res: LoadResult) -> None:
    """What the DocCache did, into the ingest's stats."""
    stats.doc_cache, stats.doc_cache_reason = res.status, res.reason
    stats.doc_cache_verify_s, stats.doc_cache_bytes_read = res.verify_s, res.bytes
    stats.doc_cache_evicted = list(res.evicted)
    if res.restore is not None:
        stats.restore_recompute_tokens = res.restore.recompute_tokens
        stats.restore_predicted_s = res.restore.predicted_s
        stats.restore_plan = res.restore.plan


def _check_text(text: object, what: str, method: str) -> None:
    """Raises InputError unless ``text`` is a str with some non-blank text."""
    if isinstance(text, (bytes, bytearray)):
        raise InputError(f"{method} takes the {what} as str, got {type(text).__name__}; decode it first, "
                         "e.g. data.decode('utf-8')")
    if not isinstance(text, str):
        raise InputError(f"{method} takes the {what} as str, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"the {what} is empty; give {method} some text")


def _check_generation(max_new_tokens: object, sampling: object) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be an int of at least 1, got {max_new_tokens!r}")
    if not isinstance(sampling, SamplingConfig):
        raise InputError(f"sampling takes a SamplingConfig, got {type(sampling).__name__}")
