"""Per-document GEM samples: chunking, the seeded layout draw, and building the token arrays.

A *piece* is what the mask treats as one document: a whole document, or one chunk of a
document longer than a row's budget. Chunks are cut at ``max_chunk_tokens`` so that every
layout of a chunk fits in one row (no token is dropped): ``seq_length - K`` for split (the
chunk plus its K special tokens), ``(seq_length - K) // 2`` for reconstruct (the chunk twice
plus K), ``seq_length`` when every piece is plain (p_raw = 1).

Randomness: piece j of document d gets the uniform draws number 2j and 2j+1 of the
document's layout stream, a counter-based hash (SplitMix64 finaliser) of (seed, epoch, d,
draw number), and ``gem.layout.draw_layout`` (the rule) turns them into a layout. So a piece
never depends on worker count, rank count, document order or resume point. A hash rather than
``document_rng`` because it is vectorised: building one numpy Generator per document costs
~12 us, which alone would cap packing of short documents near 3M tokens/s/core. The
contrastive positive view does use ``document_rng(seed, epoch, d, DROPOUT_STREAM)``.

The plan (:class:`PiecePlan`) needs only document lengths (and, for reconstruct, each
document's first token, so a leading BOS is not repeated): it is computed before any token is
read, which makes packing a cheap numpy/Python pass over integers.

Summary mode (GEMConfig.train_mode == "summary"): every piece gets the GEM layout (p_raw counts
as 0) and a piece too short for it is left out and counted (``PiecePlan.skipped_short``): with
the base model frozen, plain text carries no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..gem.config import GEMConfig
from ..gem.layout import build_layout, document_rng, draw_layout, phase1_layout_config, prefix_dropout
from ..gem.roles import Role
from ..gem.template import EmbedTemplate

LAYOUT_STREAM = 0  # document_rng stream of the layout draw
DROPOUT_STREAM = 1  # document_rng stream of the contrastive positive view
SHUFFLE_STREAM = 2**31 - 1  # rng tag of the per-epoch document order (not a document stream)

LAYOUT_CODES = {"plain": 0, "split": 1, "reconstruct": 2, "embed": 3}
LAYOUT_NAMES = {v: k for k, v in LAYOUT_CODES.items()}
_PREFIX, _SPECIAL, _SUFFIX = int(Role.PREFIX), int(Role.SPECIAL), int(Role.SUFFIX)
assert _PREFIX == 0  # rows start as zeros = PREFIX

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def layout_uniforms(seed: int, epoch: int, docs: np.ndarray, draws: np.ndarray, stream: int = LAYOUT_STREAM) -> np.ndarray:
    """Uniform [0, 1) draw number ``draws[i]`` of document ``docs[i]``'s stream (float64)."""
    key = np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64)
    for part in (epoch, stream):
        key = _mix64((key + _GOLDEN) ^ np.uint64(part & 0xFFFFFFFFFFFFFFFF))
    x = _mix64((key + _GOLDEN) ^ np.asarray(docs, dtype=np.int64).astype(np.uint64))
    x = _mix64((x + _GOLDEN) ^ np.asarray(draws, dtype=np.int64).astype(np.uint64))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Draws:
    """Hands precomputed uniforms to ``draw_layout`` in place of a Generator."""

    __slots__ = ("_values",)

    def __init__(self, u: float, v: float):
        self._values = [v, u]

    def random(self) -> float:
        return self._values.pop()


@dataclass
class PiecePlan:
    """Pieces in document order, as parallel arrays (one entry per piece)."""

    doc: np.ndarray  # int64 document index in the corpus
    start: np.ndarray  # int64 first token of the piece within its document
    length: np.ndarray  # int64 tokens of the document in the piece
    layout: np.ndarray  # int8 LAYOUT_CODES
    cut: np.ndarray  # int64 split cut (tokens before the specials), -1 otherwise
    out_len: np.ndarray  # int64 tokens the piece occupies in a row

    # Summary mode: pieces too short for a GEM layout, left out (plain text trains nothing there).
    skipped_short: int = 0

    def __len__(self) -> int:
        return int(self.doc.shape[0])

    def take(self, index: np.ndarray) -> "PiecePlan":
        arrays = (a[index] for a in (self.doc, self.start, self.length, self.layout, self.cut, self.out_len))
        return PiecePlan(*arrays, skipped_short=self.skipped_short)


def epoch_order(num_docs: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """Document order of an epoch: a seeded permutation, or corpus order."""
    if not shuffle:
        return np.arange(num_docs, dtype=np.int64)
    return np.random.default_rng([seed, epoch, SHUFFLE_STREAM]).permutation(num_docs).astype(np.int64)


class SampleBuilder:
    """Turns documents into GEM pieces for rows of ``seq_length`` tokens."""

    def __init__(self, config: GEMConfig, seq_length: int, *, seed: int = 0, bos_id: int | None = None, embed_template: EmbedTemplate | None = None):
        k = config.num_special_tokens
        if len(config.special_token_ids) != k:
            raise ValueError(
                f"GEMConfig.special_token_ids={config.special_token_ids} must hold num_special_tokens={k} ids (add the special tokens to the tokenizer first)"
            )
        need = 2 * (k + 1) if config.layout == "reconstruct" else k + 2
        if seq_length < need:
            raise ValueError(f"seq_length={seq_length} is too short for K={k} special tokens ({need} needed)")
        self.config, self.seq_length, self.seed, self.bos_id = config, int(seq_length), int(seed), bos_id
        # Summary mode trains only GEM layouts (gem.layout.phase1_layout_config): a piece too
        # short for the layout is left out (counted in PiecePlan.skipped_short), not kept plain.
        self.summary_mode = config.summary_mode
        self.layout_config = phase1_layout_config(config)
        self.special_ids = np.asarray(config.special_token_ids, dtype=np.int64)
        self.k = k
        # The contrastive views' wrapping (gem/template.py), built from the tokenizer by the caller;
        # phase-1 builders never use it.
        self.embed_template = embed_template or EmbedTemplate()

    @property
    def max_chunk_tokens(self) -> int:
        if self.layout_config.p_raw >= 1.0:
            return self.seq_length
        if self.config.layout == "reconstruct":
            return (self.seq_length - self.k) // 2
        return self.seq_length - self.k

    def plan(self, docs: np.ndarray, lengths: np.ndarray, epoch: int, first_tokens: np.ndarray | None = None) -> PiecePlan:
        """Pieces of the documents ``docs`` (corpus indices, in packing order).

        ``lengths[i]`` is the token count of document ``docs[i]``; ``first_tokens[i]`` its first
        token (needed only for reconstruct with a bos_id). Empty documents produce no piece.
        """
        order = np.asarray(docs, dtype=np.int64)
        lens = np.asarray(lengths, dtype=np.int64)
        c = self.max_chunk_tokens
        nchunks = (lens + c - 1) // c
        total = int(nchunks.sum())
        doc = np.repeat(order, nchunks)
        first_piece = np.cumsum(nchunks) - nchunks
        j = np.arange(total, dtype=np.int64) - np.repeat(first_piece, nchunks)
        start = j * c
        length = np.minimum(c, np.repeat(lens, nchunks) - start)
        layout = np.zeros(total, dtype=np.int8)
        cut = np.full(total, -1, dtype=np.int64)
        cfg = self.layout_config
        if cfg.p_raw < 1.0 and total:
            u = layout_uniforms(self.seed, epoch, doc, 2 * j)
            v = layout_uniforms(self.seed, epoch, doc, 2 * j + 1)
            split_code, recon_code = LAYOUT_CODES["split"], LAYOUT_CODES["reconstruct"]
            for p, (n_p, u_p, v_p) in enumerate(zip(length.tolist(), u.tolist(), v.tolist())):
                name, cut_p = draw_layout(n_p, cfg, _Draws(u_p, v_p))
                if name == "split":
                    layout[p] = split_code
                    cut[p] = cut_p
                elif name == "reconstruct":
                    layout[p] = recon_code
        out_len = length.copy()
        out_len[layout != 0] += self.k
        recon = layout == LAYOUT_CODES["reconstruct"]
        if recon.any():
            again = length[recon].copy()
            if self.bos_id is not None:
                if first_tokens is None:
                    raise ValueError("reconstruct with a bos_id needs first_tokens to size the second copy")
                first = np.repeat(np.asarray(first_tokens, dtype=np.int64), nchunks)
                drops = (j[recon] == 0) & (first[recon] == self.bos_id) & (again > 1)
                again -= drops
            out_len[recon] += again
        plan = PiecePlan(doc, start, length, layout, cut, out_len)
        if self.summary_mode:
            gem = np.flatnonzero(layout != LAYOUT_CODES["plain"])
            plan = plan.take(gem)
            plan.skipped_short = total - int(gem.shape[0])
        return plan

    def build(self, doc_tokens: np.ndarray, start: int, length: int, layout: int, cut: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids int64, roles int8) of one piece; ``doc_tokens`` are its document's tokens."""
        tokens = doc_tokens[start : start + length]
        name = LAYOUT_NAMES[int(layout)]
        if name == "plain":
            return tokens, np.zeros(tokens.shape[0], dtype=np.int8)  # all PREFIX
        return build_layout(
            tokens,
            name,
            self.special_ids,
            cut=int(cut) if name == "split" else None,
            bos_id=self.bos_id if start == 0 else None,
        )

    def write(self, ids: np.ndarray, roles: np.ndarray, pos: int, tokens: np.ndarray, layout: int, cut: int, first_chunk: bool) -> int:
        """Write one piece straight into row buffers at ``pos``; returns where it ends.

        The fast path of :meth:`build` (no intermediate arrays): ``tokens`` is the piece's slice
        of its document, ``roles`` must hold PREFIX (0) there already. Tested equal to
        ``build`` + ``packing.assemble_row``.
        """
        n, k = tokens.shape[0], self.k
        if layout == 0:  # plain
            ids[pos : pos + n] = tokens
            return pos + n
        if layout == 1:  # split: prefix SPECIAL*K suffix
            a, b = pos + cut, pos + cut + k
            ids[pos:a] = tokens[:cut]
            ids[a:b] = self.special_ids
            ids[b : pos + n + k] = tokens[cut:]
            roles[a:b] = _SPECIAL
            roles[b : pos + n + k] = _SUFFIX
            return pos + n + k
        name = LAYOUT_NAMES[int(layout)]
        p_ids, p_roles = build_layout(tokens, name, self.special_ids, bos_id=self.bos_id if first_chunk else None)
        end = pos + p_ids.shape[0]
        ids[pos:end] = p_ids
        roles[pos:end] = p_roles
        return end

    # ------------------------------------------------------------------ contrastive phase

    def _text_budget(self, max_text_len: int) -> int:
        """Text tokens that fit in ``max_text_len`` beside the K special tokens and the template."""
        if max_text_len - self.k < 1:
            raise ValueError(f"max_text_len={max_text_len} leaves no room for text beside K={self.k} special tokens")
        if self.embed_template.template != self.config.embed_template:  # a path that forgot the template must not train bare texts
            raise ValueError(
                f"GEMConfig.embed_template={self.config.embed_template!r} but the sample builder holds {self.embed_template.template!r}: "
                "pass embed_template=EmbedTemplate.from_tokenizer(config.embed_template, tokenizer)"
            )
        return self.embed_template.text_budget(max_text_len - self.k)

    def _embed(self, text: np.ndarray):
        """The ``embed`` layout of already truncated text tokens: [BOS] prefix text suffix SPECIAL*K."""
        return build_layout(self.embed_template.wrap(text), "embed", self.special_ids)

    def embed_text(self, tokens: np.ndarray, max_text_len: int):
        """One text in the ``embed`` layout, truncated like embed_pair's: ((ids, roles), tokens_cut)."""
        text = tokens[: self._text_budget(max_text_len)]
        return self._embed(text), int(tokens.shape[0] - text.shape[0])

    def embed_pair(
        self,
        doc_tokens: np.ndarray,
        doc_index: int,
        epoch: int,
        max_text_len: int,
        positive_tokens: np.ndarray | None = None,
        anchor_tokens: np.ndarray | None = None,
    ):
        """Anchor and positive view of one text in the ``embed`` layout.

        The text is truncated so that it, the embed template (config.embed_template, around the
        text) and its K special tokens fit in ``max_text_len``: the template and the specials are
        never cut. Without ``positive_tokens`` (self-supervised, the paper's phase 2) the positive
        view is ``prefix_dropout`` of the (truncated) text with rate ``config.prefix_dropout`` and
        the document's DROPOUT_STREAM rng, then wrapped (the template is never dropped); with them
        (a supervised pair) it is that text, truncated the same way and left intact.
        ``anchor_tokens``: the anchor's own tokens when they differ from the text the positive
        view is made of (the text with a query prompt), truncated alike.
        Returns ((ids, roles), (ids, roles), tokens_cut).
        """
        budget = self._text_budget(max_text_len)
        text = doc_tokens[:budget]
        cut = int(doc_tokens.shape[0] - text.shape[0])
        anchor = self._embed(text)
        if anchor_tokens is not None:
            anchor = self._embed(anchor_tokens[:budget])
            cut = int(max(anchor_tokens.shape[0] - budget, 0))  # the anchor's loss; the view is of the same text
        if positive_tokens is not None:
            other = positive_tokens[:budget]
            cut += int(positive_tokens.shape[0] - other.shape[0])
            return anchor, self._embed(other), cut
        rng = document_rng(self.seed, epoch, doc_index, DROPOUT_STREAM)
        positive = self._embed(prefix_dropout(text, self.config.prefix_dropout, rng))
        return anchor, positive, cut
