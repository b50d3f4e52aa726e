"""GEMDataCollator: the GEM layout for HF Trainer / TRL pipelines that already tokenise.

Each example (``input_ids`` and optionally the pipeline's own ``labels``) gets a seeded layout
from ``gem.layout.draw_layout`` (plain with probability ``p_raw``, else split / reconstruct),
the K special tokens are inserted, and the batch carries everything the "gem" attention needs:

  input_ids     int64 [B, L]   tokens (padding: the tokenizer's pad id)
  labels        int64 [B, L]   HF convention (*not* shifted): labels[j] is the target token at j,
                               predicted from position j-1; HF causal LMs (and TRL) shift them
                               internally. -100 on: special tokens (never targets), the first
                               token of every document (nothing of the same document predicts
                               it; in packed rows position j-1 is another document), padding, and
                               every token whose label the pipeline had masked (e.g. SFT prompts:
                               the pipeline's mask is carried through the insertion, and in a
                               reconstruct layout a masked token stays masked in both copies).
                               After HF's shift this is exactly ``gem.layout.next_token_labels``
                               restricted to the pipeline's trained tokens.
  position_ids  int64 [B, L]   restart at 0 at each document
  doc_ids       int64 [B, L]   document of each token, PAD_DOC_ID (-1) on padding
  roles         int64 [B, L]   Role.PREFIX / SPECIAL / SUFFIX

Summary mode (``config.train_mode == "summary"``, train.py's ``--gem-train summary``): the base
model is frozen, so a token whose prediction depends on no trainable parameter trains nothing.
As train.py's data does (gem.layout.phase1_layout_config, trains_prefix_targets): every example
gets the GEM layout (``p_raw`` counts as 0); an example too short for it is left out of the
phase-1 rows and counted (``stats["too_short_for_summary_layout"]``; it still enters the
contrastive view); the predictions made at PREFIX positions get -100 (a prefix token never sees
a summary token); and a reconstruct layout is truncated to fit ``max_length`` instead of falling
back to plain. A batch with no example left is an error.

``packing=False``: one example per row (doc id 0), padded at the end to the longest row.
``packing=True``: examples are packed first-fit decreasing into rows of ``max_length`` (doc ids
unique in the batch), then trimmed to the longest row. Token ids are never re-tokenised, so
chat templates survive as the pipeline rendered them.

With ``contrastive=True`` (set by :class:`~megatron_gem.integrations.GEMTrainer`) the batch
also carries the phase-2 view: each example's text (its tokens as given, truncated to
``max_length - K``) as ``text SPECIAL*K`` (anchor, doc j) and a copy with ``prefix_dropout``
token deletion (positive, doc N + j); with ``config.embed_template`` the text is wrapped in it
first (``embed_template``, built by ``from_tokenizer``; the text is truncated, not the template,
and dropout never touches the template), as train.py and GEMEmbedder do; packed into ``gem_cl_input_ids``, ``gem_cl_position_ids``,
``gem_cl_doc_ids``, ``gem_cl_roles`` and ``gem_cl_num_texts`` (N). With ``text_field`` (set by
GEMTrainer when it distils a teacher) also ``gem_cl_texts``: each example's raw string under that
field, for the anchors and again for their views (2N strings), what the teacher embeds.

Randomness: example i of the c-th call in DataLoader worker w on data-parallel rank r, in a
batch of B examples, uses ``numpy.random.default_rng([seed, w, c, r * B + i, stream])`` (stream
0 layout, 1 dropout), so a run is reproducible for a fixed seed, batch size and worker count,
and R ranks with B examples each draw what one process draws for the R * B examples of the
same global batch (the Trainer's sampler hands rank r the r-th B of them); without the rank
every rank would repeat rank 0's draws on its own examples. A resumed GEM trainer continues
the count (``resume_at``) when DataLoader workers are off.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..data.datasets import SHORT_FOR_SUMMARY
from ..data.packing import collate_rows, pack_texts
from ..gem.config import GEMConfig
from ..gem.layout import build_layout, draw_layout, phase1_layout_config, position_ids_from_doc_ids, prefix_dropout, trains_prefix_targets
from ..gem.roles import IGNORE_INDEX, PAD_DOC_ID, Role
from ..gem.template import EmbedTemplate

CL_PREFIX = "gem_cl_"
CL_KEYS = tuple(CL_PREFIX + k for k in ("input_ids", "position_ids", "doc_ids", "roles", "num_texts", "texts"))
LAYOUT_STREAM, DROPOUT_STREAM = 0, 1


def _as_array(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.int64).reshape(-1)


def _data_rank() -> int:
    """This process's data-parallel rank: the process group's when one is up, else the
    launcher's RANK (DataLoader worker processes have no process group)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def _round_up(n: int, multiple: int | None) -> int:
    return n if not multiple else -(-n // multiple) * multiple


@dataclass
class GEMDataCollator:
    """See the module docstring. ``config.special_token_ids`` must be set (``enable_gem`` does)."""

    config: GEMConfig
    pad_token_id: int = 0
    max_length: int | None = None
    packing: bool = False
    pad_to_multiple_of: int | None = None
    seed: int = 0
    bos_token_id: int | None = None  # reconstruct: a leading BOS is not repeated
    contrastive: bool = False
    embed_template: EmbedTemplate | None = None  # config.embed_template tokenised (from_tokenizer builds it)
    text_field: str | None = None  # contrastive view: the examples' raw-text field a distillation teacher embeds (GEMTrainer sets it)
    stats: dict = field(default_factory=lambda: {"plain": 0, "split": 0, "reconstruct": 0, "reconstruct_too_long": 0, SHORT_FOR_SUMMARY: 0})
    _calls: int = field(default=0, repr=False)
    _offset: int = field(default=0, repr=False)

    @classmethod
    def from_tokenizer(cls, tokenizer, config: GEMConfig, **kwargs) -> "GEMDataCollator":
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        kwargs.setdefault("embed_template", EmbedTemplate.from_tokenizer(config.embed_template, tokenizer))
        return cls(config=config, pad_token_id=int(pad if pad is not None else 0), bos_token_id=tokenizer.bos_token_id, **kwargs)

    def __post_init__(self):
        k = len(self.config.special_token_ids)
        if k != self.config.num_special_tokens:
            raise ValueError("GEMConfig.special_token_ids is not set: call enable_gem(model, tokenizer, config) first")
        self.embed_template = self.embed_template or EmbedTemplate()
        if self.embed_template.template != self.config.embed_template:
            raise ValueError(
                f"GEMConfig.embed_template={self.config.embed_template!r} but the collator holds {self.embed_template.template!r}: "
                "build it with GEMDataCollator.from_tokenizer(tokenizer, config)"
            )
        if self.packing and not self.max_length:
            raise ValueError("packing=True needs max_length (the row length)")
        if self.max_length is not None and self.max_length <= k + 1:
            raise ValueError(f"max_length={self.max_length} leaves no room for text around {k} special tokens")

    # ------------------------------------------------------------------ one example
    def _tokens_and_labels(self, feature: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        ids = _as_array(feature["input_ids"])
        if feature.get("labels") is not None:
            labels = _as_array(feature["labels"])
        else:
            labels = ids.copy()
            for mask_key in ("completion_mask", "assistant_masks"):  # TRL's mask columns
                if feature.get(mask_key) is not None:
                    labels[_as_array(feature[mask_key]) == 0] = IGNORE_INDEX
        if labels.shape != ids.shape:
            raise ValueError(f"labels ({labels.shape[0]}) and input_ids ({ids.shape[0]}) differ in length")
        if feature.get("attention_mask") is not None:  # pre-padded examples: keep the real tokens
            keep = _as_array(feature["attention_mask"]) != 0
            ids, labels = ids[keep], labels[keep]
        if ids.shape[0] == 0:
            raise ValueError("an example has no tokens")
        return ids, labels

    def _rng(self, i: int, stream: int) -> np.random.Generator:
        info = torch.utils.data.get_worker_info()
        return np.random.default_rng([self.seed, 0 if info is None else info.id, self._calls, self._offset + i, stream])

    def layout_example(self, ids: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        """(ids, roles, labels) of one example under a drawn layout; labels as described above.
        None in summary mode for an example too short for the GEM layout (it would train nothing)."""
        cfg, specials = phase1_layout_config(self.config), self.config.special_token_ids
        k = len(specials)
        n_budget = ids.shape[0] if self.max_length is None else min(ids.shape[0], self.max_length - k)
        if cfg.summary_mode and cfg.layout == "reconstruct" and self.max_length is not None:
            n_budget = min(n_budget, (self.max_length - k) // 2)  # text, K specials, text again: always fits
        layout, cut = draw_layout(n_budget, cfg, rng)
        if layout == "plain" and cfg.summary_mode:
            self.stats[SHORT_FOR_SUMMARY] += 1
            return None
        masked_k = np.full(k, IGNORE_INDEX, dtype=np.int64)
        if layout == "reconstruct":
            t, lab = ids[:n_budget], labels[:n_budget]
            drop_bos = self.bos_token_id is not None and t[0] == self.bos_token_id and t.shape[0] > 1
            if self.max_length is not None and 2 * t.shape[0] - int(drop_bos) + k > self.max_length:
                self.stats["reconstruct_too_long"] += 1
                layout = "plain"
            else:
                out_ids, roles = build_layout(t, "reconstruct", specials, bos_id=self.bos_token_id)
                out_lab = np.concatenate([lab, masked_k, lab[1:] if drop_bos else lab])
        if layout == "plain":
            end = ids.shape[0] if self.max_length is None else min(ids.shape[0], self.max_length)
            out_ids, roles = build_layout(ids[:end], "plain", specials)
            out_lab = labels[:end].copy()
        elif layout == "split":
            t, lab = ids[:n_budget], labels[:n_budget]
            out_ids, roles = build_layout(t, "split", specials, cut=cut)
            out_lab = np.concatenate([lab[:cut], masked_k, lab[cut:]])
        self.stats[layout] += 1
        out_lab = np.where(roles == Role.SPECIAL, IGNORE_INDEX, out_lab)
        out_lab[0] = IGNORE_INDEX  # the document's first token has no predictor in the document
        if not trains_prefix_targets(cfg):  # HF labels are not shifted: label j is predicted at j - 1
            out_lab[1:][roles[:-1] == Role.PREFIX] = IGNORE_INDEX
        return out_ids, roles, out_lab.astype(np.int64)

    def resume_at(self, batches: int) -> None:
        """Continue the draws as if ``batches`` batches had been collated in this process (a
        resumed Trainer: the batches it skips are never collated). Exact with DataLoader
        workers off; a worker keeps its own count."""
        self._calls = int(batches)

    # ------------------------------------------------------------------ the batch
    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [self._tokens_and_labels(f) for f in features]
        self._offset = _data_rank() * len(pairs)
        examples = [self.layout_example(ids, lab, self._rng(i, LAYOUT_STREAM)) for i, (ids, lab) in enumerate(pairs)]
        examples = [e for e in examples if e is not None]  # summary mode: the too-short ones, counted
        if not examples:
            cfg = self.config
            raise ValueError(
                f"summary mode: all {len(pairs)} examples of a batch are too short for the {cfg.layout!r} layout (GEMConfig min_prefix_len="
                f"{cfg.min_prefix_len}, min_suffix_len={cfg.min_suffix_len}; --gem-min-prefix-len / --gem-min-suffix-len); plain text trains "
                f"nothing with a frozen base: filter out examples shorter than that"
            )
        batch = self._pack(examples) if self.packing else self._pad(examples)
        if self.contrastive:
            batch.update(self._contrastive([ids for ids, _ in pairs]))
            if self.text_field is not None:
                batch[CL_PREFIX + "texts"] = self._raw_texts(features) * 2  # anchors, then their views: one text each
        self._calls += 1
        return batch

    def _raw_texts(self, features: Sequence[dict[str, Any]]) -> list[str]:
        texts = [f.get(self.text_field) for f in features]
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise ValueError(
                f"example {bad} has no string field {self.text_field!r}: the teacher embeds the raw text (keep the column: "
                "TrainingArguments(remove_unused_columns=False) with a datasets.Dataset)"
            )
        return texts

    def _pad(self, examples) -> dict[str, torch.Tensor]:
        width = _round_up(max(e[0].shape[0] for e in examples), self.pad_to_multiple_of)
        B = len(examples)
        ids = np.full((B, width), self.pad_token_id, dtype=np.int64)
        roles = np.full((B, width), int(Role.PREFIX), dtype=np.int64)
        labels = np.full((B, width), IGNORE_INDEX, dtype=np.int64)
        doc = np.full((B, width), PAD_DOC_ID, dtype=np.int64)
        for b, (e_ids, e_roles, e_lab) in enumerate(examples):
            n = e_ids.shape[0]
            ids[b, :n], roles[b, :n], labels[b, :n], doc[b, :n] = e_ids, e_roles, e_lab, 0
        return self._tensors(ids, labels, doc, roles)

    def _pack(self, examples) -> dict[str, torch.Tensor]:
        rows = pack_texts([(e[0], e[1]) for e in examples], self.max_length, pad_id=self.pad_token_id)
        used = max(int((seg != PAD_DOC_ID).sum()) for _, _, seg in rows)
        width = min(self.max_length, _round_up(used, self.pad_to_multiple_of))
        labels = np.full((len(rows), self.max_length), IGNORE_INDEX, dtype=np.int64)
        for r, (_, _, seg) in enumerate(rows):
            # pack_texts numbers each piece by its example index and keeps pieces contiguous,
            # in increasing order along the row: the labels follow the same order.
            members = [int(d) for d in np.unique(seg) if d != PAD_DOC_ID]
            lab = np.concatenate([examples[d][2] for d in members]) if members else np.zeros(0, np.int64)
            labels[r, : lab.shape[0]] = lab
        ids = np.stack([r[0] for r in rows])[:, :width]
        roles = np.stack([r[1] for r in rows]).astype(np.int64)[:, :width]
        doc = np.stack([r[2] for r in rows])[:, :width]
        return self._tensors(ids, labels[:, :width], doc, roles)

    @staticmethod
    def _tensors(ids, labels, doc, roles) -> dict[str, torch.Tensor]:
        doc_t = torch.from_numpy(np.ascontiguousarray(doc))
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(ids)),
            "labels": torch.from_numpy(np.ascontiguousarray(labels)),
            "position_ids": position_ids_from_doc_ids(doc_t),
            "doc_ids": doc_t,
            "roles": torch.from_numpy(np.ascontiguousarray(roles, dtype=np.int64)),
        }

    def _contrastive(self, texts: list[np.ndarray]) -> dict[str, torch.Tensor]:
        k = len(self.config.special_token_ids)
        template = self.embed_template
        if self.max_length is not None:
            texts = [t[: template.text_budget(self.max_length - k)] for t in texts]
        positives = [prefix_dropout(t, self.config.prefix_dropout, self._rng(i, DROPOUT_STREAM)) for i, t in enumerate(texts)]
        items = [build_layout(template.wrap(t), "embed", self.config.special_token_ids) for t in texts + positives]
        seq = self.max_length or max(x[0].shape[0] for x in items)
        rows = pack_texts(items, seq, pad_id=self.pad_token_id)
        used = max(int((seg != PAD_DOC_ID).sum()) for _, _, seg in rows)
        width = _round_up(used, self.pad_to_multiple_of)
        rows = [(i[:width], r[:width], s[:width]) for i, r, s in rows] if width <= seq else rows
        cl = collate_rows(rows, renumber=False)
        out = {CL_PREFIX + key: cl[key] for key in ("input_ids", "position_ids", "doc_ids", "roles")}
        out[CL_PREFIX + "num_texts"] = torch.tensor(len(texts))
        return out
