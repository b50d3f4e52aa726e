"""Readers of the text and gold labels that installed packages carry (no hub, no downloads).

Every source is found on disk by package name; a missing one raises :class:`CorpusMissing`
naming the package and the command that installs it. Nothing here writes a derived copy
into the repository (licences differ: GCIDE and red-trivia are GPL); callers cache under
``~/.cache/megatron_gem`` at most.

Sources (Debian and PyPI packages that ship real text; tools/install_corpora.sh, requirements-data.txt):
  WordNet 3.0        Debian ``wordnet-base``   definitions, examples, lexicographer classes
  fortunes           Debian ``fortunes``       fortune cookies in ~40 category files
  Python FAQ         Debian ``python3.11-doc`` question -> answer pairs (reST sources)
  Python docs        Debian ``python3.11-doc`` tutorial paragraphs (held-out text)
  gensim test data   PyPI ``gensim``           Lee-50 document similarities, SimLex-999, WordSim-353
  red-trivia         PyPI ``red-trivia``       ~10k trivia question/answers in 36 categories
  GNU info manuals   Debian ``coreutils`` etc. section heading -> section text (held-out check;
                                               no recipe trains on them)

WordNet synsets are split once, by a hash of their offset, into a training part and a
held-out part (``HELDOUT_PERCENT``): evaluation tasks built from WordNet use held-out synsets
only and :func:`wordnet_glosses` (the demo's training text) excludes them by default.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import random
import re
from dataclasses import dataclass
from functools import lru_cache

WORDNET_DIR = "/usr/share/wordnet"
FORTUNES_DIR = "/usr/share/games/fortunes"
PYTHON_DOC_DIR = "/usr/share/doc/python3.11/html/_sources"
INFO_DIR = "/usr/share/info"

HELDOUT_PERCENT = 10

# WordNet's lexicographer files, by number (lexnames(5WN)); the 2-digit field after a
# synset's offset in data.* indexes this list.
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


class CorpusMissing(FileNotFoundError):
    """An evaluation source is not installed; the message names the package to install."""


def _missing(what: str, path: str, package: str, kind: str) -> CorpusMissing:
    how = f"apt-get install -y {package}   (or: bash tools/install_corpora.sh)" if kind == "debian" else f"pip install {package}   (or: make install)"
    return CorpusMissing(f"{what} not found at {path}: install the {kind} package '{package}': {how}")


def _package_dir(module: str, package: str) -> str:
    """Folder of an installed Python package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise _missing(f"Python package {module}", "sys.path", package, "PyPI")
    return list(spec.submodule_search_locations)[0]


# --------------------------------------------------------------------------- WordNet


@dataclass(frozen=True)
class Synset:
    offset: str  # 8 digits, unique within its part of speech
    pos: str  # n v a s r
    lexname: str  # e.g. noun.animal
    words: tuple[str, ...]  # lemmas, underscores replaced by spaces
    definition: str
    examples: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.offset}-{self.pos}"

    @property
    def heldout(self) -> bool:
        return is_heldout(self.key)


def is_heldout(key: str) -> bool:
    """The fixed train/held-out split of WordNet synsets (by a hash, not by file order)."""
    h = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16)
    return h % 100 < HELDOUT_PERCENT


_QUOTED = re.compile(r'"([^"]+)"')


def _parse_gloss(gloss: str) -> tuple[str, tuple[str, ...]]:
    """'definition; "example one"; "example two"' -> (definition, examples)."""
    examples = tuple(e.strip() for e in _QUOTED.findall(gloss) if len(e.strip().split()) >= 3)
    definition = _QUOTED.sub("", gloss)
    definition = re.sub(r"(\s*;\s*)+$", "", definition.strip()).strip(" ;")
    definition = re.sub(r"\s*;\s*;\s*", "; ", definition)
    return definition, examples


def wordnet_synsets(root: str | None = None) -> list[Synset]:
    """All WordNet 3.0 synsets (nouns, verbs, adjectives, adverbs), in file order."""
    return list(_wordnet_synsets(root or WORDNET_DIR))


@lru_cache(maxsize=2)
def _wordnet_synsets(root: str) -> tuple[Synset, ...]:
    files = [os.path.join(root, f"data.{p}") for p in ("noun", "verb", "adj", "adv")]
    if not all(os.path.isfile(f) for f in files):
        raise _missing("WordNet 3.0 (data.noun, data.verb, data.adj, data.adv)", root, "wordnet-base", "debian")
    out = []
    for path in files:
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith("  ") or "|" not in line:
                    continue  # licence header
                head, gloss = line.split("|", 1)
                fields = head.split()
                offset, lexnum, pos, wcount = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
                words = tuple(fields[4 + 2 * i].replace("_", " ") for i in range(wcount))
                words = tuple(re.sub(r"\([a-z]+\)$", "", w) for w in words)  # adjective markers
                definition, examples = _parse_gloss(gloss.strip())
                if not definition:
                    continue
                out.append(Synset(offset, pos, LEXNAMES[lexnum], words, definition, examples))
    return tuple(out)


def wordnet_glosses(limit: int | None = None, *, include_heldout: bool = False, seed: int = 0, root: str | None = None) -> list[str]:
    """WordNet definitions as plain text (training text for the demo).

    Held-out synsets (used by the evaluation tasks) are excluded unless ``include_heldout``.
    The order is a fixed shuffle (``seed``) so that ``limit`` takes a mix of all parts of
    speech rather than the first nouns of the file. Duplicates are removed.
    """
    seen, texts = set(), []
    for s in wordnet_synsets(root):
        if (include_heldout or not s.heldout) and s.definition not in seen:
            seen.add(s.definition)
            texts.append(s.definition)
    random.Random(seed).shuffle(texts)
    return texts if limit is None else texts[:limit]


def wordnet_pairs(limit: int | None = None, *, seed: int = 0, root: str | None = None) -> list[dict]:
    """Supervised (query, positive) pairs from the training synsets (held-out ones excluded):
    word -> its definition, definition -> each example sentence, word -> a synonym.

    Records ``{"query", "positive", "kind"}`` in a fixed shuffle (``seed``); the format
    ``train.py --contrastive-data`` reads. In-domain for the WordNet tasks of the offline suite
    (same kind of text, disjoint synsets); SimLex/WordSim words may occur as training words.
    """
    out, seen = [], set()
    for s in wordnet_synsets(root):
        if s.heldout:
            continue
        cands = [(w, s.definition, "word_definition") for w in s.words[:3]]
        cands += [(s.definition, e, "definition_example") for e in s.examples]
        cands += [(a, b, "synonym") for a, b in zip(s.words, s.words[1:3]) if a.lower() != b.lower()]
        for q, p, kind in cands:
            if (q, p) not in seen:
                seen.add((q, p))
                out.append({"query": q, "positive": p, "kind": kind})
    random.Random(seed).shuffle(out)
    return out if limit is None else out[:limit]


# --------------------------------------------------------------------------- fortunes


def fortunes(root: str | None = None) -> dict[str, list[str]]:
    """{category: [fortune text, ...]} from the fortune files (``%``-separated records).

    Only the files of Debian's ``fortunes`` package (not the offensive ones). Whitespace is
    normalised inside each record; records shorter than 20 characters are dropped.
    """
    root = root or FORTUNES_DIR
    names = sorted(os.path.basename(p)[:-4] for p in glob.glob(os.path.join(root, "*.dat")))
    if not names:
        raise _missing("fortune files (*.dat)", root, "fortunes", "debian")
    out = {}
    for name in names:
        path = os.path.join(root, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            records = f.read().split("\n%\n")
        texts = [" ".join(r.replace("%", " ").split()) for r in records]
        texts = [t for t in texts if len(t) >= 20]
        if texts:
            out[name] = texts
    return out


# --------------------------------------------------------------------------- Python docs

_ROLE = re.compile(r":[a-z]+(?::[a-z]+)?:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]*?)\s*<[^>]*>`_+")
_HEADING_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+])\1{3,}\s*$")


def _rst_to_text(lines: list[str]) -> str:
    """Plain text from a reST fragment: directives and code blocks dropped, roles unwrapped."""
    out, skip_indent = [], None
    for line in lines:
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if stripped and indent <= skip_indent:
                skip_indent = None
            else:
                continue
        if stripped.startswith(".. ") or stripped.endswith("::") and stripped == "::":
            skip_indent = indent
            continue
        if stripped.startswith(">>>") or stripped.startswith("..."):
            continue
        if stripped.endswith("::"):
            line = line.rstrip()[:-1]
            skip_indent = indent
        out.append(line)
    text = " ".join(" ".join(out).split())
    text = _ROLE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = text.replace("``", "").replace("**", "").replace("`", "")
    return text.strip()


def _rst_sections(path: str) -> list[tuple[str, list[str]]]:
    """(heading, body lines) for every underlined heading of a reST file."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    heads = [
        i
        for i in range(len(lines) - 1)
        if lines[i].strip() and _HEADING_UNDERLINE.match(lines[i + 1]) and len(lines[i + 1].strip()) >= len(lines[i].strip()) - 2
    ]
    out = []
    for n, i in enumerate(heads):
        end = heads[n + 1] if n + 1 < len(heads) else len(lines)
        out.append((lines[i].strip(), lines[i + 2 : end]))
    return out


def python_faq(root: str | None = None, *, max_answer_chars: int = 1200) -> list[tuple[str, str]]:
    """(question, answer) pairs from the Python FAQ: every heading ending in '?' with its text.

    Answers are plain text (code examples dropped), cut at ``max_answer_chars`` on a word
    boundary; pairs whose answer has fewer than 5 words are dropped.
    """
    root = root or PYTHON_DOC_DIR
    files = sorted(glob.glob(os.path.join(root, "faq", "*.rst.txt")))
    if not files:
        raise _missing("the Python FAQ (faq/*.rst.txt)", os.path.join(root, "faq"), "python3.11-doc", "debian")
    pairs = []
    for path in files:
        for heading, body in _rst_sections(path):
            if not heading.endswith("?"):
                continue
            answer = _rst_to_text(body)
            if len(answer.split()) < 5:
                continue
            if len(answer) > max_answer_chars:
                answer = answer[:max_answer_chars].rsplit(" ", 1)[0]
            pairs.append((_rst_to_text([heading]), answer))
    return pairs


def python_doc_paragraphs(root: str | None = None, *, part: str = "tutorial", min_words: int = 20) -> list[str]:
    """Prose paragraphs of one part of the Python documentation (default: the tutorial).

    Used as held-out text for perplexity: no training recipe here reads it.
    """
    root = root or PYTHON_DOC_DIR
    files = sorted(glob.glob(os.path.join(root, part, "*.rst.txt")))
    if not files:
        raise _missing(f"the Python documentation ({part}/*.rst.txt)", os.path.join(root, part), "python3.11-doc", "debian")
    out = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            blocks = f.read().split("\n\n")
        for block in blocks:
            lines = block.splitlines()
            if not lines or lines[0].startswith((" ", "\t", "..", ">>>", "*", "-", "+", "=", "|")):
                continue  # code, directives, lists, tables, headings
            if any(_HEADING_UNDERLINE.match(l) for l in lines):
                continue
            text = _rst_to_text(lines)
            if len(text.split()) >= min_words:
                out.append(text)
    return out


# --------------------------------------------------------------------------- GNU info manuals

_INFO_UNDERLINE = re.compile(r"^([=\-*.])\1{2,}\s*$")
_INFO_NOTE = re.compile(r"\*[Nn]ote\s+([^:]*?)::")
_INFO_NUMBER = re.compile(r"^(?:Appendix\s+)?[0-9A-Z]+(?:\.[0-9]+)*\s+")
# The Python manual is the perplexity text's source (python3.11-doc); it is not a held-out check.
_INFO_EXCLUDED = ("python",)


@dataclass(frozen=True)
class InfoSection:
    manual: str  # e.g. coreutils
    heading: str  # section number and quotes removed: "cat: Concatenate and write files"
    text: str  # the section's prose (examples, option tables and menus dropped)


def _info_prose(lines: list[str]) -> str:
    """Prose of an info node body: paragraph lines (indent <= 3) only; menus, cross-reference
    lists, examples and option tables (indented 5+) are dropped."""
    keep = []
    for line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith(("* ", "\u2018-", "-")) or len(line) - len(line.lstrip()) > 3:
            continue  # blank, menu entry, option name, example or option description
        keep.append(stripped)
    text = " ".join(" ".join(keep).split())
    text = _INFO_NOTE.sub(r"\1", text)
    return text.replace("\u2018", "").replace("\u2019", "")


def gnu_info_sections(root: str | None = None, *, min_words: int = 20, max_chars: int = 1200) -> list[InfoSection]:
    """Sections of the installed GNU info manuals (coreutils, diffutils, findutils, grep, sed,
    gzip, wget, ...; the Python manual excluded), one per info node with an underlined heading.

    Sections whose prose has fewer than ``min_words`` words or whose heading has fewer than three words
    ("Environment", "Web site": bare terms, which a word list such as WordNet may hold) are dropped, and so are headings
    that occur more than once across the manuals ("Introduction", licences, indices): a query
    must name one section. Texts are cut at ``max_chars`` on a word boundary. Fixed order
    (file name, then node order).
    """
    import gzip

    root = root or INFO_DIR
    files = sorted(p for p in glob.glob(os.path.join(root, "*.info*.gz")) if not os.path.basename(p).startswith(_INFO_EXCLUDED))
    if not files:
        raise _missing("GNU info manuals (*.info.gz)", root, "coreutils", "debian")
    found = []
    for path in files:
        manual = os.path.basename(path).split(".info")[0]
        with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
            nodes = f.read().split("\x1f")
        for node in nodes[1:]:
            lines = node.strip("\n").split("\n")
            if len(lines) < 4 or not lines[0].startswith("File:") or not _INFO_UNDERLINE.match(lines[3]):
                continue
            heading = _INFO_NUMBER.sub("", lines[2].strip()).replace("\u2018", "").replace("\u2019", "")
            text = _info_prose(lines[4:])
            if len(text.split()) < min_words or len(heading.split()) < 3:
                continue
            if len(text) > max_chars:
                text = text[:max_chars].rsplit(" ", 1)[0]
            found.append(InfoSection(manual, heading, text))
    counts: dict[str, int] = {}
    for s in found:
        counts[s.heading.lower()] = counts.get(s.heading.lower(), 0) + 1
    return [s for s in found if counts[s.heading.lower()] == 1]


# --------------------------------------------------------------------------- gensim test data


def held_out_pieces(n: int, chars: int = 320) -> list[str]:
    """The first ``n`` pieces of about ``chars`` characters (whole words, a piece ends before the
    word that would pass ``chars``; pieces under 90 % of it dropped) of text no recipe trains on
    (eval/training_text.py keeps it apart): the Python tutorial's paragraphs, then the GNU info
    manuals' sections. The serving benchmarks' texts (tools/bench_serve.py,
    tools/bench_vllm_plugin.py): every engine they time embeds these."""
    kept = []
    for paragraph in python_doc_paragraphs() + [s.text for s in gnu_info_sections()]:
        pieces, piece = [], ""
        for word in paragraph.split():
            if piece and len(piece) + 1 + len(word) > chars:
                pieces.append(piece)
                piece = ""
            piece = f"{piece} {word}" if piece else word
        pieces.append(piece)
        kept += [t for t in pieces if len(t) >= 0.9 * chars]
        if len(kept) >= n:
            return kept[:n]
    raise ValueError(f"only {len(kept)} pieces of ~{chars} characters in the Python tutorial and the GNU info manuals ({n} asked for)")


def gensim_test_data_dir() -> str:
    d = os.path.join(_package_dir("gensim", "gensim"), "test", "test_data")
    if not os.path.isdir(d):
        raise _missing("gensim's test data", d, "gensim", "PyPI")
    return d


def _word_pairs(filename: str) -> list[tuple[str, str, float]]:
    path = os.path.join(gensim_test_data_dir(), filename)
    if not os.path.isfile(path):
        raise _missing(f"gensim test file {filename}", path, "gensim", "PyPI")
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            a, b, score = line.rstrip("\n").split("\t")[:3]
            out.append((a.strip(), b.strip(), float(score)))
    return out


def simlex999() -> list[tuple[str, str, float]]:
    """SimLex-999 word pairs with human similarity (0-10)."""
    return _word_pairs("simlex999.txt")


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim-353 word pairs with human relatedness (0-10)."""
    return _word_pairs("wordsim353.tsv")


def lee50() -> tuple[list[str], list[list[float]]]:
    """The Lee (2005) 50 news documents and their human similarity matrix (upper triangle
    filled, values 0-1; mean of the raters' judgements as shipped with gensim)."""
    d = gensim_test_data_dir()
    docs_path, sim_path = os.path.join(d, "lee.cor"), os.path.join(d, "similarities0-1.txt")
    for p in (docs_path, sim_path):
        if not os.path.isfile(p):
            raise _missing("the Lee-50 corpus", p, "gensim", "PyPI")
    with open(docs_path, encoding="latin-1") as f:
        docs = [l.strip() for l in f if l.strip()]
    with open(sim_path) as f:
        sims = [[float(x) for x in l.split()] for l in f if l.strip()]
    if len(docs) != len(sims) or any(len(r) != len(docs) for r in sims):
        raise ValueError(f"{d}: Lee-50 has {len(docs)} documents but a {len(sims)}-row similarity matrix")
    return docs, sims


# --------------------------------------------------------------------------- red-trivia


@dataclass(frozen=True)
class TriviaItem:
    category: str
    question: str
    answers: tuple[str, ...]  # the first is the canonical one


def red_trivia() -> list[TriviaItem]:
    """Trivia questions of the red-trivia package (YAML lists, one file per category)."""
    return list(_red_trivia())


@lru_cache(maxsize=1)
def _red_trivia() -> tuple[TriviaItem, ...]:
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    base = os.path.join(_package_dir("redbot", "red-trivia"), "ext", "trivia", "lists")
    files = sorted(glob.glob(os.path.join(base, "*.yaml")))
    if not files:
        raise _missing("red-trivia lists (redbot/ext/trivia/lists/*.yaml)", base, "red-trivia", "PyPI")
    out = []
    for path in files:
        category = os.path.basename(path)[:-5]
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=loader) or {}
        for q, answers in data.items():
            if q in ("AUTHOR", "CONFIG") or not isinstance(answers, list) or not answers:
                continue
            answers = tuple(str(a).strip() for a in answers if str(a).strip())
            if answers:
                out.append(TriviaItem(category, " ".join(str(q).split()), answers))
    return tuple(out)
