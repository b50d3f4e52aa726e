"""The fake-tensor measurements' phase-2 inputs, shared by the DeepSpeed measurement
(training/contrastive_memory.py) and megatron-core's (training/mcore_activation_memory.py): a
micro-batch's shape (ContrastiveShape), its batches as the data set makes them (contrastive_batch,
ntp_batch, summary_documents), and the tracker that runs the batch's metadata for real
(RealMetadataTracker; contrastive_memory.py's docstring says why and how).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils._pytree import tree_flatten

from .activation_memory import StorageTracker

_INDEX_OPS = ("aten::index.Tensor", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_")


@dataclass(frozen=True)
class ContrastiveShape:
    """A phase-2 micro-batch per rank, by train.py's flags."""

    batch_size: int  # --contrastive-batch-size: anchors per micro-batch (each with its positive)
    max_length: int = 512  # --contrastive-max-length (capped by --seq-length), special tokens included
    chunk: int | None = None  # --contrastive-micro-batch-size: GradCache chunk of anchors (None: none)
    negatives: int = 0  # hard negatives per anchor (--contrastive-negative-field)
    alpha: float = 1.0  # --gem-alpha: < 1 adds (1 - alpha) NTP on a packed micro-batch of rows
    teacher_dim: int = 0  # --contrastive-teacher: its embedding width (0: no teacher)
    teacher_params: int = 0  # the teacher's parameters: fp32 on the device for the whole run

    def describe(self) -> str:
        s = f"{self.batch_size} pairs x {self.max_length}"
        s += f", GradCache chunks of {self.chunk}" if self.chunk else ""
        s += f", {self.negatives} negatives each" if self.negatives else ""
        s += f", alpha {self.alpha:g}" if self.alpha < 1 else ""
        s += f", teacher {self.teacher_params / 1e6:.0f}M" if self.teacher_params else ""
        return s


def _bool_to_index(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.nonzero().unbind(1))


class RealMetadataTracker(StorageTracker):
    """StorageTracker for a step that reads its batch: see the module docstring."""

    def run(self, func, args, kwargs):
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        fake = [a for a in tensors if isinstance(a, FakeTensor)]
        if func is torch.ops.aten._local_scalar_dense.default and fake:
            return False if fake[0].dtype == torch.bool else 0 if not fake[0].is_floating_point() else 0.0
        if tensors and not fake:  # metadata: computed for real, outside every mode
            with _disable_current_modes():
                return func(*args, **kwargs)
        if not tensors:  # a factory: integer and boolean ones make metadata (positions, masks), real too
            out = func(*args, **kwargs)
            if isinstance(out, FakeTensor) and not out.is_floating_point() and not out.is_complex():
                with _disable_current_modes():
                    return func(*args, **kwargs)
            return out
        if func.name() in _INDEX_OPS and len(args) > 1 and isinstance(args[1], (list, tuple)):
            indices = []
            for i in args[1]:
                if isinstance(i, torch.Tensor) and not isinstance(i, FakeTensor) and i.dtype == torch.bool:
                    with _disable_current_modes():
                        indices += _bool_to_index(i)
                else:
                    indices.append(i)
            args = (args[0], indices, *args[2:])
        return func(*args, **kwargs)


class _MaxLengthTexts:
    """A corpus of ``n`` texts each longer than any budget (so every text is cut to the longest
    a contrastive view may be: the worst case of the flags)."""

    def __init__(self, n: int, length: int, token: int):
        self.lengths = np.full(n, length, dtype=np.int64)
        self._text = np.full(length, token, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def get(self, d: int) -> np.ndarray:
        return self._text


class _Negatives:
    """``per`` hard negatives per pair, each a longest text (data.corpus.NegativeTexts' interface
    as ContrastiveDataset reads it)."""

    def __init__(self, n: int, per: int, length: int, token: int):
        self.corpus = _MaxLengthTexts(n * per, length, token)
        self.offsets = np.arange(n + 1, dtype=np.int64) * per
        self._texts = [self.corpus.get(0)] * per

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    def get(self, d: int) -> list:
        return self._texts


def gem_config_for(train_mode: str, *, alpha: float = 1.0, teacher: bool = False):
    """A GEMConfig of the run's shape (one special token, id 1; summary mode's deltas at rank 16)."""
    from ..gem.config import GEMConfig

    return GEMConfig(special_token_ids=[1], train_mode=train_mode, alpha=alpha, **({"teacher_weight": 1.0} if teacher else {}))


def contrastive_batch(shape: ContrastiveShape, *, seq_length: int, train_mode: str = "full", num_rows: int | None = None) -> dict:
    """One contrastive micro-batch (with its GradCache chunks when ``shape.chunk``) as the data set
    collates it, every text at its longest. ``num_rows``: the data set's fixed row count (what
    the megatron-core engine sets under pipeline parallelism; None: as many as the texts fill)."""
    from ..data.datasets import ContrastiveDataset

    n = shape.batch_size
    length = 2 * seq_length + 8  # longer than any budget: every view is cut to max_length
    texts = _MaxLengthTexts(n, length, token=7)
    negatives = _Negatives(n, shape.negatives, length, token=7) if shape.negatives else None
    ds = ContrastiveDataset(
        texts,
        gem_config_for(train_mode),
        positives=_MaxLengthTexts(n, length, token=9),
        negatives=negatives,
        max_text_len=min(seq_length, shape.max_length),
        seq_length=seq_length,
        shuffle=False,
        num_epochs=1,
        chunk_size=shape.chunk,
        num_rows=num_rows,
    )
    batch = ds.collate([ds[i] for i in range(n)])
    if shape.teacher_dim:  # the teacher's rows (distill/teacher_rows.py), per chunk
        for part in batch.get("chunks", [batch]):
            docs = 2 * int(part["num_texts"]) + int(part["num_negatives"])
            part["teacher"] = torch.nn.functional.normalize(torch.ones(docs, shape.teacher_dim), dim=-1)
    return batch


def ntp_batch(micro_batch_size: int, seq_length: int, *, summary: bool = False) -> dict:
    """A packed NTP micro-batch, every token a target: one document per row, or in summary mode
    (``summary``) the GEM layout the deltas act on (summary_documents: a summary token in every
    document; with none, nothing would train through these rows and their backward would not
    run)."""
    shape = (micro_batch_size, seq_length)
    ids = torch.full(shape, 7, dtype=torch.long)
    if summary:
        doc_ids, roles, positions = summary_documents(micro_batch_size, seq_length)
    else:
        doc_ids = torch.arange(micro_batch_size)[:, None].expand(shape).contiguous()
        roles, positions = torch.zeros(shape, dtype=torch.long), torch.arange(seq_length).expand(shape).contiguous()
    return {"input_ids": ids, "labels": ids.clone(), "position_ids": positions, "doc_ids": doc_ids, "roles": roles}


SUMMARY_DOC_LEN, SUMMARY_AT = 128, 96  # summary mode's measured NTP rows (summary_documents)


def summary_documents(micro_batch_size: int, seq_length: int):
    """(doc_ids, roles, position_ids) [micro_batch_size, seq_length] of packed documents of
    SUMMARY_DOC_LEN tokens: PREFIX up to the summary token at SUMMARY_AT (its last one if
    shorter), SUFFIX after. Where the deltas act (a few rows per document) hardly moves the
    peak; that they act somewhere in every document does (the backward runs through them)."""
    from ..gem.roles import Role

    pos = (torch.arange(seq_length) % SUMMARY_DOC_LEN).expand(micro_batch_size, seq_length).contiguous()
    doc = (torch.arange(seq_length) // SUMMARY_DOC_LEN).expand(micro_batch_size, seq_length).contiguous()
    length = torch.bincount(doc[0])[doc]  # each token's document length (the last one may be short)
    at = torch.clamp(length - 1, max=SUMMARY_AT)
    roles = torch.where(pos < at, int(Role.PREFIX), torch.where(pos == at, int(Role.SPECIAL), int(Role.SUFFIX)))
    return doc, roles.contiguous(), pos
