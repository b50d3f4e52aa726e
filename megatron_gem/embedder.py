"""GEMEmbedder: text embeddings from a GEM checkpoint (docs/method.md).

Each text is laid out as ``text SPECIAL*K`` (the `embed` layout), run through the model
under the GEM mask, and its embedding is the mean of the K special tokens' last-layer states,
L2-normalised. Padding is its own document with positions restarting at each text, so
neither the padding side nor the other texts in a batch change a text's embedding.

Lives outside gem/ because it drives an HF model through the attention adapter.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention.hf import use_gem_attention
from .common.manifest import MANIFEST
from .common.manifest import verify as verify_manifest
from .gem.config import GEMConfig
from .gem.layout import build_layout, position_ids_from_doc_ids
from .gem.readout import pool_special_states
from .gem.roles import PAD_DOC_ID, Role
from .gem.tokens import find_gem_tokens


class GEMEmbedder:
    def __init__(self, model, tokenizer, config: GEMConfig, *, backend: str = "auto", max_length: int = 512):
        ids = config.special_token_ids or find_gem_tokens(tokenizer, config)
        if not ids:
            raise ValueError(
                f"the tokenizer has no GEM tokens {config.special_tokens}: train or extend the model with megatron_gem (tools/add_gem_tokens.py) first"
            )
        if max_length <= len(ids):
            raise ValueError(f"max_length={max_length} leaves no room for text before {len(ids)} special tokens")
        self.model = use_gem_attention(model, backend=backend, suffix_sees_bos=config.suffix_sees_bos)
        self.model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.special_ids = list(ids)
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Named prompts as in sentence-transformers: "query" is what training prepended to anchors.
        self.prompts = {"query": config.query_prompt} if config.query_prompt else {}

    @classmethod
    def from_pretrained(
        cls,
        path_or_model,
        tokenizer=None,
        *,
        config: GEMConfig | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        max_length: int = 512,
        verify: bool = True,
    ) -> "GEMEmbedder":
        """From a checkpoint directory (model, tokenizer and gem_config.json), or from a live
        model and its tokenizer; for a live model ``config`` defaults to GEMConfig() and the
        special-token ids are looked up in the tokenizer by name. A directory with a
        manifest.json (train.py's exports) is verified first (``verify``): a missing, truncated
        or changed file raises CheckpointError naming it."""
        if isinstance(path_or_model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(path_or_model)
            if verify and os.path.isfile(os.path.join(path, MANIFEST)):
                verify_manifest(path)
            config = config or GEMConfig.load(path)
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        else:
            model = path_or_model
            if tokenizer is None:
                raise ValueError("GEMEmbedder.from_pretrained(model, tokenizer): a live model needs its tokenizer")
            config = config or GEMConfig()
        if device is not None:
            model = model.to(device)
        return cls(model, tokenizer, config, backend=backend, max_length=max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _batch(self, token_lists: Sequence[Sequence[int]], padding_side: str) -> dict[str, torch.Tensor]:
        rows = [build_layout(t, "embed", self.special_ids) for t in token_lists]
        width = max(ids.shape[0] for ids, _ in rows)
        B = len(rows)
        input_ids = np.full((B, width), self.pad_id, dtype=np.int64)
        roles = np.full((B, width), int(Role.PREFIX), dtype=np.int64)
        doc_ids = np.full((B, width), PAD_DOC_ID, dtype=np.int64)
        for i, (ids, r) in enumerate(rows):
            n = ids.shape[0]
            span = slice(0, n) if padding_side == "right" else slice(width - n, width)
            input_ids[i, span], roles[i, span], doc_ids[i, span] = ids, r, i
        batch = {k: torch.from_numpy(v).to(self.device) for k, v in (("input_ids", input_ids), ("roles", roles), ("doc_ids", doc_ids))}
        batch["position_ids"] = position_ids_from_doc_ids(batch["doc_ids"])
        return batch

    @torch.inference_mode()
    def encode(
        self,
        texts: Sequence[str],
        *,
        batch_size: int = 32,
        normalize: bool = True,
        convert_to_numpy: bool = False,
        show_progress_bar: bool = False,
        padding_side: str = "right",
        prompt_name: str | None = None,
        prompt: str | None = None,
    ):
        """Embed ``texts``: float32 [n, hidden] tensor (numpy array with convert_to_numpy).

        ``prompt`` (a string) or ``prompt_name`` (a key of ``self.prompts``, e.g. ``"query"``) is
        prepended to every text before tokenisation, as sentence-transformers does."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of texts, not a single string")
        if prompt is not None and prompt_name is not None:
            raise ValueError("give prompt or prompt_name, not both")
        if prompt_name is not None:
            if prompt_name not in self.prompts:
                raise ValueError(f"prompt_name={prompt_name!r}: this model has prompts {sorted(self.prompts)} (gem_config.json query_prompt)")
            prompt = self.prompts[prompt_name]
        if prompt:
            texts = [prompt + t for t in texts]
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        keep = self.max_length - len(self.special_ids)
        tokens = [self.tokenizer(t, add_special_tokens=True)["input_ids"][:keep] for t in texts]
        for i, t in enumerate(tokens):
            if not t:
                raise ValueError(f"text {i} tokenises to nothing; cannot embed an empty text")
        # Longest first: fewer pad tokens per batch; the order is restored below.
        order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
        out = torch.empty(len(tokens), self.model.config.hidden_size, dtype=torch.float32)
        starts = range(0, len(order), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="GEM encode", unit="batch")
        base = self.model.base_model
        for s in starts:
            idx = order[s : s + batch_size]
            batch = self._batch([tokens[i] for i in idx], padding_side)
            hidden = base(**batch, use_cache=False).last_hidden_state.float()
            emb = pool_special_states(hidden, batch["roles"], batch["doc_ids"], len(idx))
            if normalize:
                emb = F.normalize(emb, dim=-1)
            out[torch.tensor(idx)] = emb.cpu()
        return out.numpy() if convert_to_numpy else out

    def encode_queries(self, texts: Sequence[str], **kwargs):
        """Embed queries: with the query prompt the model was trained with (``--contrastive-query-prompt``),
        if any; documents go through plain ``encode``."""
        return self.encode(texts, prompt_name="query" if "query" in self.prompts else None, **kwargs)
