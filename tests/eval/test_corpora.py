"""Readers of installed data: shapes, gold labels, the held-out split, clear errors when missing."""

import os

import pytest

from megatron_gem.eval import corpora


def _have(path):
    return os.path.exists(path)


needs_wordnet = pytest.mark.skipif(not _have(corpora.WORDNET_DIR), reason="wordnet-base not installed (bash tools/install_corpora.sh)")
needs_fortunes = pytest.mark.skipif(not _have(corpora.FORTUNES_DIR), reason="fortunes not installed (bash tools/install_corpora.sh)")
needs_pydoc = pytest.mark.skipif(not _have(corpora.PYTHON_DOC_DIR), reason="python3.11-doc not installed (bash tools/install_corpora.sh)")


def test_missing_sources_name_the_package(tmp_path):
    with pytest.raises(corpora.CorpusMissing, match="wordnet-base"):
        corpora.wordnet_synsets(root=str(tmp_path))
    with pytest.raises(corpora.CorpusMissing, match="'fortunes'"):
        corpora.fortunes(root=str(tmp_path))
    with pytest.raises(corpora.CorpusMissing, match="python3.11-doc"):
        corpora.python_faq(root=str(tmp_path))
    with pytest.raises(corpora.CorpusMissing, match="python3.11-doc"):
        corpora.python_doc_paragraphs(root=str(tmp_path))
    with pytest.raises(corpora.CorpusMissing, match="pip install no-such-dist"):
        corpora._package_dir("no_such_module_xyz", "no-such-dist")


def test_wordnet_parser_on_a_small_file(tmp_path):
    header = "  1 This software and database is being provided to you, the LICENSEE, by\n"
    noun = header + '00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived; "the entity was there"; "a b"\n'
    verb = '00001740 29 v 04 breathe 0 take_a_breath 0 respire 0 suspire 3 021 | draw air into, and expel out of, the lungs; "I can breathe better now"\n'
    adj = "00001740 00 a 01 able(a) 0 000 | (usually followed by `to') having the necessary means\n"
    for name, text in (("noun", noun), ("verb", verb), ("adj", adj), ("adv", "")):
        (tmp_path / f"data.{name}").write_text(text)
    syn = corpora.wordnet_synsets(root=str(tmp_path))
    assert [s.lexname for s in syn] == ["noun.Tops", "verb.body", "adj.all"]
    assert syn[0].definition == "that which is perceived"
    assert syn[0].examples == ("the entity was there",)  # "a b" is too short to be an example
    assert syn[1].words == ("breathe", "take a breath", "respire", "suspire")
    assert syn[2].words == ("able",)


def test_heldout_split_is_fixed_and_about_ten_percent():
    keys = [f"{i:08d}-n" for i in range(5000)]
    frac = sum(corpora.is_heldout(k) for k in keys) / len(keys)
    assert 0.08 < frac < 0.12
    assert [corpora.is_heldout(k) for k in keys[:50]] == [corpora.is_heldout(k) for k in keys[:50]]


@needs_wordnet
def test_wordnet_glosses_exclude_heldout_and_are_deterministic():
    held = {s.definition for s in corpora.wordnet_synsets() if s.heldout}
    only_held = held - {s.definition for s in corpora.wordnet_synsets() if not s.heldout}
    g = corpora.wordnet_glosses(2000)
    assert len(g) == 2000 and len(set(g)) == 2000
    assert not set(g) & only_held
    assert g == corpora.wordnet_glosses(2000)
    assert all(isinstance(t, str) and t for t in g)


@needs_wordnet
def test_wordnet_pairs_come_from_training_synsets_only():
    synsets = corpora.wordnet_synsets()
    held = {t for s in synsets if s.heldout for t in (s.definition, *s.examples)}
    train = {t for s in synsets if not s.heldout for t in (s.definition, *s.examples)}
    pairs = corpora.wordnet_pairs()
    kinds = {p["kind"] for p in pairs}
    assert kinds == {"word_definition", "definition_example", "synonym"}
    sentences = {"word_definition": ("positive",), "definition_example": ("query", "positive"), "synonym": ()}
    only_held = held - train
    for p in pairs:  # no definition/example only a held-out synset has (the evaluation's) is trained on
        for side in sentences[p["kind"]]:
            assert p[side] not in only_held, p
    examples_of = {}
    for s in synsets:
        if not s.heldout:
            examples_of.setdefault(s.definition, set()).update(s.examples)
    for p in (p for p in pairs if p["kind"] == "definition_example"):
        assert p["positive"] in examples_of[p["query"]], p
    assert len({(p["query"], p["positive"]) for p in pairs}) == len(pairs)
    assert corpora.wordnet_pairs(500) == pairs[:500]


@needs_fortunes
def test_fortunes_have_categories():
    f = corpora.fortunes()
    assert len(f) >= 30 and all(len(t) >= 20 for t in f["computers"])
    assert not any("\n%" in t for v in f.values() for t in v)


@needs_pydoc
def test_python_faq_pairs():
    faq = corpora.python_faq()
    assert len(faq) > 100
    q, a = faq[0]
    assert q.endswith("?") and len(a.split()) >= 5 and ":func:" not in a


def test_gensim_gold_sets():
    assert len(corpora.simlex999()) == 999
    assert len(corpora.wordsim353()) == 353
    docs, sims = corpora.lee50()
    assert len(docs) == 50 and sims[0][0] == 1.0


def test_red_trivia():
    items = corpora.red_trivia()
    assert len(items) > 5000 and len({i.category for i in items}) > 30
    assert all(i.answers for i in items[:100])


@needs_pydoc
def test_held_out_pieces_are_whole_word_slices_of_the_held_out_text():
    """The serving benchmarks' texts: n pieces of 90-100% of the asked length (a word longer than
    that aside), each a run of whole words of one Python tutorial paragraph or GNU info section."""
    pieces = corpora.held_out_pieces(40, 200)
    assert len(pieces) == 40 and len(set(pieces)) == 40
    sources = [" ".join(p.split()) for p in corpora.python_doc_paragraphs()]
    for piece in pieces:
        assert 180 <= len(piece) <= 200 or " " not in piece
        assert any(f" {piece} " in f" {src} " for src in sources), piece[:60]
    assert corpora.held_out_pieces(10, 200) == pieces[:10]  # a prefix: fewer texts, the same first ones
    with pytest.raises(ValueError, match="pieces of ~200 characters"):
        corpora.held_out_pieces(10**7, 200)
