"""What README.md quotes and what docs/ says, parsed: the results table, the labelled figures of
the docs pages (``<!-- fig:NAME -->``), links and the commands of README's code. Used by
tests/docs/ (the parsing is plain text, so a page's rename or move shows as a failing test)."""

from __future__ import annotations

import os
import re
import shlex

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(REPO, "README.md")

# A figure: digits with an optional decimal part, standing alone or followed by x or % (1.305x,
# 76%), never part of a name (SmolLM2-135M, sm_80, 32k) or of a longer number.
NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?=x(?!\w)|%|[^\w.]|\.(?!\d)|$)")
LABEL = re.compile(r"<!--(.*?)-->")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
ITEM = re.compile(r"^(\s*)(?:[-*]|\d+\.)\s")
# Verdicts, most specific first: "not met" must not read as "met".
VERDICTS = ("not established", "not measured", "not met", "missed", "met")
NEGATIVE = ("not established", "not measured", "not met", "missed")


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def numbers(text: str) -> list[str]:
    return NUMBER.findall(text)


def labels_in(line: str) -> list[str]:
    return [m for comment in LABEL.findall(line) for m in re.findall(r"fig:([\w-]+)", comment)]


def verdict(text: str) -> str | None:
    """The verdict a README cell states (the first of VERDICTS it contains), or None."""
    low = " ".join(text.lower().split())
    for v in VERDICTS:
        if has_verdict(low, v):
            return v
    return None


def has_verdict(text: str, v: str) -> bool:
    low = " ".join(text.lower().split())
    if v == "met":
        return re.search(r"(?<!not )\bmet\b", low) is not None
    return v in low


def section(text: str, heading: str) -> str:
    """The text under '## heading' up to the next '## '."""
    m = re.search(rf"^## {re.escape(heading)}\s*$", text, re.M)
    assert m, f"README.md has no '## {heading}' section"
    rest = text[m.end() :]
    end = re.search(r"^## ", rest, re.M)
    return rest[: end.start()] if end else rest


def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def results_rows(text: str) -> list[dict]:
    """README's results table: one dict per row with its cells by header name, its label and the
    docs page its details cell links to."""
    lines = [ln for ln in section(text, "Results").splitlines() if ln.lstrip().startswith("|")]
    header = split_row(lines[0])
    rows = []
    for ln in lines[2:]:
        cells = dict(zip(header, split_row(ln)))
        found = labels_in(cells.get("details", ""))
        links = LINK.findall(cells.get("details", ""))
        rows.append({"line": ln, "cells": cells, "labels": found, "page": links[0].split("#")[0] if links else None})
    return rows


def segment(doc: str, label: str) -> str | None:
    """The text a label marks in a docs page: its table row when the marker sits in one, else
    the list item, else the block (lines up to a blank line) that holds it."""
    lines = doc.splitlines()
    at = [i for i, ln in enumerate(lines) if label in labels_in(ln)]
    if not at:
        return None
    assert len(at) == 1, f"fig:{label} is marked {len(at)} times"
    i = at[0]
    if lines[i].lstrip().startswith("|"):
        return lines[i]
    lo = i
    while lo > 0 and lines[lo - 1].strip():
        lo -= 1
    hi = i
    while hi + 1 < len(lines) and lines[hi + 1].strip():
        hi += 1
    starts = [j for j in range(lo, i + 1) if ITEM.match(lines[j])]
    if starts:
        lo = starts[-1]
        indent = len(ITEM.match(lines[lo]).group(1))
        end = lo + 1
        while end <= hi and not (ITEM.match(lines[end]) and len(ITEM.match(lines[end]).group(1)) <= indent):
            end += 1
        hi = end - 1
    return "\n".join(lines[lo : hi + 1])


def headings(doc: str) -> set[str]:
    """GitHub's anchors of a page's headings (outside fenced code)."""
    out, fenced = set(), False
    for ln in doc.splitlines():
        if ln.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"^#{1,6} ", ln):
            title = ln.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


def commands(text: str) -> list[list[str]]:
    """Every command of README's bash blocks (continuations joined, comments dropped) and of the
    results table's 'measured by' column, as argv lists with leading VAR=value dropped."""
    raw, fenced, kind = [], False, ""
    for ln in text.splitlines():
        if ln.startswith("```"):
            fenced, kind = (not fenced), ln[3:].strip()
            continue
        if fenced and kind == "bash":
            if raw and raw[-1].endswith("\\"):
                raw[-1] = raw[-1][:-1] + " " + ln.strip()
            else:
                raw.append(ln.strip())
    for row in results_rows(text):
        raw += re.findall(r"`([^`]+)`", row["cells"].get("measured by", ""))
    out = []
    for line in raw:
        argv = shlex.split(line, comments=True)
        while argv and re.match(r"^[A-Z_]+=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def prose_sentences(text: str) -> list[str]:
    """The sentences of a page's prose (fenced code and table rows left out), whitespace folded."""
    kept, fenced = [], False
    for ln in text.splitlines():
        if ln.startswith("```"):
            fenced = not fenced
        elif not fenced and not ln.lstrip().startswith("|"):
            kept.append(ln)
    return [" ".join(t.split()) for t in re.split(r"(?<=[.!?])\s+|\n\s*\n", "\n".join(kept)) if t.strip()]
