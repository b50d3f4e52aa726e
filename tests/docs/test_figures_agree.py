"""README's results table and docs/ state the same figures: every row carries a label
(``<!-- fig:NAME -->`` in its details cell) that marks, in the docs page the row links to, the
passage the figure comes from; every number of the row's figure and verdict cells must occur in
that passage, and its verdict (met / not met / missed / not established / not measured) too.
Editing a figure on either side alone fails here."""

import os

import pytest

from tests.docs.readme_docs import NEGATIVE, README, REPO, has_verdict, numbers, prose_sentences, read, results_rows, segment, verdict

ROWS = results_rows(read(README))


def test_results_table_has_labelled_rows():
    assert len(ROWS) >= 10, "README.md's '## Results' table lost its rows"
    for row in ROWS:
        assert len(row["labels"]) == 1, f"a results row needs one <!-- fig:NAME --> label in its details cell: {row['line']}"
        assert row["page"] and row["page"].startswith("docs/"), f"a results row must link the docs page of its figure: {row['line']}"
    names = [row["labels"][0] for row in ROWS]
    assert len(names) == len(set(names)), f"labels used twice: {sorted(n for n in names if names.count(n) > 1)}"


@pytest.mark.parametrize("row", ROWS, ids=[(r["labels"] or ["unlabelled"])[0] for r in ROWS])
def test_readme_figure_equals_the_labelled_docs_figure(row):
    label, page = row["labels"][0], row["page"]
    doc = read(os.path.join(REPO, page))
    text = segment(doc, label)
    assert text is not None, f"{page} has no <!-- fig:{label} --> (README.md's results row: {row['line']})"
    cells = row["cells"]
    quoted = numbers(cells["figure"]) + numbers(cells["verdict"])
    in_doc = set(numbers(text))
    missing = [n for n in quoted if n not in in_doc]
    assert not missing, f"README.md quotes {missing} for fig:{label}, which {page} does not state there:\n{text}"
    said = verdict(cells["verdict"])
    if said is not None:
        assert has_verdict(text, said), f"README.md says '{said}' for fig:{label}; {page} does not:\n{text}"
        if said == "met":
            worse = [v for v in NEGATIVE if has_verdict(text, v)]
            assert not worse, f"README.md says 'met' for fig:{label}; {page} says {worse}:\n{text}"


def test_readme_says_nothing_twice():
    seen, twice = set(), []
    for sentence in prose_sentences(read(README)):
        if len(sentence.split()) < 5:
            continue
        if sentence in seen:
            twice.append(sentence)
        seen.add(sentence)
    assert not twice, f"README.md repeats: {twice}"
