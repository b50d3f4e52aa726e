"""Readers of installed text that only training reads (no evaluation task is built from them).

  GCIDE            Debian ``dict-gcide``   dictionary definitions and the quotations that illustrate
                                           them (Webster 1913 and its supplements; the entries GCIDE
                                           took from WordNet are left out: WordNet is an evaluation
                                           source, split by synset)
  package texts    the dpkg status file    synopsis and description paragraphs of every package
                   (or an ``apt-cache dumpavail`` dump: a synopsis for every package apt knows)
  man pages        ``/usr/share/man/man*`` the NAME line of each English man page ("ls - list
                                           directory contents"), with the package that owns it

Everything is read from files (no subprocess). :func:`dpkg_owners` and :func:`source_packages`
say which package holds a file and which source package built it, so that the training text can
leave out whole packages (the manuals of the held-out task, the Python documentation).
"""

from __future__ import annotations

import glob
import gzip
import os
import re
from dataclasses import dataclass
from functools import lru_cache

from .corpora import _missing

GCIDE_DIR = "/usr/share/dictd"
DPKG_STATUS = "/var/lib/dpkg/status"
DPKG_INFO = "/var/lib/dpkg/info"
MAN_DIR = "/usr/share/man"

# --------------------------------------------------------------------------- dpkg


def _read_stanzas(path: str):
    """The records of a Debian control-format file (dpkg status, Packages, dumpavail): one dict
    per blank-line separated stanza, continuation lines kept with their leading space."""
    with open(path, encoding="utf-8", errors="replace") as f:
        record: dict[str, str] = {}
        key = None
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                if record:
                    yield record
                record, key = {}, None
            elif line[0] in " \t" and key:
                record[key] += "\n" + line
            elif ":" in line:
                key, value = line.split(":", 1)
                record[key] = value.strip()
        if record:
            yield record


def _source_of(record: dict[str, str]) -> str:
    """The source package of a stanza: its Source field without a version, else its own name."""
    return record.get("Source", record["Package"]).split()[0]


@dataclass(frozen=True)
class DebianPackage:
    name: str
    source: str  # the source package that built it
    synopsis: str  # the first line of Description
    paragraphs: tuple[str, ...]  # the long description, one string per paragraph (lists joined)


def debian_packages(paths: tuple[str, ...] | list[str] | None = None) -> list[DebianPackage]:
    """The packages described in control-format files (default: the dpkg status file, i.e. the
    installed packages; an ``apt-cache dumpavail > FILE`` dump adds a synopsis for every package
    apt knows). A package named in several files is read once (the first)."""
    paths = list(paths or [DPKG_STATUS])
    seen, out = set(), []
    for path in paths:
        if not os.path.isfile(path):
            raise _missing("a Debian package list (dpkg status / apt-cache dumpavail)", path, "dpkg", "debian")
        for rec in _read_stanzas(path):
            name, desc = rec.get("Package"), rec.get("Description")
            if not name or not desc or name in seen:
                continue
            seen.add(name)
            synopsis, *body = desc.split("\n")
            paragraphs, current = [], []
            for line in body:
                line = line[1:] if line.startswith(" ") else line
                if line.strip() == ".":  # a paragraph break
                    paragraphs.append(" ".join(current))
                    current = []
                else:
                    current.append(line.strip())
            paragraphs.append(" ".join(current))
            paragraphs = [" ".join(p.split()) for p in paragraphs if p.strip()]
            out.append(DebianPackage(name, _source_of(rec), synopsis.strip(), tuple(paragraphs)))
    return out


@lru_cache(maxsize=2)
def _file_owners(info_dir: str) -> dict[str, str]:
    owners = {}
    for path in sorted(glob.glob(os.path.join(info_dir, "*.list"))):
        package = os.path.basename(path)[: -len(".list")].split(":")[0]  # libfoo:amd64 -> libfoo
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                owners[line.rstrip("\n")] = package
    return owners


def dpkg_owners(paths, info_dir: str | None = None) -> dict[str, str | None]:
    """{path: the installed package whose file list holds it (the path as given, else its real
    path: alternatives and symlinks), or None}."""
    owners = _file_owners(info_dir or DPKG_INFO)
    return {p: owners.get(p) or owners.get(os.path.realpath(p)) for p in paths}


def packages_under(prefix: str, info_dir: str | None = None) -> set[str]:
    """The installed packages that own a file under the directory ``prefix``."""
    prefix = prefix.rstrip("/") + "/"
    return {pkg for path, pkg in _file_owners(info_dir or DPKG_INFO).items() if path.startswith(prefix)}


def source_packages(status: str | None = None) -> dict[str, str]:
    """{installed binary package: its source package} from the dpkg status file."""
    status = status or DPKG_STATUS
    if not os.path.isfile(status):
        raise _missing("the dpkg status file", status, "dpkg", "debian")
    out: dict[str, str] = {}
    for rec in _read_stanzas(status):
        if "Package" in rec:
            out.setdefault(rec["Package"], _source_of(rec))  # the first stanza, as debian_packages()
    return out


# --------------------------------------------------------------------------- man pages

_ROFF_FONT = re.compile(r"\\f(?:\[[^\]]*\]|\([A-Za-z]{2}|[A-Za-z0-9])")  # \fB \f(BI \f[CR]
_ROFF_SPECIAL = {
    r"\-": "-",
    r"\(em": "--",
    r"\(en": "-",
    r"\(aq": "'",
    r"\(dq": '"',
    r"\(lq": '"',
    r"\(rq": '"',
    r"\(cq": "'",
    r"\(oq": "'",
    r"\ ": " ",
    r"\&": "",
    r"\e": "\\",
    r"\|": "",
    r"\^": "",
    r"\%": "",
}
_ROFF_ESCAPE = re.compile(r"\\(?:\*\(..|\*\[[^\]]*\]|\*.|\(..|\[[^\]]*\]|.)")


def _roff_text(line: str) -> str:
    line = _ROFF_FONT.sub("", line)
    for k, v in _ROFF_SPECIAL.items():
        line = line.replace(k, v)
    return _ROFF_ESCAPE.sub("", line)


@dataclass(frozen=True)
class ManPage:
    path: str
    package: str  # the installed package that owns the page
    names: str  # "printf, fprintf, sprintf"
    description: str  # "formatted output conversion"

    @property
    def text(self) -> str:
        return f"{self.names} - {self.description}"


def _name_section(text: str) -> tuple[str, str] | None:
    """(names, description) of a man page's NAME section (man or mdoc macros), or None."""
    lines = text.split("\n")
    start = next((i for i, l in enumerate(lines) if re.match(r'^\.S[hH]\s+"?NAME"?\s*$', l)), None)
    if start is None:
        return None
    body = []
    for line in lines[start + 1 :]:
        if re.match(r"^\.S[hH]\b", line):
            break
        body.append(line)
    if any(l.startswith((".Nm", ".Nd")) for l in body):  # mdoc: .Nm name / .Nd description
        names = [_roff_text(l[3:]).strip().rstrip(",") for l in body if l.startswith(".Nm")]
        desc = " ".join(_roff_text(l[3:]).strip() for l in body if l.startswith(".Nd"))
        return (", ".join(n for n in names if n), desc) if names and desc else None
    words = []
    for line in body:
        if line.startswith(('.\\"', "'\\\"")):
            continue  # a comment
        if line.startswith((".", "'")) or not line.strip():
            # A request: the text of font macros (.B name) is kept; any other request after the
            # text ends it (rst2man puts macro definitions inside NAME).
            macro, _, rest = line.partition(" ")
            if macro not in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB", ".SM", ".SB"):
                if words:
                    break
                continue
            line = rest.replace('"', "")
        words.append(_roff_text(line))
    joined = " ".join(" ".join(words).split())
    if " - " not in joined:
        return None
    names, desc = joined.split(" - ", 1)
    return (names.strip(), desc.strip()) if names.strip() and desc.strip() else None


def man_page_names(root: str | None = None, info_dir: str | None = None) -> list[ManPage]:
    """The NAME line of every English man page under ``root`` (``man*/``, gzip'd or plain roff)
    that an installed package owns; a page reached twice (a symlink, a ``.so`` redirection) is
    read once. Sorted by path."""
    root = root or MAN_DIR
    files = sorted(p for p in glob.glob(os.path.join(root, "man*", "*")) if os.path.isfile(p))
    if not files:
        raise _missing("man pages (man*/)", root, "manpages", "debian")
    owners = dpkg_owners(files, info_dir)
    seen, out = set(), []
    for path in files:
        real = os.path.realpath(path)
        if real in seen or not owners[path]:
            continue
        seen.add(real)
        opener = gzip.open if path.endswith(".gz") else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except (OSError, EOFError):
            continue  # an unreadable page is no text
        if text.startswith(".so "):
            continue  # a redirection to a page read under its own name
        found = _name_section(text)
        if found:
            out.append(ManPage(path, owners[path], *found))
    return out


# --------------------------------------------------------------------------- GCIDE

# A line holding only the source of the text above it: [1913 Webster], [WordNet 1.5 +PJC], ...
_GCIDE_SOURCE = re.compile(r"^\s*\[([^\[\]]*(?:Webster|WordNet|PJC|Century|RDH|AS)[^\[\]]*)\]\s*$")
_GCIDE_ACCENT = re.compile(r"\[[=~'\"`^.,\-]?([A-Za-z])[=~'\"`^.,\-]?\]")  # ['e] -> e, [a^] -> a
_GCIDE_LIGATURE = re.compile(r"\[(ae|oe|AE|OE)\]")
_BRACKETED = re.compile(r"\[[^\[\]]*\]")
_SENSE = re.compile(r"^(?:\d+\.\s*)?(?:\([a-z]\)\s*)?(?:\((?:[A-Z][^()]*)\)\s*,?\s*)*")
_ATTRIBUTION = re.compile(r"\s--\s*\S.*$|\s--\s*$")  # --Shak.  or  -- {Run-on}, n.


def _gcide_clean(text: str) -> str:
    text = _GCIDE_LIGATURE.sub(r"\1", text)
    text = _GCIDE_ACCENT.sub(r"\1", text)
    text = _BRACKETED.sub("", text)  # labels ([Obs.], [R.]) and the remaining character codes
    text = text.replace("{", "").replace("}", "")
    return " ".join(text.split()).rstrip(" ;,")


def _gcide_header_end(text: str) -> int:
    """Where the header of an entry ends: the first line break outside brackets and parentheses
    ('Accrue \\Ac*crue"\\ (pron), v. i. [imp. & p. p.\\n {Accrued}.]\\n   1. To increase ...')."""
    depth = 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth = max(0, depth - 1)
        elif ch == "\n" and depth == 0:
            return i + 1
    return len(text)


@dataclass(frozen=True)
class GcideEntry:
    headword: str
    # One per sense (sense numbers, field labels, attributions removed); texts whose markup could
    # not be parsed, blocks from WordNet, synonym lists and blocks without a source line are left out.
    definitions: tuple[str, ...]
    quotations: tuple[str, ...]  # the illustrative quotations, without their author


def _parse_gcide_entry(headword: str, raw: str) -> GcideEntry:
    body = raw[_gcide_header_end(raw) :]
    blocks, current = [], []
    for line in body.split("\n"):
        m = _GCIDE_SOURCE.match(line)
        if m:
            blocks.append((m.group(1), current))
            current = []
        else:
            current.append(line)
    definitions, quotations = [], []
    for source, lines in blocks:  # lines after the last source tag have no known source: dropped
        lines = [l for l in lines if l.strip()]
        if not lines or "WordNet" in source:
            continue
        indent = len(lines[0]) - len(lines[0].lstrip())
        text = " ".join(l.strip() for l in lines)
        if text.startswith(("Syn:", "Syn.")):
            continue  # a list of synonyms, not prose
        text = re.sub(r"^Note:\s*", "", text)
        text = re.split(r"\s+Syn[:.]\s", text)[0]  # a trailing synonym list
        text = _ATTRIBUTION.sub("", text)
        if indent >= 10:
            quotations.append(_gcide_clean(text))
        else:
            definitions.append(_gcide_clean(_SENSE.sub("", text)))
    # Markup left after cleaning means the entry's layout was not understood (an unbalanced
    # header, a character code): such a text is left out rather than trained on.
    parsed = lambda texts: tuple(t for t in texts if t and not any(c in t for c in "[]{}\\"))
    return GcideEntry(headword, parsed(definitions), parsed(quotations))


def _b64_number(s: str) -> int:
    """dictd's index numbers: base64 digits, most significant first (not RFC 4648 decoding of
    bytes, so not the base64 module)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + alphabet.index(ch)
    return n


def gcide_entries(root: str | None = None) -> list[GcideEntry]:
    """The entries of the GCIDE dictionary (Debian ``dict-gcide``: ``gcide.index`` and the
    dictzip'd ``gcide.dict.dz``), in index order; an entry reached under two headwords is read
    once, the database's own entries (``00-database-*``) are skipped."""
    return list(_gcide_entries(root or GCIDE_DIR))


@lru_cache(maxsize=1)
def _gcide_entries(root: str) -> tuple[GcideEntry, ...]:
    index, data = os.path.join(root, "gcide.index"), os.path.join(root, "gcide.dict.dz")
    if not (os.path.isfile(index) and os.path.isfile(data)):
        raise _missing("GCIDE (gcide.index, gcide.dict.dz)", root, "dict-gcide", "debian")
    with gzip.open(data, "rb") as f:  # dictzip is gzip with a random-access table
        raw = f.read()
    seen, out = set(), []
    with open(index, encoding="utf-8", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 3 or parts[0].startswith(("00-database", "00-gcide", "00-web1913")):
                continue
            span = (_b64_number(parts[1]), _b64_number(parts[2]))
            if span in seen:
                continue
            seen.add(span)
            text = raw[span[0] : span[0] + span[1]].decode("utf-8", errors="replace")
            out.append(_parse_gcide_entry(parts[0], text))
    return tuple(out)
