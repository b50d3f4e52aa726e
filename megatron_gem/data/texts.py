"""The raw strings beside a corpus, for a teacher that reads text, not our tokens.

A corpus holds token ids only (a cached or Megatron corpus never saw the strings again), and
decoding them would not give the text back (normalisation, truncation, the query prompt and the
embedding template are the student's, not the teacher's). :class:`RawTexts` keeps, per contrastive
item (document d of the data set's corpus), the anchor's text, its positive's (the anchor's own
text when positives are views of it: self-supervised phase 2) and its hard negatives' texts, as
read from the input. :func:`read_texts` reads a text input's documents again with the reader that
tokenised them, so document d here is document d there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .readers import DataError, read_source
from .stats import DataStats


class RawTexts:
    """Item d's (anchor text, positive text, [hard negative texts]); ``positives`` None: every
    positive is the anchor's own text; ``negatives`` None: no hard negatives."""

    def __init__(self, anchors: Sequence[str], positives: Sequence[str] | None = None, negatives: Sequence[Sequence[str]] | None = None):
        for name, side in (("positives", positives), ("negatives", negatives)):
            if side is not None and len(side) != len(anchors):
                raise ValueError(f"raw texts: {len(side)} {name} for {len(anchors)} anchors")
        self.anchors, self.positives, self.negatives = anchors, positives, negatives

    def __len__(self) -> int:
        return len(self.anchors)

    def get(self, d: int) -> tuple[str, str, list[str]]:
        anchor = self.anchors[d]
        positive = self.positives[d] if self.positives is not None else anchor
        return anchor, positive, list(self.negatives[d]) if self.negatives is not None else []

    def view(self, start: int, stop: int) -> "RawTexts":
        """Items ``start:stop`` (the part --split keeps, data/split.py CorpusView's range)."""
        if not 0 <= start <= stop <= len(self):
            raise ValueError(f"raw texts {start}:{stop} outside {len(self)} items")
        cut = lambda side: side[start:stop] if side is not None else None  # noqa: E731
        return RawTexts(self.anchors[start:stop], cut(self.positives), cut(self.negatives))


def read_texts(source, *, text_field: str = "text", on_bad: str = "error", hf_split: str = "train") -> list[str]:
    """The documents of text input ``source`` (files, a directory or glob, ``hf:NAME``) as
    strings, in the order and with the skips of the reader that tokenises it (open_corpus, the
    data cache). A Megatron ``.bin/.idx`` prefix holds token ids only: a DataError."""
    if isinstance(source, str) and not source.startswith("hf:"):
        prefix = source[:-4] if source.endswith((".bin", ".idx")) else source
        if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
            raise DataError(f"{source}: a Megatron .bin/.idx prefix holds token ids, not the text a teacher reads")
    docs = read_source(source, text_field=text_field, txt_unit="document", on_bad=on_bad, max_chars=None, stats=DataStats(), hf_split=hf_split)
    return [d.text for d in docs]
