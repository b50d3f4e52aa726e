"""Counters of what the data pipeline read, skipped, produced and padded.

One :class:`DataStats` travels with each stage (reading, tokenising, packing); stages add to
it and :meth:`DataStats.report` prints the end-of-run report users check before training on
a corpus: documents read, documents skipped and why, tokens in, tokens out, padding fraction.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class DataStats:
    documents_read: int = 0  # documents accepted from the source (after skipping)
    skipped: Counter = field(default_factory=Counter)  # reason -> number of records skipped
    tokens_in: int = 0  # tokens of the accepted documents, as tokenised
    tokens_out: int = 0  # non-padding tokens placed in rows (tokens_in + inserted special/copied tokens)
    special_tokens: int = 0  # GEM special tokens inserted
    copied_tokens: int = 0  # tokens repeated by the `reconstruct` layout
    padding_tokens: int = 0
    rows: int = 0
    chunked_documents: int = 0  # documents longer than one row's budget, split into chunks
    pieces: int = 0  # documents (or chunks) placed, each its own document for the mask
    truncated_texts: int = 0  # contrastive texts cut to fit max_text_len (specials kept)
    truncated_tokens: int = 0
    layouts: Counter = field(default_factory=Counter)  # layout name -> pieces
    hard_negatives: int = 0  # hard-negative texts read (--contrastive-negative-field)
    records_without_negatives: int = 0  # pair records kept without any hard negative
    empty_negatives: int = 0  # empty hard-negative strings dropped

    def skip(self, reason: str, n: int = 1) -> None:
        self.skipped[reason] += n

    @property
    def documents_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def row_tokens(self) -> int:
        return self.tokens_out + self.padding_tokens

    @property
    def padding_fraction(self) -> float:
        return self.padding_tokens / self.row_tokens if self.row_tokens else 0.0

    @property
    def packing_efficiency(self) -> float:
        """Fraction of row slots holding real tokens (1 - padding fraction)."""
        return 1.0 - self.padding_fraction if self.row_tokens else 0.0

    def merge(self, other: "DataStats") -> "DataStats":
        for f in dataclasses.fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            setattr(self, f.name, a + b if not isinstance(a, Counter) else Counter(a) + Counter(b))
        return self

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["skipped"] = dict(sorted(self.skipped.items()))
        d["layouts"] = dict(sorted(self.layouts.items()))
        d["documents_skipped"] = self.documents_skipped
        d["padding_fraction"] = self.padding_fraction
        return d

    def report(self, title: str = "data") -> str:
        skipped = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items())) or "none"
        lines = [
            f"[{title}] documents read: {self.documents_read}",
            f"[{title}] documents skipped: {self.documents_skipped} ({skipped})",
            f"[{title}] tokens in: {self.tokens_in}",
        ]
        if self.rows:
            layouts = ", ".join(f"{k}: {v}" for k, v in sorted(self.layouts.items()))
            lines += [
                f"[{title}] tokens out: {self.tokens_out} (special {self.special_tokens}, reconstruct copies {self.copied_tokens})",
                f"[{title}] rows: {self.rows}, pieces: {self.pieces} ({layouts}), chunked documents: {self.chunked_documents}",
                f"[{title}] padding: {self.padding_tokens} tokens = {100 * self.padding_fraction:.3f}%",
            ]
        if self.hard_negatives or self.records_without_negatives or self.empty_negatives:
            lines.append(
                f"[{title}] hard negatives: {self.hard_negatives} (records without any: {self.records_without_negatives}, "
                f"empty strings dropped: {self.empty_negatives})"
            )
        if self.truncated_texts:
            lines.append(f"[{title}] truncated texts: {self.truncated_texts} ({self.truncated_tokens} tokens cut)")
        return "\n".join(lines)
