"""The rows of one forward of the megatron-core GEM GPTModel (``GEMGPTModel.forward``): the
next-token rows first, then the contrastive texts' rows; used by the training engine and by the
Megatron-LM integration."""

from __future__ import annotations

import torch

from ..gem.roles import IGNORE_INDEX, PAD_DOC_ID

BATCH_KEYS = ("input_ids", "position_ids", "doc_ids", "roles")
_FILLS = {"input_ids": 0, "position_ids": 0, "doc_ids": PAD_DOC_ID, "roles": 0}


def join_rows(ntp: dict | None, contrastive: dict | None, device=None) -> dict:
    """``ntp`` (BATCH_KEYS + aligned ``labels``) and ``contrastive`` (BATCH_KEYS + ``num_texts``,
    optionally ``num_negatives`` and the teacher's rows ``teacher``) as one batch: rows
    concatenated (the narrower part padded at the end: PAD_DOC_ID, label ignored), plus
    ``ntp_rows``, ``num_texts``, ``num_negatives`` (and ``teacher``). Either part may be None, not both."""
    parts = [p for p in (ntp, contrastive) if p is not None]
    if not parts:
        raise ValueError("neither next-token rows nor contrastive rows given")
    width = max(p["input_ids"].shape[1] for p in parts)

    def widen(t: torch.Tensor, fill: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=fill) if t.shape[1] < width else t

    out = {k: torch.cat([widen(p[k], _FILLS[k]) for p in parts]) for k in BATCH_KEYS}
    out["labels"] = widen(ntp["labels"], IGNORE_INDEX) if ntp is not None else None
    out["ntp_rows"] = ntp["input_ids"].shape[0] if ntp is not None else 0
    out["num_texts"] = int(contrastive["num_texts"]) if contrastive is not None else 0
    out["num_negatives"] = int(contrastive.get("num_negatives", 0)) if contrastive is not None else 0
    if contrastive is not None and contrastive.get("teacher") is not None:
        out["teacher"] = contrastive["teacher"]  # the teacher's rows of the contrastive texts (distill/teacher_rows.py)
    if device is not None:
        out = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in out.items()}
    return out


def unwrap_model(model):
    """The GEM GPTModel inside megatron-core's DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
