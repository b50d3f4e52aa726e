"""Labelled evaluation sets built at run time from :mod:`corpora` (nothing derived is stored).

Three shapes, each with the gold labels written by others:
  PairSet       text pairs with a human similarity score        metric: Spearman of cosine
  RetrievalSet  queries, documents, relevant documents per query  metric: MRR of cosine ranking
  LabelSet      texts with a category                            metric: leave-one-out kNN accuracy

Every builder is deterministic in ``(max_items, seed)``; subsampling uses its own
``random.Random(seed)``. The same sets back the quick demo scores (:mod:`quick`) and the
offline MTEB tasks (:mod:`tasks`), so the two never disagree on data.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import corpora

EncodeFn = Callable[[list[str]], "np.ndarray"]


def _as_unit_rows(x) -> np.ndarray:
    """[n, d] array/tensor -> float64 numpy with unit-norm rows (zero rows stay zero)."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"encode() must return a [n, d] array, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _encode(encode: EncodeFn, texts: Sequence[str]) -> np.ndarray:
    out = _as_unit_rows(encode(list(texts)))
    if out.shape[0] != len(texts):
        raise ValueError(f"encode() returned {out.shape[0]} rows for {len(texts)} texts")
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b)[0])


@dataclass
class PairSet:
    name: str
    text1: list[str]
    text2: list[str]
    scores: list[float]
    min_score: float
    max_score: float
    description: str = ""
    metric: str = "spearman"

    def __len__(self) -> int:
        return len(self.scores)

    def score(self, encode: EncodeFn) -> float:
        """Spearman correlation between cosine similarity and the human scores."""
        uniq = sorted(set(self.text1) | set(self.text2))
        index = {t: i for i, t in enumerate(uniq)}
        emb = _encode(encode, uniq)
        a = emb[[index[t] for t in self.text1]]
        b = emb[[index[t] for t in self.text2]]
        return _spearman((a * b).sum(1), np.asarray(self.scores))


@dataclass
class RetrievalSet:
    name: str
    queries: list[str]
    docs: list[str]
    relevant: list[set[int]]  # per query: indices into docs
    description: str = ""
    metric: str = "mrr"

    def __len__(self) -> int:
        return len(self.queries)

    def score(self, encode: EncodeFn) -> float:
        """Mean reciprocal rank of the first relevant document under cosine similarity
        (ties count against the query: a relevant document's rank is 1 + the number of
        documents scored at least as high that are not relevant)."""
        q, d = _encode(encode, self.queries), _encode(encode, self.docs)
        sims = q @ d.T
        rr = []
        for i, rel in enumerate(self.relevant):
            rel = sorted(rel)
            best = sims[i, rel].max()
            mask = np.ones(len(self.docs), dtype=bool)
            mask[rel] = False
            rank = 1 + int((sims[i, mask] >= best).sum())
            rr.append(1.0 / rank)
        return float(np.mean(rr))


@dataclass
class LabelSet:
    name: str
    texts: list[str]
    labels: list[str]
    description: str = ""
    metric: str = "knn_accuracy"
    k: int = 5

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))

    def split(self, test_fraction: float = 0.5, seed: int = 0) -> tuple["LabelSet", "LabelSet"]:
        """Stratified (train, test) split, deterministic in ``seed``."""
        by = defaultdict(list)
        for i, lab in enumerate(self.labels):
            by[lab].append(i)
        rng = random.Random(seed)
        train, test = [], []
        for lab in sorted(by):
            idx = by[lab][:]
            rng.shuffle(idx)
            n_test = max(1, int(round(len(idx) * test_fraction)))
            test += idx[:n_test]
            train += idx[n_test:]
        pick = lambda ids: LabelSet(self.name, [self.texts[i] for i in ids], [self.labels[i] for i in ids], self.description)
        return pick(sorted(train)), pick(sorted(test))

    def score(self, encode: EncodeFn) -> float:
        """Leave-one-out k-nearest-neighbour accuracy (cosine, majority vote, ties to the
        nearest neighbour's label)."""
        emb = _encode(encode, self.texts)
        sims = emb @ emb.T
        np.fill_diagonal(sims, -np.inf)
        labels = np.asarray(self.labels)
        correct = 0
        for i in range(len(self.texts)):
            nn = np.argsort(-sims[i], kind="stable")[: self.k]
            votes = defaultdict(int)
            for j in nn:
                votes[labels[j]] += 1
            top = max(votes.values())
            pred = next(labels[j] for j in nn if votes[labels[j]] == top)
            correct += pred == labels[i]
        return correct / len(self.texts)


def _subsample(items: list, max_items: int | None, seed: int) -> list:
    if max_items is None or len(items) <= max_items:
        return items
    idx = sorted(random.Random(seed).sample(range(len(items)), max_items))
    return [items[i] for i in idx]


# --------------------------------------------------------------------------- STS


def lee50_pairs() -> PairSet:
    """All 1225 document pairs of the Lee-50 corpus with the mean human similarity (0-1)."""
    docs, sims = corpora.lee50()
    t1, t2, s = [], [], []
    for i in range(len(docs)):
        for j in range(i + 1, len(docs)):
            t1.append(docs[i])
            t2.append(docs[j])
            s.append(sims[i][j])
    return PairSet("Lee50DocSim", t1, t2, s, 0.0, 1.0, "Lee (2005) news documents rated for similarity by humans (gensim test data).")


def word_pairs(which: str, max_items: int | None = None, seed: int = 0) -> PairSet:
    """SimLex-999 (similarity) or WordSim-353 (relatedness) word pairs, scores 0-10."""
    if which == "simlex999":
        rows, name, desc = corpora.simlex999(), "SimLex999", "SimLex-999 word pairs rated for similarity (gensim test data)."
    elif which == "wordsim353":
        rows, name, desc = corpora.wordsim353(), "WordSim353", "WordSim-353 word pairs rated for relatedness (gensim test data)."
    else:
        raise ValueError(f"unknown word-pair set {which!r}; choose simlex999 or wordsim353")
    rows = _subsample(rows, max_items, seed)
    return PairSet(name, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], 0.0, 10.0, desc)


# --------------------------------------------------------------------------- retrieval


def wordnet_definition_to_example(max_items: int | None = 500, seed: int = 0) -> RetrievalSet:
    """Query: a WordNet definition; relevant: the example sentences of the same synset.

    Only held-out synsets (see corpora.is_heldout) that have example sentences; an example
    shared by several synsets is relevant to all of them.
    """
    synsets = [s for s in corpora.wordnet_synsets() if s.heldout and s.examples]
    synsets = _subsample(synsets, max_items, seed)
    doc_index: dict[str, int] = {}
    queries, relevant = [], []
    for s in synsets:
        rel = set()
        for ex in s.examples:
            rel.add(doc_index.setdefault(ex, len(doc_index)))
        queries.append(s.definition)
        relevant.append(rel)
    docs = sorted(doc_index, key=doc_index.get)
    return RetrievalSet("WordNetDefToExample", queries, docs, relevant, "WordNet 3.0 definition -> example sentences of the same sense.")


def python_faq_retrieval(max_items: int | None = None, seed: int = 0) -> RetrievalSet:
    """Query: a Python FAQ question; relevant: its answer (all answers form the corpus)."""
    pairs = _subsample(corpora.python_faq(), max_items, seed)
    return RetrievalSet(
        "PythonFAQ",
        [q for q, _ in pairs],
        [a for _, a in pairs],
        [{i} for i in range(len(pairs))],
        "Python 3.11 FAQ question -> its answer.",
    )


def gnu_info_retrieval(max_items: int | None = 500, seed: int = 0) -> RetrievalSet:
    """Query: the heading of a GNU info manual section; relevant: that section's prose (all
    sampled sections form the corpus). The held-out check: no training recipe reads these
    manuals (tests/eval/test_training_text.py checks the texts against every training corpus)."""
    sections = _subsample(corpora.gnu_info_sections(), max_items, seed)
    return RetrievalSet(
        "GNUInfoSections",
        [s.heading for s in sections],
        [s.text for s in sections],
        [{i} for i in range(len(sections))],
        "GNU info manuals (coreutils, diffutils, findutils, grep, sed, gettext, ...): section heading -> its text.",
    )


# --------------------------------------------------------------------------- labels

# Topical fortune files (the generic ones, 'fortunes', 'cookie', 'miscellaneous', and tiny
# files are left out: their category says nothing about the text).
FORTUNE_CATEGORIES = (
    "computers", "drugs", "education", "food", "law", "love",
    "medicine", "politics", "science", "sports", "startrek", "work",
)  # fmt: skip

# Lexicographer classes with a topical meaning (adjective/adverb files and noun.Tops are
# grouped by part of speech, not topic).
LEXNAME_CLASSES = (
    "noun.animal", "noun.artifact", "noun.body", "noun.food", "noun.location", "noun.person",
    "noun.plant", "noun.substance", "noun.time", "verb.communication", "verb.contact", "verb.motion",
)  # fmt: skip


def fortune_labels(per_class: int = 60, seed: int = 0, *, max_chars: int = 400) -> LabelSet:
    """Fortunes labelled by their file (category): ``per_class`` from each topical category,
    texts cut at ``max_chars`` on a word boundary."""
    cats = corpora.fortunes()
    missing = [c for c in FORTUNE_CATEGORIES if c not in cats]
    if missing:
        raise corpora.CorpusMissing(f"fortune categories {missing} not found: reinstall the Debian package 'fortunes'")
    texts, labels = [], []
    for c in FORTUNE_CATEGORIES:
        for t in _subsample(cats[c], per_class, seed):
            texts.append(t if len(t) <= max_chars else t[:max_chars].rsplit(" ", 1)[0])
            labels.append(c)
    return LabelSet("FortunesCategory", texts, labels, "Fortune cookies labelled by category file.")


def wordnet_lexname_labels(per_class: int = 60, seed: int = 0) -> LabelSet:
    """Held-out WordNet definitions labelled by lexicographer class (noun.animal, ...)."""
    by = defaultdict(list)
    for s in corpora.wordnet_synsets():
        if s.heldout and s.lexname in LEXNAME_CLASSES:
            by[s.lexname].append(s.definition)
    texts, labels = [], []
    for c in LEXNAME_CLASSES:
        for t in _subsample(sorted(set(by[c])), per_class, seed):
            texts.append(t)
            labels.append(c)
    return LabelSet("WordNetLexname", texts, labels, "WordNet 3.0 definitions labelled by lexicographer class.")


# --------------------------------------------------------------------------- multiple choice


@dataclass
class MCItem:
    question: str
    choices: list[str]
    answer: int


def trivia_mc(max_items: int | None = 500, seed: int = 0, n_choices: int = 4) -> list[MCItem]:
    """red-trivia questions, 4-way: the canonical answer and 3 distractors drawn from the
    canonical answers of other questions of the same category (case-insensitively
    different from every accepted answer). Questions whose category lacks enough distinct
    answers are skipped. Deterministic in ``seed``."""
    items = corpora.red_trivia()
    by_cat = defaultdict(list)
    for it in items:
        by_cat[it.category].append(it.answers[0])
    rng = random.Random(seed)
    out = []
    for it in _subsample(items, None, seed):
        accepted = {a.lower() for a in it.answers}
        pool = sorted({a for a in by_cat[it.category] if a.lower() not in accepted})
        if len(pool) < n_choices - 1:
            continue
        choices = rng.sample(pool, n_choices - 1) + [it.answers[0]]
        rng.shuffle(choices)
        out.append(MCItem(it.question, choices, choices.index(it.answers[0])))
    return _subsample(out, max_items, seed)


def wordnet_definition_mc(max_items: int | None = 500, seed: int = 0, n_choices: int = 4) -> list[MCItem]:
    """'Which is the definition of WORD?': the held-out synset's definition and 3 definitions
    of other held-out synsets with the same part of speech. Only single-sense words (so the
    answer is unambiguous)."""
    from collections import Counter

    synsets = corpora.wordnet_synsets()
    senses = Counter(w.lower() for s in synsets for w in s.words)
    held = [s for s in synsets if s.heldout]
    by_pos = defaultdict(list)
    for s in held:
        by_pos[s.pos].append(s.definition)
    rng = random.Random(seed)
    cands = [s for s in held if senses[s.words[0].lower()] == 1 and " " not in s.words[0]]
    out = []
    for s in _subsample(cands, max_items, seed):
        pool = by_pos[s.pos]
        wrong = set()
        while len(wrong) < n_choices - 1:
            d = pool[rng.randrange(len(pool))]
            if d != s.definition:
                wrong.add(d)
        choices = sorted(wrong) + [s.definition]
        rng.shuffle(choices)
        out.append(MCItem(f'What does the word "{s.words[0]}" mean?', choices, choices.index(s.definition)))
    return out
