"""The natural-sentence and the distillation training texts are disjoint from every evaluation
text, and the held-out GNU info task is disjoint from every training corpus. The evaluation texts are collected here
through the builders themselves (the sets the tasks really score), not through the module's
own pool, so a pool that misses a source makes these tests fail."""

import os

import pytest

from megatron_gem.eval import builders, corpora, quick, tasks, training_sources
from megatron_gem.eval.training_text import (
    DISTILLATION_SOURCES,
    distillation_texts,
    evaluated_packages,
    evaluation_texts,
    natural_sentences,
    normalise,
    sentences,
    write_jsonl,
)

needs_all = pytest.mark.skipif(
    not all(os.path.exists(p) for p in (corpora.WORDNET_DIR, corpora.FORTUNES_DIR, corpora.PYTHON_DOC_DIR, corpora.INFO_DIR)),
    reason="corpora not installed (bash tools/install_corpora.sh)",
)


needs_distill = pytest.mark.skipif(
    not os.path.isfile(os.path.join(training_sources.GCIDE_DIR, "gcide.index")) or not os.path.isfile(training_sources.DPKG_STATUS),
    reason="dict-gcide not installed (bash tools/install_corpora.sh)",
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


@pytest.fixture(scope="module")
def every_evaluation_text():
    return _every_evaluation_text()


@pytest.fixture(scope="module")
def natural():
    return natural_sentences()


@pytest.fixture(scope="module")
def distill():
    return distillation_texts()


def _overlaps(train: list[str], evaluation: list[str]) -> list[str]:
    full = {normalise(t) for t in evaluation}
    sent = {s for t in evaluation for s in sentences(t)}
    return [t for t in train if normalise(t) in full or any(s in sent for s in sentences(t))]


def test_normalise_and_sentences():
    assert normalise("  The Cat -- sat, on\tthe MAT!") == "the cat sat on the mat"
    assert sentences("Short one. This sentence has at least six words in it! Ok?") == ["this sentence has at least six words in it"]


@needs_all
def test_natural_text_is_disjoint_from_every_evaluation_text(every_evaluation_text, natural):
    text = natural
    evaluation = every_evaluation_text
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
@needs_distill
def test_heldout_task_is_disjoint_from_every_training_corpus(distill, natural):
    heldout = _texts_of(tasks._build("GNUInfoSections", 1.0, 0))
    assert len(heldout) > 1000
    training = corpora.wordnet_glosses() + natural.texts + distill.texts
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


def _consistent(text) -> None:
    """Deduplicated; every candidate kept or dropped for a counted reason; one source per text."""
    assert len({normalise(t) for t in text.texts}) == len(text.texts)
    for source, c in text.counts.items():
        assert c["read"] == c["kept"] + sum(v for k, v in c.items() if k.startswith("dropped: ")), source
        assert text.sources.count(source) == c["kept"], source
    assert len(text.sources) == len(text.texts) == sum(c["kept"] for c in text.counts.values())


@needs_all
@needs_distill
def test_distillation_text_is_disjoint_from_every_evaluation_text(distill, every_evaluation_text, natural):
    assert _overlaps(distill.texts, every_evaluation_text) == []
    _consistent(distill)
    assert list(distill.counts) == list(DISTILLATION_SOURCES)
    assert all(c["kept"] > 0 for c in distill.counts.values()), {s: c["kept"] for s, c in distill.counts.items()}
    assert len(distill.texts) > 200000
    # The natural-sentence text is part of it, text for text.
    assert {normalise(t) for t in natural.texts} <= {normalise(t) for t in distill.texts}
    # Only training WordNet synsets: no held-out definition or example is kept (the rule above
    # drops equal texts; this checks the split itself).
    held = {normalise(t) for s in corpora.wordnet_synsets() if s.heldout for t in (s.definition, *s.examples)}
    assert not held & {normalise(t) for t, src in zip(distill.texts, distill.sources) if src.startswith("wordnet")}


@needs_all
@needs_distill
def test_packages_an_evaluation_reads_give_no_man_page_or_description(distill):
    evaluated = evaluated_packages()
    assert {"coreutils", "grep", "sed", "python3.11", "wordnet", "fortune-mod"} <= evaluated
    source = training_sources.source_packages()
    pages = training_sources.man_page_names()
    kept = {normalise(t) for t, s in zip(distill.texts, distill.sources) if s == "man-pages"}
    theirs = [p for p in pages if source.get(p.package, p.package) in evaluated]
    assert any(p.text.startswith("cat - concatenate files") for p in theirs)
    assert not kept & {normalise(p.text) for p in theirs if len(normalise(p.text).split()) >= 5}
    assert distill.counts["man-pages"]["dropped: a package an evaluation reads"] == len(theirs)
    assert distill.counts["debian-descriptions"]["dropped: a package an evaluation reads"] > 0
    # Other packages' pages are kept, at most MAN_PAGES_PER_PACKAGE of one package.
    assert any(t.startswith("git-") for t, s in zip(distill.texts, distill.sources) if s == "man-pages")
    assert sum(t.startswith("gcloud ") for t, s in zip(distill.texts, distill.sources) if s == "man-pages") <= 200


@needs_all
@needs_distill
def test_distillation_sample_per_source_and_jsonl(distill, tmp_path):
    import json

    sources = ("wordnet-examples", "fortunes", "debian-descriptions")
    small = distillation_texts(300, seed=1, sources=sources)
    _consistent(small)
    assert {s: c["kept"] for s, c in small.counts.items()} == {s: min(300, distill.counts[s]["kept"]) for s in sources}
    assert distillation_texts(300, seed=1, sources=sources).texts == small.texts  # deterministic
    assert set(small.texts) <= set(distill.texts)
    path = write_jsonl(str(tmp_path / "distill.jsonl"), small)
    records = [json.loads(line) for line in open(path)]
    assert records == [{"text": t, "source": s} for t, s in zip(small.texts, small.sources)]
    counts = json.load(open(str(tmp_path / "distill.counts.json")))
    assert counts["written"] == len(records) and counts["fortunes"]["kept"] == small.counts["fortunes"]["kept"]
    with pytest.raises(ValueError, match="unknown training text source"):
        distillation_texts(sources=("gcide-definitions", "the-web"))
