"""The natural-sentence training text is disjoint from every evaluation text, and the held-out
GNU info task is disjoint from every training corpus. The evaluation texts are collected here
through the builders themselves (the sets the tasks really score), not through the module's
own pool, so a pool that misses a source makes these tests fail."""

import os

import pytest

from megatron_gem.eval import builders, corpora, quick, tasks
from megatron_gem.eval.training_text import evaluation_texts, natural_sentences, normalise, sentences

needs_all = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (corpora.WORDNET_DIR, corpora.FORTUNES_DIR, corpora.PYTHON_DOC_DIR, corpora.INFO_DIR)),
    reason="corpora not installed (bash tools/install_corpora.sh)",
)


def _texts_of(labelled) -> list[str]:
    if isinstance(labelled, builders.PairSet):
        return labelled.text1 + labelled.text2
    if isinstance(labelled, builders.RetrievalSet):
        return labelled.queries + labelled.docs
    if isinstance(labelled, builders.LabelSet):
        return labelled.texts
    raise TypeError(type(labelled))


def _every_evaluation_text() -> list[str]:
    """Every text the evaluations score: each offline task (full scale) and the held-out task,
    the demo's quick tasks at the sizes the demo and tests use, the MC items, the perplexity
    paragraphs."""
    out = []
    for name in tasks.OFFLINE_TASKS + tasks.HELDOUT_TASKS:
        out += _texts_of(tasks._build(name, 1.0, 0))
    for n in (8, 200, 300):
        for t in quick.demo_tasks(max_items=n, seed=0):
            out += _texts_of(t)
    for it in builders.trivia_mc(None) + builders.wordnet_definition_mc(None):
        out += [it.question, *it.choices]
    out += corpora.python_doc_paragraphs()
    return out


def _overlaps(train: list[str], evaluation: list[str]) -> list[str]:
    full = {normalise(t) for t in evaluation}
    sent = {s for t in evaluation for s in sentences(t)}
    return [t for t in train if normalise(t) in full or any(s in sent for s in sentences(t))]


def test_normalise_and_sentences():
    assert normalise("  The Cat -- sat, on\tthe MAT!") == "the cat sat on the mat"
    assert sentences("Short one. This sentence has at least six words in it! Ok?") == ["this sentence has at least six words in it"]


@needs_all
def test_natural_text_is_disjoint_from_every_evaluation_text():
    text = natural_sentences()
    evaluation = _every_evaluation_text()
    # The module's pool covers what the builders really produce (the MC questions wrap a
    # WordNet word in a template; their choices are held-out definitions).
    pool = {normalise(t) for ts in evaluation_texts().values() for t in ts}
    uncovered = [t for t in evaluation if normalise(t) not in pool and not t.startswith('What does the word "')]
    assert not uncovered, uncovered[:5]
    assert _overlaps(text.texts, evaluation) == []
    assert len(text.texts) > 20000
    assert len({normalise(t) for t in text.texts}) == len(text.texts)  # deduplicated
    for source, c in text.counts.items():  # every candidate is kept or dropped for a counted reason
        dropped = sum(v for k, v in c.items() if k.startswith("dropped: "))
        assert c["read"] == c["kept"] + dropped, source
    assert sum(c["kept"] for c in text.counts.values()) == len(text.texts)
    # The filter does drop real overlaps (shared WordNet examples, the same quote in two fortune files).
    assert sum(c["dropped: equals an evaluation text"] + c["dropped: shares a sentence with an evaluation text"] for c in text.counts.values()) > 0
    assert natural_sentences(500, seed=3).texts == natural_sentences(seed=3).texts[:500]


@needs_all
def test_heldout_task_is_disjoint_from_every_training_corpus():
    heldout = _texts_of(tasks._build("GNUInfoSections", 1.0, 0))
    assert len(heldout) > 1000
    training = corpora.wordnet_glosses() + natural_sentences().texts
    training += [t for p in corpora.wordnet_pairs() for t in (p["query"], p["positive"])]
    assert _overlaps(training, heldout) == []


@needs_all
def test_gnu_info_sections_have_unique_headings_and_prose():
    secs = corpora.gnu_info_sections()
    assert len(secs) > 500
    assert len({s.heading.lower() for s in secs}) == len(secs)
    assert not any(s.manual.startswith("python") for s in secs)
    assert all(len(s.text.split()) >= 20 and len(s.text) <= 1200 and "\u2018" not in s.text for s in secs)
    cat = next(s for s in secs if s.heading.startswith("cat:"))
    assert cat.manual == "coreutils" and "standard output" in cat.text


def test_gnu_info_missing_names_the_package(tmp_path):
    with pytest.raises(corpora.CorpusMissing, match="coreutils"):
        corpora.gnu_info_sections(root=str(tmp_path))
