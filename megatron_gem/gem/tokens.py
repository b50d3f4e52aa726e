"""Adding the K GEM special tokens to an HF tokenizer and model (docs/method.md, "Roles and layouts").

New input-embedding rows (and LM-head rows when the head is untied) start as the mean of the
model's existing rows: random or reused "reserved" rows (near zero in Llama-3) make the first
steps unstable. Works on any model with get_input_embeddings / get_output_embeddings /
resize_token_embeddings (HF PreTrainedModel). Under ZeRO-3 pass ``gather`` (a context-manager
factory such as ``lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)``)
so the partitioned rows are gathered, edited on rank 0 and re-partitioned.

``pad_vocab_rows`` pads the rows to a multiple of 64 for training (full mode adds K rows to a
vocabulary that usually is such a multiple: Llama-3's 128,256 + 1 = 128,257 rows make slow
LM-head GEMMs). Padding rows are zero, no tokenizer id reaches them, the losses and the logits
mask them, and exports drop them again (hf/export.py): no checkpoint on disk holds them.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Iterable

import torch

from .config import GEMConfig

GatherFn = Callable[[list[torch.nn.Parameter]], ContextManager]
# LM-head / embedding rows are padded to a multiple of this while training (GEMM tile friendly).
VOCAB_ROW_MULTIPLE = 64


def _no_gather(params: Iterable[torch.nn.Parameter]) -> ContextManager:
    return contextlib.nullcontext()


def find_gem_tokens(tokenizer, config: GEMConfig) -> list[int] | None:
    """Ids of the config's special tokens if the tokenizer already has all of them as special
    tokens (a GEM checkpoint); None if it has none of them. Refuses anything in between, and
    any name that is an ordinary token with another meaning."""
    names = config.special_tokens
    vocab = tokenizer.get_vocab()
    specials = set(tokenizer.all_special_tokens)
    ordinary = [n for n in names if n in vocab and n not in specials]
    if ordinary:
        raise ValueError(
            f"GEM token name(s) {ordinary} already exist in the tokenizer as ordinary token(s) with another "
            f"meaning (ids {[vocab[n] for n in ordinary]}); choose another GEMConfig.special_token_template"
        )
    present = [n for n in names if n in specials]
    if not present:
        return None
    if len(present) != len(names):
        missing = [n for n in names if n not in specials]
        raise ValueError(
            f"the tokenizer has GEM tokens {present} but not {missing}: it was extended for a different "
            f"num_special_tokens; use the checkpoint's gem_config.json or start from the base model"
        )
    return [vocab[n] for n in names]


def mean_row(weight: torch.Tensor, num_old_rows: int) -> torch.Tensor:
    """The initial value of a new GEM token's row: the mean of rows [0, num_old_rows), computed
    in fp32, in the weight's dtype. (Also used by the streaming checkpoint tool.)"""
    return weight[:num_old_rows].float().mean(dim=0).to(weight.dtype)


@torch.no_grad()
def init_rows_to_mean(model, token_ids: list[int], num_old_rows: int, *, gather: GatherFn | None = None) -> None:
    """Set the embedding (and untied LM-head) rows ``token_ids`` to the mean of rows [0, num_old_rows)."""
    gather = gather or _no_gather
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:  # untied head
        matrices.append(head.weight)
    idx = torch.as_tensor(token_ids, dtype=torch.long)
    for weight in matrices:
        with gather([weight]):
            if weight.numel() == 0:  # a ZeRO-3 rank that does not hold the gathered copy
                continue
            weight[idx.to(weight.device)] = mean_row(weight, num_old_rows)


def _add_to_tokenizer(tokenizer, config: GEMConfig) -> list[int]:
    tokenizer.add_special_tokens({"additional_special_tokens": config.special_tokens}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(config.special_tokens)


def tokenizer_with_gem_tokens(tokenizer, config: GEMConfig):
    """``tokenizer`` as the engines leave it once the model is built: a copy with the K GEM tokens
    added the way add_gem_tokens adds them (full mode on a tokenizer without them), else
    ``tokenizer`` itself. train.py reads its data with it before the model loads."""
    if config.summary_mode or find_gem_tokens(tokenizer, config) is not None:
        return tokenizer
    extended = copy.deepcopy(tokenizer)
    _add_to_tokenizer(extended, config)
    return extended


def add_gem_tokens(model, tokenizer, config: GEMConfig, *, gather: GatherFn | None = None) -> list[int]:
    """Add the K GEM tokens to ``tokenizer`` and ``model`` (resize + mean-row init).

    Idempotent: a tokenizer that already carries the tokens (a GEM checkpoint) is left as is.
    Records the ids in ``config.special_token_ids`` and returns them.
    """
    ids = find_gem_tokens(tokenizer, config)
    weight = model.get_input_embeddings().weight
    num_rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3 partitions are empty; ds_shape is real
    if ids is None:
        ids = _add_to_tokenizer(tokenizer, config)
        # A model whose vocabulary is padded beyond the tokenizer keeps its size when the new ids
        # fit; the reused rows are re-initialised like new ones.
        if len(tokenizer) > num_rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        init_rows_to_mean(model, ids, num_rows, gather=gather)
    elif max(ids) >= num_rows:
        raise ValueError(
            f"tokenizer has GEM token id {max(ids)} but the model has only {num_rows} embedding rows: the model and tokenizer come from different checkpoints"
        )
    config.special_token_ids = list(ids)
    return list(ids)


def embedding_rows(model) -> int:
    """Rows of ``model``'s input embedding (ZeRO-3 partitions are empty; ds_shape is real)."""
    weight = model.get_input_embeddings().weight
    return getattr(weight, "ds_shape", weight.shape)[0]


@torch.no_grad()
def pad_vocab_rows(model, multiple: int = VOCAB_ROW_MULTIPLE, *, gather: GatherFn | None = None) -> int:
    """Pad ``model``'s input embedding and LM head (one matrix when tied) with zero rows to a
    multiple of ``multiple``; returns the row count before, i.e. the real vocabulary (ids at
    and beyond it are padding). A no-op when the rows already are such a multiple.

    HF's ``resize_token_embeddings(pad_to_multiple_of=)`` does the resize (ZeRO-3 included) but
    initialises the padding like new tokens (normal(0, initializer_range) without mean resizing,
    samples around the mean row with it), which would give the padding real logits; they are
    set to zero here, and GEMModel(vocab_size=) masks them in every softmax and logits output."""
    rows = embedding_rows(model)
    if rows % multiple == 0:
        return rows
    model.resize_token_embeddings(rows, pad_to_multiple_of=multiple, mean_resizing=False)
    gather = gather or _no_gather
    matrices = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings()
    if head is not None and head.weight is not matrices[0]:  # untied head
        matrices.append(head.weight)
    for weight in matrices:
        with gather([weight]):
            if weight.numel() == 0:  # a ZeRO-3 rank that does not hold the gathered copy
                continue
            weight[rows:] = 0
    return rows


def _unused_special_tokens(tokenizer) -> list[str]:
    """Added/special tokens that ordinary text and the chat template never produce: the
    ``reserved``/``control`` ones first (Llama-3, Mistral), then any other added token that is
    not BOS/EOS/PAD/UNK and not named in the chat template."""
    roles = {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, tokenizer.unk_token}
    template = getattr(tokenizer, "chat_template", None) or ""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    names = [str(getattr(t, "content", t)) for _, t in sorted(added.items())]
    free = [n for n in names if n not in roles and n not in template and not n.strip() == ""]
    preferred = [n for n in free if "reserved" in n.lower() or "control" in n.lower()]
    return preferred + [n for n in free if n not in preferred]


def summary_token_ids(tokenizer, config: GEMConfig) -> list[int]:
    """Summary mode: the ids of K EXISTING vocabulary tokens that serve as the summary tokens
    (their embedding rows stay frozen; the tokenizer is not changed). ``config.summary_tokens``
    names them; empty picks K unused special tokens (see _unused_special_tokens). Records the
    names and ids in ``config``."""
    k = config.num_special_tokens
    names = list(config.summary_tokens) or _unused_special_tokens(tokenizer)[:k]
    if len(names) < k:
        raise ValueError(
            f"summary mode needs {k} existing unused token(s) of the tokenizer to serve as summary tokens and found "
            f"{len(names)} ({names}); name them with --gem-summary-tokens (GEMConfig.summary_tokens)"
        )
    vocab = tokenizer.get_vocab()
    missing = [n for n in names if n not in vocab]
    if missing:
        raise ValueError(f"--gem-summary-tokens {missing}: not in the tokenizer's vocabulary (summary mode adds no tokens)")
    config.summary_tokens = list(names)
    config.special_token_ids = [vocab[n] for n in names]
    return list(config.special_token_ids)
