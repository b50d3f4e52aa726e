"""Training text from the installed corpora, disjoint from every evaluation text.

The paper post-trains on natural text; the recipes of tools/reproduce.py had only WordNet
definitions (short glosses, not sentences). :func:`natural_sentences` builds a text of whole
sentences from the installed corpora instead:

  wordnet-examples   example sentences of the *training* WordNet synsets ("he ran down the hill")
  fortunes           quotations and jokes from the fortune files the evaluation does not use
                     (every file of builders.FORTUNE_CATEGORIES is left out whole)

:func:`distillation_texts` (unlabelled text for teacher distillation, issue #28) adds every
other installed source no evaluation is built from: the training synsets' WordNet glosses,
GCIDE's Webster definitions and quotations, Debian package descriptions and man-page NAME lines
(readers in :mod:`.training_sources`), leaving out the packages an evaluation reads.

Every candidate is checked against :func:`evaluation_texts` (all texts of every offline task,
the demo's quick tasks, the multiple-choice tasks, the held-out perplexity paragraphs and the
GNU info held-out task, taken from the full pools the builders sample from, so any ``scale`` or
``max_items`` is covered): it is dropped when its normalised text equals an evaluation text, or
when one of its sentences of >= ``SENTENCE_WORDS`` words equals a sentence of an evaluation
text. Nothing is dropped silently: :class:`TrainingText` counts per source what was read, kept
and dropped, and why.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from ..common.files import write_json_atomic, write_text_atomic
from . import builders, corpora, training_sources

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
    sources: list[str] = field(default_factory=list)  # the source of each text
    label: str = "natural text"  # the name report() prints

    def report(self) -> str:
        lines = []
        for source, c in self.counts.items():
            dropped = ", ".join(f"{k[len('dropped: ') :]}: {v}" for k, v in sorted(c.items()) if k.startswith("dropped: ")) or "none"
            lines.append(
                f"[{self.label}] {source}: read {c['read']}, kept {c['kept']}, dropped {sum(v for k, v in c.items() if k.startswith('dropped: '))} ({dropped})"
            )
        lines.append(f"[{self.label}] total: {len(self.texts)} texts")
        return "\n".join(lines)


def _candidates() -> dict[str, list[str]]:
    train_examples = [e for s in corpora.wordnet_synsets() if not s.heldout for e in s.examples]
    fort = corpora.fortunes()
    other = [t for c in sorted(fort) if c not in builders.FORTUNE_CATEGORIES for t in fort[c]]
    return {"wordnet-examples": train_examples, "fortunes": other}


def _letter_fraction(text: str) -> float:
    chars = [ch for ch in text if not ch.isspace()]
    return sum(ch.isalpha() for ch in chars) / max(1, len(chars))


def _select(candidates: dict[str, list], *, seed: int, max_per_source: int | None = None, label: str = "natural text") -> TrainingText:
    """Keep the candidates that pass every rule of the module docstring, first source first on
    duplicates. A candidate is a text, or ``(text, why)`` when its reader already refused it
    (``why`` is counted as the reason). With ``max_per_source`` each source keeps a seeded
    sample of that many of its texts (the rest counted as dropped); the result is shuffled
    (``seed``)."""
    evals = evaluation_texts()
    eval_full = {normalise(t) for texts in evals.values() for t in texts}
    eval_sentences = {s for texts in evals.values() for t in texts for s in sentences(t)}
    seen: set[str] = set()
    kept, kept_sources, counts = [], [], {}
    for source, texts in candidates.items():
        c = counts.setdefault(source, Counter())
        mine, mine_seen = [], set()
        for text in texts:
            c["read"] += 1
            why = None
            if isinstance(text, tuple):
                text, why = text
            norm = normalise(text)
            n_words = len(norm.split())
            if why:
                pass
            elif _letter_fraction(text) < MIN_LETTER_FRACTION:
                why = "not prose (letters < 70% of characters)"
            elif n_words < MIN_WORDS:
                why = f"shorter than {MIN_WORDS} words"
            elif n_words > MAX_WORDS:
                why = f"longer than {MAX_WORDS} words"
            elif norm in eval_full:
                why = "equals an evaluation text"
            elif any(s in eval_sentences for s in sentences(text)):
                why = "shares a sentence with an evaluation text"
            elif norm in seen or norm in mine_seen:
                why = "duplicate"
            if why:
                c["dropped: " + why] += 1
                continue
            mine_seen.add(norm)
            mine.append((text, norm))
        if max_per_source is not None and len(mine) > max_per_source:
            random.Random(f"{seed}:{source}").shuffle(mine)
            c[f"dropped: beyond max_per_source={max_per_source}"] += len(mine) - max_per_source
            mine = mine[:max_per_source]
        seen.update(norm for _, norm in mine)
        kept += [text for text, _ in mine]
        kept_sources += [source] * len(mine)
        c["kept"] += len(mine)
    order = list(range(len(kept)))
    random.Random(seed).shuffle(order)
    return TrainingText([kept[i] for i in order], counts, [kept_sources[i] for i in order], label)


def natural_sentences(limit: int | None = None, *, seed: int = 0) -> TrainingText:
    """The natural-sentence training text (see the module docstring), in a fixed shuffle
    (``seed``) so that ``limit`` takes a mix of the sources. Counts cover the whole pool."""
    text = _select(_candidates(), seed=seed)
    if limit is not None:
        text.texts, text.sources = text.texts[:limit], text.sources[:limit]
    return text


# --------------------------------------------------------------------------- distillation text

# Every source distillation_texts() can read, in the order duplicates are resolved (first wins).
DISTILLATION_SOURCES = (
    "wordnet-examples",
    "fortunes",
    "wordnet-glosses",
    "gcide-definitions",
    "gcide-quotations",
    "debian-descriptions",
    "man-pages",
)
# google-cloud-cli alone ships ~16600 man pages ("gcloud alpha ... - ..."); a cap per package
# keeps the man-page text varied.
MAN_PAGES_PER_PACKAGE = 200


def evaluated_packages() -> set[str]:
    """The Debian source packages any evaluation reads a file of (WordNet, fortunes, the Python
    documentation, every GNU info manual): none of their packages' descriptions or man pages is
    training text (``cat - concatenate files ...`` would preview the held-out coreutils manual)."""
    owners = set()
    for folder in (corpora.WORDNET_DIR, corpora.FORTUNES_DIR, corpora.PYTHON_DOC_DIR, corpora.INFO_DIR):
        owners |= training_sources.packages_under(folder)
    source = training_sources.source_packages()
    return {source.get(p, p) for p in owners} | owners


def _distillation_candidates(sources, *, seed: int, debian_files, man_per_package: int) -> dict[str, list]:
    unknown = [s for s in sources if s not in DISTILLATION_SOURCES]
    if unknown:
        raise ValueError(f"unknown training text source(s) {unknown}; known: {', '.join(DISTILLATION_SOURCES)}")
    out: dict[str, list] = {}
    natural = _candidates() if {"wordnet-examples", "fortunes"} & set(sources) else {}
    evaluated = evaluated_packages() if {"debian-descriptions", "man-pages"} & set(sources) else set()
    refused = "a package an evaluation reads"
    for name in sources:
        if name in natural:
            out[name] = natural[name]
        elif name == "wordnet-glosses":
            out[name] = [s.definition for s in corpora.wordnet_synsets() if not s.heldout]
        elif name.startswith("gcide-"):
            entries = training_sources.gcide_entries()
            out[name] = [t for e in entries for t in (e.definitions if name == "gcide-definitions" else e.quotations)]
        elif name == "debian-descriptions":
            out[name] = [
                (t, refused) if p.name in evaluated or p.source in evaluated else t
                for p in training_sources.debian_packages(debian_files)
                for t in (p.synopsis, *p.paragraphs)
            ]
        elif name == "man-pages":
            source = training_sources.source_packages()
            by_package: dict[str, list] = {}
            for page in training_sources.man_page_names():
                by_package.setdefault(page.package, []).append(page)
            texts = []
            for package in sorted(by_package):
                pages = by_package[package]
                if package in evaluated or source.get(package, package) in evaluated:
                    texts += [(p.text, refused) for p in pages]
                    continue
                random.Random(f"{seed}:{package}").shuffle(pages)
                texts += [p.text for p in pages[:man_per_package]]
                texts += [(p.text, f"beyond {man_per_package} pages of one package") for p in pages[man_per_package:]]
            out[name] = texts
    return out


def distillation_texts(
    max_per_source: int | None = None,
    *,
    seed: int = 0,
    sources=DISTILLATION_SOURCES,
    debian_files=None,
    man_per_package: int = MAN_PAGES_PER_PACKAGE,
) -> TrainingText:
    """Unlabelled training text for teacher distillation from every installed source that no
    evaluation is built from (``DISTILLATION_SOURCES``), under the rules of the module docstring
    (disjoint from every evaluation text, deduplicated, prose of 5-120 words):

      wordnet-examples, fortunes   the natural-sentence text (:func:`natural_sentences`)
      wordnet-glosses              definitions of the training WordNet synsets only
      gcide-definitions/-quotations  GCIDE's Webster entries (its WordNet entries left out)
      debian-descriptions          package synopses and description paragraphs (``debian_files``:
                                   control-format files, default the dpkg status file; an
                                   ``apt-cache dumpavail`` dump adds every package apt knows)
      man-pages                    man-page NAME lines, at most ``man_per_package`` per package

    Packages an evaluation reads (:func:`evaluated_packages`) give neither descriptions nor man
    pages. ``max_per_source`` keeps a seeded sample of that many texts per source. The texts are
    shuffled (``seed``); ``counts`` says per source what was read, kept and dropped and why, and
    ``sources`` the source of each text. A missing source raises ``CorpusMissing`` naming its
    package (pass ``sources`` to leave it out)."""
    candidates = _distillation_candidates(list(sources), seed=seed, debian_files=debian_files, man_per_package=man_per_package)
    return _select(candidates, seed=seed, max_per_source=max_per_source, label="distillation text")


def write_jsonl(path: str, text: TrainingText) -> str:
    """``{"text", "source"}`` records, one a line (the ``--data`` format with ``--text-field
    text``), written atomically; the counts go to ``<path without .jsonl>.counts.json``."""
    write_text_atomic(path, "".join(json.dumps({"text": t, "source": s}) + "\n" for t, s in zip(text.texts, text.sources, strict=True)))
    counts = {k: dict(v) for k, v in text.counts.items()} | {"written": len(text.texts)}
    write_json_atomic(counts_path(path), counts)
    return path


def counts_path(path: str) -> str:
    """Where ``write_jsonl`` puts the counts of the jsonl file ``path``."""
    return (path[: -len(".jsonl")] if path.endswith(".jsonl") else path) + ".counts.json"
