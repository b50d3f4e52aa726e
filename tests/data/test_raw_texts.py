"""The raw strings beside a corpus (data/texts.py) for a distillation teacher: read again in the
order and with the skips of the reader that tokenised them, viewed like --split's parts, and
carried by contrastive batches in their document order (anchors, positives, hard negatives;
per GradCache chunk), without the query prompt; item shapes unchanged without them."""

import json

import pytest

from megatron_gem.data import ContrastiveDataset, DataError, GEMDataLoader, InMemoryCorpus, RawTexts, open_corpus, open_pair_corpus, read_texts
from megatron_gem.data.preprocess import preprocess_to_indexed
from megatron_gem.data.tokenization import PromptedText
from megatron_gem.gem import GEMConfig
from megatron_gem.testing import sample_sentences


@pytest.fixture(scope="module")
def cfg(tiny_tokenizer):
    return GEMConfig(num_special_tokens=1, special_token_ids=[len(tiny_tokenizer)])


def test_read_texts_follows_the_reader_skips_included(tmp_path, tiny_tokenizer):
    texts = sample_sentences(12, seed=3)
    lines = [json.dumps({"text": t}) for t in texts]
    lines[4] = '{"text": 7}'  # a bad record: skipped by both readings
    lines[9] = "not json"
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    kept = [t for i, t in enumerate(texts) if i not in (4, 9)]
    assert read_texts(str(path), on_bad="skip") == kept
    corpus = open_corpus(str(path), tiny_tokenizer, on_bad="skip")
    assert [corpus.get(i).tolist() for i in range(len(corpus))] == [tiny_tokenizer(t)["input_ids"] for t in kept]
    prefix, _ = preprocess_to_indexed(str(path), tiny_tokenizer, str(tmp_path / "tok"), on_bad="skip", progress=False)
    with pytest.raises(DataError, match="holds token ids, not the text a teacher reads"):
        read_texts(prefix)


def test_raw_texts_items_and_views():
    raw = RawTexts(["a", "b", "c", "d"])
    assert raw.get(2) == ("c", "c", [])  # self-supervised: the positive is a view of the anchor's own text
    pairs = RawTexts(["q0", "q1", "q2"], ["p0", "p1", "p2"], [[], ["n1"], ["n2a", "n2b"]])
    assert pairs.get(2) == ("q2", "p2", ["n2a", "n2b"])
    part = pairs.view(1, 3)
    assert len(part) == 2 and part.get(0) == ("q1", "p1", ["n1"]) and part.get(1) == ("q2", "p2", ["n2a", "n2b"])
    with pytest.raises(ValueError, match="outside 3 items"):
        pairs.view(2, 4)
    with pytest.raises(ValueError, match="2 positives for 3 anchors"):
        RawTexts(["a", "b", "c"], ["x", "y"])


def test_contrastive_batches_carry_their_documents_texts(tmp_path, tiny_tokenizer, cfg):
    path = tmp_path / "pairs.jsonl"
    texts = sample_sentences(30, seed=4)
    records = [{"query": f"question {i}", "positive": texts[i], **({"negative": [texts[10 + i], texts[20 + i]]} if i % 3 == 0 else {})} for i in range(10)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs = open_pair_corpus(str(path), tiny_tokenizer, negative_field="negative", query_prompt="query: ", keep_texts=True)
    assert pairs.texts.get(3) == ("question 3", texts[3], [texts[13], texts[23]])  # no prompt: the teacher's input

    def batch(chunk):
        ds = ContrastiveDataset(
            pairs.queries,
            cfg,
            positives=pairs.positives,
            negatives=pairs.negatives,
            texts=pairs.texts,
            max_text_len=20,
            seq_length=64,
            shuffle=False,
            chunk_size=chunk,
        )
        return next(iter(GEMDataLoader(ds, micro_batch_size=7)))

    def expected(a, b):
        return [f"question {i}" for i in range(a, b)] + texts[a:b] + [t for i in range(a, b) if i % 3 == 0 for t in (texts[10 + i], texts[20 + i])]

    whole = batch(None)
    assert whole["texts"] == expected(0, 7) and len(whole["texts"]) == 2 * whole["num_texts"] + whole["num_negatives"]
    chunked = batch(3)
    assert [c["texts"] for c in chunked["chunks"]] == [expected(0, 3), expected(3, 6), expected(6, 7)] and "texts" not in chunked

    # self-supervised: both sides are the document's text; the query prompt is the student's alone
    docs = InMemoryCorpus.from_texts(texts, tiny_tokenizer)
    ds = ContrastiveDataset(
        docs, cfg, texts=RawTexts(texts), anchor_prompt=PromptedText(tiny_tokenizer, "query: "), max_text_len=20, seq_length=64, shuffle=False
    )
    b = next(iter(GEMDataLoader(ds, micro_batch_size=4)))
    assert b["texts"] == texts[:4] + texts[:4]
    plain = ContrastiveDataset(docs, cfg, max_text_len=20, seq_length=64, shuffle=False)
    assert len(plain[0]) == 3 and "texts" not in next(iter(GEMDataLoader(plain, micro_batch_size=4)))  # unchanged without texts
    with pytest.raises(ValueError, match="must be aligned"):
        ContrastiveDataset(docs, cfg, texts=RawTexts(texts[:-1]), max_text_len=20, seq_length=64)
