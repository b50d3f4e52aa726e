"""A natural-sentence training text, disjoint from every evaluation text.

The paper post-trains on natural text; the recipes of tools/reproduce.py had only WordNet
definitions (short glosses, not sentences). :func:`natural_sentences` builds a text of whole
sentences from the installed corpora instead:

  wordnet-examples   example sentences of the *training* WordNet synsets ("he ran down the hill")
  fortunes           quotations and jokes from the fortune files the evaluation does not use
                     (every file of builders.FORTUNE_CATEGORIES is left out whole)

GCIDE (the dictionary's quotations) is not read: no Debian package of it is installed here.

Every candidate is checked against :func:`evaluation_texts` (all texts of every offline task,
the demo's quick tasks, the multiple-choice tasks, the held-out perplexity paragraphs and the
GNU info held-out task, taken from the full pools the builders sample from, so any ``scale`` or
``max_items`` is covered): it is dropped when its normalised text equals an evaluation text, or
when one of its sentences of >= ``SENTENCE_WORDS`` words equals a sentence of an evaluation
text. Nothing is dropped silently: :class:`TrainingText` counts per source what was read, kept
and dropped, and why.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

from . import builders, corpora

SENTENCE_WORDS = 6  # shorter sentences ("I agree.") recur in any large text: not an overlap
MIN_WORDS, MAX_WORDS = 5, 120
MIN_LETTER_FRACTION = 0.7  # of the non-space characters: drops ASCII art and tables

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def normalise(text: str) -> str:
    """Lower-case words and digits joined by single spaces: punctuation, quotes and layout
    differences do not hide an overlap."""
    return " ".join(_WORD.findall(text.lower()))


def sentences(text: str, min_words: int = SENTENCE_WORDS) -> list[str]:
    """The normalised sentences of ``text`` with at least ``min_words`` words."""
    out = [normalise(s) for s in _SENTENCE_END.split(text)]
    return [s for s in out if len(s.split()) >= min_words]


def evaluation_texts() -> dict[str, list[str]]:
    """{source: raw texts} of everything any evaluation here reads (the full pools, before
    subsampling). Sources: lee50, simlex999, wordsim353, wordnet-heldout (definitions and
    examples of the held-out synsets: WordNetDefToExample, WordNetLexname(Clustering),
    gem_wordnet_def_mc), python-faq, fortunes-eval (the evaluation's categories, whole and cut as
    the builders cut them), trivia (gem_trivia_mc questions and answers), python-tutorial (the
    perplexity paragraphs), gnu-info (the held-out GNUInfoSections task)."""
    docs, _ = corpora.lee50()
    words = lambda rows: sorted({w for a, b, _ in rows for w in (a, b)})
    held = [s for s in corpora.wordnet_synsets() if s.heldout]
    fort = corpora.fortunes()
    fort_eval = [t for c in builders.FORTUNE_CATEGORIES for t in fort.get(c, [])]
    fort_cut = [t[:400].rsplit(" ", 1)[0] for t in fort_eval if len(t) > 400]
    trivia = corpora.red_trivia()
    info = corpora.gnu_info_sections()
    return {
        "lee50": docs,
        "simlex999": words(corpora.simlex999()),
        "wordsim353": words(corpora.wordsim353()),
        "wordnet-heldout": [t for s in held for t in (s.definition, *s.examples)],
        "python-faq": [t for qa in corpora.python_faq() for t in qa],
        "fortunes-eval": fort_eval + fort_cut,
        "trivia": [t for it in trivia for t in (it.question, *it.answers)],
        "python-tutorial": corpora.python_doc_paragraphs(),
        "gnu-info": [t for s in info for t in (s.heading, s.text)],
    }


@dataclass
class TrainingText:
    texts: list[str]
    # {source: {"read": n, "kept": n, "dropped: <why>": n, ...}}
    counts: dict[str, Counter] = field(default_factory=dict)

    def summary(self) -> str:
        lines = []
        for source, c in self.counts.items():
            dropped = ", ".join(f"{k[len('dropped: ') :]}: {v}" for k, v in sorted(c.items()) if k.startswith("dropped: ")) or "none"
            lines.append(
                f"[natural text] {source}: read {c['read']}, kept {c['kept']}, dropped {sum(v for k, v in c.items() if k.startswith('dropped: '))} ({dropped})"
            )
        lines.append(f"[natural text] total: {len(self.texts)} texts")
        return "\n".join(lines)


def _candidates() -> dict[str, list[str]]:
    train_examples = [e for s in corpora.wordnet_synsets() if not s.heldout for e in s.examples]
    fort = corpora.fortunes()
    other = [t for c in sorted(fort) if c not in builders.FORTUNE_CATEGORIES for t in fort[c]]
    return {"wordnet-examples": train_examples, "fortunes": other}


def _letter_fraction(text: str) -> float:
    chars = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in chars) / max(1, len(chars))


def natural_sentences(limit: int | None = None, *, seed: int = 0) -> TrainingText:
    """The natural-sentence training text (see the module docstring), in a fixed shuffle
    (``seed``) so that ``limit`` takes a mix of the sources. Counts cover the whole pool."""
    evals = evaluation_texts()
    eval_full = {normalise(t) for texts in evals.values() for t in texts}
    eval_sentences = {s for texts in evals.values() for t in texts for s in sentences(t)}
    seen: set[str] = set()
    kept, counts = [], {}
    for source, texts in _candidates().items():
        c = counts.setdefault(source, Counter())
        for text in texts:
            c["read"] += 1
            norm = normalise(text)
            n_words = len(norm.split())
            if _letter_fraction(text) < MIN_LETTER_FRACTION:
                why = "not prose (letters < 70% of characters)"
            elif n_words < MIN_WORDS:
                why = f"shorter than {MIN_WORDS} words"
            elif n_words > MAX_WORDS:
                why = f"longer than {MAX_WORDS} words"
            elif norm in eval_full:
                why = "equals an evaluation text"
            elif any(s in eval_sentences for s in sentences(text)):
                why = "shares a sentence with an evaluation text"
            elif norm in seen:
                why = "duplicate"
            else:
                why = None
            if why:
                c["dropped: " + why] += 1
                continue
            seen.add(norm)
            kept.append(text)
            c["kept"] += 1
    random.Random(seed).shuffle(kept)
    return TrainingText(kept if limit is None else kept[:limit], counts)
