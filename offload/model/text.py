"""Tokenization and prompt construction.

``TextCodec`` wraps the model's own Hugging Face tokenizer (loaded from the checkpoint or the
converted GGUF; never from a hub). Random-weight shape-only models have no tokenizer and use
``ByteCodec``: UTF-8 bytes as ids, for throughput runs only.

A question-answering prompt is split in two so the document's KV can be reused:
``doc_ids`` (template head + document) then ``question_ids`` (question + template tail).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

__all__ = ["TextCodec", "ByteCodec", "QAPrompt", "load_codec", "first_line"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever fetched from a hub at run time

_DOC_MARK = "\u2063DOC\u2063"
_Q_MARK = "\u2063QUESTION\u2063"
_INSTRUCTION = "Read the document below, then answer the question that follows it.\n\n"


@dataclasses.dataclass(frozen=True, slots=True)
class QAPrompt:
    """Token ids of a QA prompt: the reusable document part and the per-question part."""

    doc_ids: list[int]
    question_ids: list[int]


class TextCodec:
    """The model's Hugging Face tokenizer and chat template."""

    def __init__(self, tokenizer_dir: Path, eos_ids: tuple[int, ...] = ()) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        ids = set(eos_ids)
        if self.tok.eos_token_id is not None:
            ids.add(int(self.tok.eos_token_id))
        self.eos_ids = tuple(sorted(ids))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str) -> list[int]:
        """Token ids exactly as the tokenizer gives them by default (special tokens included)."""
        return list(self.tok(text).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _encode_plain(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def qa_prompt(self, document: str, question: str) -> QAPrompt:
        """Chat template when the model has one (tokenized as ``apply_chat_template`` does,
        without extra special tokens), else a completion prompt ending in ``Answer:``."""
        if not self.has_chat_template:
            doc_text = f"{document}\n\n"
            q_text = f"Question: {question}\nAnswer:"
            return QAPrompt(self.encode(doc_text), self._encode_plain(q_text))
        content = f"{_INSTRUCTION}<document>\n{_DOC_MARK}\n</document>\n\n{_Q_MARK}"
        rendered = self.tok.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        head, rest = rendered.split(_DOC_MARK)
        middle, tail = rest.split(_Q_MARK)
        doc_text = head + document + middle
        return QAPrompt(self._encode_plain(doc_text), self._encode_plain(f"Question: {question}{tail}"))


class ByteCodec:
    """UTF-8 bytes as token ids (offset by 3), for random-weight runs without a tokenizer."""

    has_chat_template = False

    def __init__(self, vocab_size: int, eos_ids: tuple[int, ...] = ()) -> None:
        if vocab_size < 259:
            raise ValueError(f"byte codec needs a vocabulary of >= 259 ids, got {vocab_size}")
        self.eos_ids = eos_ids

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", errors="replace")

    def qa_prompt(self, document: str, question: str) -> QAPrompt:
        return QAPrompt(self.encode(f"{document}\n\n"), self.encode(f"Question: {question}\nAnswer:"))


def load_codec(tokenizer_dir: Path | None, vocab_size: int, eos_ids: tuple[int, ...]) -> TextCodec | ByteCodec:
    if tokenizer_dir is None:
        return ByteCodec(vocab_size, eos_ids)
    return TextCodec(tokenizer_dir, eos_ids)


def first_line(text: str) -> str | None:
    """``text`` up to the end of its first non-empty line, or None while that line goes on."""
    body = text.lstrip()
    end = body.find("\n")
    return None if end < 0 else text[: len(text) - len(body) + end]
