"""LongDocQA: a question's KV is scratch, streaming, sampling reproducibility, bad input."""
from __future__ import annotations

import pytest
import torch

from offload import InputError, LongDocQA, RuntimeConfig, SamplingConfig

QUESTIONS = ["What is the essay about?", "Who is mentioned first in the essay?"]
MAX_NEW = 24


@pytest.fixture(scope="module")
def document(essays_text) -> str:
    return essays_text[:6000]


def _qa(cache_dir) -> LongDocQA:
    return LongDocQA("smollm2-135m", config=RuntimeConfig(device="cpu"), cache_dir=cache_dir)


@pytest.fixture(scope="module")
def qa(smollm2_source, cache_dir) -> LongDocQA:
    """One LongDocQA for the module's tests (each question runs on a scratch fork, so tests
    sharing it see the document as it was ingested)."""
    return _qa(cache_dir)


@pytest.fixture(scope="module")
def doc(qa, document):
    return qa.ingest(document)


def _doc_pages(qa: LongDocQA, doc) -> list[torch.Tensor]:
    seq = doc._seq
    out = []
    for layer in range(qa.engine.model_config.num_layers):
        for g in qa.engine.kv.reader.layer_groups(seq, layer, max_tokens=1 << 30):
            out += [g.k.clone(), g.v.clone()]
    return out


def test_ask_twice_equals_fresh_single_question_runs(qa, doc, cache_dir, document):
    assert doc.num_tokens > 1000
    before = _doc_pages(qa, doc)
    used_before = qa.engine.arena.num_used
    answers = [qa.ask(doc, q, max_new_tokens=MAX_NEW) for q in QUESTIONS]
    # The document's pages are byte-identical and every scratch page was given back.
    after = _doc_pages(qa, doc)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert qa.engine.arena.num_used == used_before
    for q, got in zip(QUESTIONS, answers):
        fresh = _qa(cache_dir)
        want = fresh.ask(fresh.ingest(document), q, max_new_tokens=MAX_NEW)
        assert got.token_ids == want.token_ids
        assert got.text == want.text
    assert answers[0].token_ids != answers[1].token_ids  # different questions, different answers
    assert answers[0].stats.prefill_tokens < 64  # the document was not prefilled again
    assert answers[0].stats.context_tokens > doc.num_tokens


def test_stream_yields_the_answer_text(qa, doc):
    stream = qa.ask_stream(doc, QUESTIONS[0], max_new_tokens=MAX_NEW)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == stream.answer.text == qa.ask(doc, QUESTIONS[0], max_new_tokens=MAX_NEW).text


def test_seeded_sampling_reproduces(qa, doc):
    s1 = SamplingConfig(temperature=1.0, top_p=0.95, seed=7)
    a = qa.ask(doc, QUESTIONS[0], max_new_tokens=MAX_NEW, sampling=s1)
    b = qa.ask(doc, QUESTIONS[0], max_new_tokens=MAX_NEW, sampling=s1)
    c = qa.ask(doc, QUESTIONS[0], max_new_tokens=MAX_NEW, sampling=SamplingConfig(temperature=1.0, seed=8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_generate_tokenizes_like_the_hf_tokenizer(qa, smollm2_tokenizer):
    prompt = "The capital of France is"
    ans = qa.generate(prompt, max_new_tokens=4)
    seq = qa.engine.new_sequence()
    want = list(qa.engine.generate(seq, smollm2_tokenizer(prompt).input_ids, max_new_tokens=4,
                                   stop_ids=qa.codec.eos_ids))
    qa.engine.release(seq)
    assert ans.token_ids == want
    assert ans.stats.prefill_tokens == len(smollm2_tokenizer(prompt).input_ids)


@pytest.mark.parametrize("doc_text, question, match", [
    ("", "q?", "document is empty"),
    ("   \n", "q?", "document is empty"),
    ("Some text.", "", "question is empty"),
])
def test_bad_input_is_refused(qa, doc_text, question, match):
    with pytest.raises(InputError, match=match):
        qa.ask(qa.ingest(doc_text), question)


def test_forgotten_document_is_refused(smollm2_source, cache_dir):
    qa = _qa(cache_dir)
    doc = qa.ingest("A short document about cats.")
    qa.forget(doc)
    assert qa.engine.arena.num_used == 0
    with pytest.raises(InputError, match="ingest it again"):
        qa.ask(doc, "What about cats?")
