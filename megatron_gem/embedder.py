"""GEMEmbedder: text embeddings from a GEM checkpoint (docs/method.md).

Each text is laid out as ``text SPECIAL*K`` (the `embed` layout; with GEMConfig.embed_template,
``[BOS] prefix text suffix SPECIAL*K``, the wrapping training used, gem/template.py), run through the model
under the GEM mask, and its embedding is the mean of the K special tokens' last-layer states,
L2-normalised. Padding is its own document with positions restarting at each text, so
neither the padding side nor the other texts in a batch change a text's embedding.

Summary mode (GEMConfig.train_mode "summary"): the model is the untouched base model with a
SummaryAdapter's deltas hooked onto its linear layers (hf/summary.py); they act at the summary
tokens only, so the same readout applies. ``from_pretrained(adapter_folder)`` loads the base
named in gem_config.json (digest checked) and the folder's deltas.

``embed_from_cache`` reads the embedding of a text whose prefill is already in a KV cache (from
``generate`` or a ``use_cache=True`` forward): K summary steps that read the cache.

Lives outside gem/ because it drives an HF model through the attention adapter.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .attention.hf import use_gem_attention
from .common.errors import ModelLoadError
from .common.manifest import MANIFEST
from .common.manifest import verify as verify_manifest
from .common.model_paths import check_model_source, loading
from .gem.config import CONFIG_NAME, GEMConfig
from .gem.layout import build_layout, position_ids_from_doc_ids
from .gem.readout import pool_special_states
from .gem.roles import PAD_DOC_ID, Role
from .gem.template import EmbedTemplate
from .gem.tokens import find_gem_tokens, summary_token_ids
from .hf.summary import cache_kwargs
from .hf.summary_files import is_summary_adapter_dir, load_summary_model, refuse_peft_layers

# The doc id that cached keys hidden from the summary queries get (padding): one no query has.
_HIDDEN_DOC = -2


class GEMEmbedder:
    def __init__(self, model, tokenizer, config: GEMConfig, *, backend: str = "auto", max_length: int = 512, adapter=None):
        refuse_peft_layers(model)
        if config.summary_mode:
            if adapter is None or not getattr(adapter, "hook_handles", None):
                raise ValueError(
                    "GEMConfig.train_mode='summary': pass adapter= (the SummaryAdapter that hf.summary.attach_summary_adapter hooked onto the model), "
                    "or load an adapter folder with GEMEmbedder.from_pretrained(folder)"
                )
            ids = config.special_token_ids or summary_token_ids(tokenizer, config)
        else:
            if adapter is not None:
                raise ValueError("adapter= is for GEMConfig.train_mode='summary'")
            ids = config.special_token_ids or find_gem_tokens(tokenizer, config)
        if not ids:
            raise ValueError(
                f"the tokenizer has no GEM tokens {config.special_tokens}: train or extend the model with megatron_gem (tools/add_gem_tokens.py) first"
            )
        if max_length <= len(ids):
            raise ValueError(f"max_length={max_length} leaves no room for text before {len(ids)} special tokens")
        # The wrapping phase 2 trained with (gem_config.json embed_template); "" = the bare text.
        self.template = EmbedTemplate.from_tokenizer(config.embed_template, tokenizer)
        self.template.text_budget(max_length - len(ids))  # raises when the template leaves no room
        self.model = use_gem_attention(model, backend=backend, suffix_sees_bos=config.suffix_sees_bos)
        self.model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.adapter = adapter
        self.base_path = None  # summary mode, loaded from a folder: the base checkpoint directory
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
        adapter=None,
        base: str | os.PathLike | None = None,
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
        or changed file raises CheckpointError naming it.

        A summary-mode adapter folder (hf/summary_files.py) loads its base checkpoint: ``base``
        (a directory) when given, else the folder's ``base/``, else gem_config.json base_model;
        a base whose weight digest is not gem_config's base_model_digest is refused (ModelLoadError
        naming both), as is a folder failing the aLoRA guard (read_summary_adapter). Its own
        gem_config.json and tokenizer are used. A live summary-mode model needs ``adapter`` (the
        SummaryAdapter attach_summary_adapter hooked onto it)."""
        if isinstance(path_or_model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = str(path_or_model)
            # A local folder stays local (never a hub download for a mistyped path), and a folder
            # that is not a model says what it lacks, before anything loads.
            if not is_summary_adapter_dir(path):  # an adapter folder has its own guard (read_summary_adapter)
                expect = "a GEM checkpoint directory with gem_config.json, config.json, tokenizer and weights"
                check_model_source("GEMEmbedder.from_pretrained:", path, config=True, tokenizer=tokenizer is None, expect=expect)
            if base is not None:
                check_model_source("base=", os.fspath(base), config=True, weights=True)
            if verify and os.path.isfile(os.path.join(path, MANIFEST)):
                verify_manifest(path)
            if is_summary_adapter_dir(path):
                if config is not None or tokenizer is not None or adapter is not None:
                    raise ValueError(f"{path} is a summary-mode adapter folder: its own gem_config.json, tokenizer and adapter are used (pass none of them)")
                model, tokenizer, config, adapter, base_path = load_summary_model(path, base=base, dtype=dtype, device=device)
                embedder = cls(model, tokenizer, config, backend=backend, max_length=max_length, adapter=adapter)
                embedder.base_path = base_path
                return embedder
            if base is not None:
                raise ValueError(f"base={base!r}: {path} is not a summary-mode adapter folder (base= is only for those)")
            if config is None:
                if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, CONFIG_NAME)):
                    raise ModelLoadError(f"{path}: no {CONFIG_NAME}; not a GEM checkpoint (train.py's SAVE/hf, or tools/add_gem_tokens.py's output)")
                config = GEMConfig.load(path)
            with loading(path, path):
                tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
        else:
            model = path_or_model
            if tokenizer is None:
                raise ValueError("GEMEmbedder.from_pretrained(model, tokenizer): a live model needs its tokenizer")
            config = config or GEMConfig()
        if device is not None:
            model = model.to(device)
            if adapter is not None:
                adapter.to(device)
        return cls(model, tokenizer, config, backend=backend, max_length=max_length, adapter=adapter)

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
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"encode(): text {i} is {type(t).__name__} ({t!r:.40}), not a str")
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
        tokens = self.text_tokens(texts)
        out = self.encode_token_ids(tokens, batch_size=batch_size, normalize=normalize, show_progress_bar=show_progress_bar, padding_side=padding_side)
        return out.numpy() if convert_to_numpy else out

    def text_tokens(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """The tokens ``encode`` embeds for each text before its K summary tokens: the text
        tokenised (BOS included), truncated to fit ``max_length`` (default ``self.max_length``)
        with the summary tokens, wrapped in the embed template (the template is never cut).
        Training's views are built by the same EmbedTemplate."""
        keep = (max_length or self.max_length) - len(self.special_ids)
        return [self.template.fit(self.tokenizer(t, add_special_tokens=True)["input_ids"], keep)[0].tolist() for t in texts]

    @torch.inference_mode()
    def encode_token_ids(
        self,
        tokens: Sequence[Sequence[int]],
        *,
        batch_size: int = 32,
        normalize: bool = True,
        show_progress_bar: bool = False,
        padding_side: str = "right",
    ) -> torch.Tensor:
        """Embed already tokenised texts (each as ``tokenizer(text)["input_ids"]``, BOS included;
        not truncated and not wrapped in the embed template here: ``text_tokens`` does both):
        float32 [n, hidden]."""
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        rows = self.model.get_input_embeddings().num_embeddings
        for i, t in enumerate(tokens):
            if isinstance(t, (str, bytes)) or not hasattr(t, "__len__"):
                raise TypeError(f"encode_token_ids(): text {i} is {type(t).__name__}, not a sequence of token ids")
            if not len(t):
                raise ValueError(f"text {i} tokenises to nothing; cannot embed an empty text")
            ids = np.asarray(t)
            if ids.dtype.kind not in "iu" or ids.ndim != 1:
                raise TypeError(f"encode_token_ids(): text {i} holds {ids.dtype} values of shape {ids.shape}, not one list of integer token ids")
            if ids.min() < 0 or ids.max() >= rows:
                raise ValueError(
                    f"encode_token_ids(): text {i} has token id {int(ids.max() if ids.max() >= rows else ids.min())} outside the vocabulary (0..{rows - 1})"
                )
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
        return out

    def encode_queries(self, texts: Sequence[str], **kwargs):
        """Embed queries: with the query prompt the model was trained with (``--contrastive-query-prompt``),
        if any; documents go through plain ``encode``."""
        return self.encode(texts, prompt_name="query" if "query" in self.prompts else None, **kwargs)

    @torch.inference_mode()
    def embed_from_cache(self, cache, attention_mask: torch.Tensor | None = None, *, normalize: bool = True) -> torch.Tensor:
        """Embeddings [B, hidden] (float32, on the model's device) of the texts whose prefill is
        in ``cache`` (a transformers Cache: the ``past_key_values`` / ``cache`` that
        ``generate(..., return_dict_in_generate=True)`` or ``model(input_ids, use_cache=True)``
        returns), without recomputing the text.

        Runs K summary steps at once: the summary tokens at positions m..m+K-1 (m = the row's
        number of real cached tokens), each attending the whole cached text and itself, not the
        other summary tokens (the GEM rule, gem/mask.py ``gem_mask_for_queries``). Equals
        ``encode_token_ids`` of the cached tokens when the cache is the text part of the embed
        layout: true for a full-mode GEM model's causal prefill, and in summary mode for the base
        model's (the deltas act only at summary tokens). ``attention_mask`` [B, n] (1 = real
        token) marks padding in the cache, left or right, whose real tokens must sit at positions
        0..m-1 (``generate`` does this for left padding). The cache may hold generated tokens
        too: what is cached is what is embedded (no max_length truncation, and no embed template:
        a model trained with one needs it in the cached text, ``text_tokens`` gives the tokens).

        The caller's cache is not modified: it is read through a shallow view (the step's new
        keys go to new tensors). Only DynamicCache (generate's default) is supported."""
        view = _cache_view(cache)
        n = view.get_seq_length()
        if n == 0:
            raise ValueError("embed_from_cache: the cache is empty")
        batch = view.layers[0].keys.shape[0]
        device = self.device
        if attention_mask is None:
            real = torch.ones(batch, n, dtype=torch.bool, device=device)
        else:
            real = attention_mask.to(device).bool()
            if tuple(real.shape) != (batch, n):
                raise ValueError(f"attention_mask has shape {tuple(real.shape)}, the cache holds {batch} rows of {n} tokens")
            if not real.any(dim=-1).all():
                raise ValueError("attention_mask: a row has no real token; cannot embed an empty text")
        k = len(self.special_ids)
        arange_k = torch.arange(k, device=device)
        ids = torch.tensor(self.special_ids, device=device).expand(batch, k)
        roles = torch.full((batch, k), int(Role.SPECIAL), device=device)
        docs = torch.zeros(batch, k, dtype=torch.long, device=device)
        positions = real.sum(-1, keepdim=True) + arange_k
        # Keys: the n cached tokens (text; padding hidden by a doc id no query has), then the K new
        # ones. Every token's index is its position in the row encode lays out (text at 0..m-1, the
        # summary tokens at m..m+K-1), not its slot in the padded cache: a sliding window (rule 5)
        # is measured between these indices, so a padded row must not count its padding.
        k_index = torch.cat([(real.long().cumsum(-1) - 1).clamp(min=0), positions], dim=-1)
        k_doc = torch.cat([torch.where(real, 0, _HIDDEN_DOC), docs], dim=-1)
        k_role = torch.cat([torch.full((batch, n), int(Role.PREFIX), device=device), roles], dim=-1)
        # The model's "gem" attention reads a cache under the rule when given the keys' metadata
        # (attention/hf.py -> attention/cached.py, the summary step of summary mode's training too).
        keys = {"gem_key_doc_ids": k_doc, "gem_key_roles": k_role, "gem_key_index": k_index, "gem_query_index": positions}
        hidden = self.model.base_model(
            input_ids=ids, position_ids=positions, **cache_kwargs(self.model, view), roles=roles, doc_ids=docs, **keys
        ).last_hidden_state.float()
        emb = hidden.mean(dim=1)
        return F.normalize(emb, dim=-1) if normalize else emb


def _cache_view(cache):
    """A cache the summary step may extend without touching ``cache``: DynamicLayer.update binds
    torch.cat's new tensors to the layer, so shallow copies of the cache and its layers share
    the cached tensors and leave the original as it was. Other layer types (static, sliding,
    quantized) write in place or keep keys the mask does not describe: refused."""
    import copy

    from transformers.cache_utils import Cache, DynamicLayer

    if not isinstance(cache, Cache):
        raise TypeError(f"embed_from_cache needs a transformers DynamicCache, got {type(cache).__name__}")
    other = sorted({type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer})
    if other or not cache.layers:
        raise TypeError(
            f"embed_from_cache reads a DynamicCache of full-length layers (DynamicLayer); this cache has {other or 'no layers'}"
            " (a sliding-window model's generate() keeps only the last window: pass it DynamicCache(), without config, as its cache)"
        )
    view = copy.copy(cache)
    view.layers = [copy.copy(layer) for layer in cache.layers]
    return view
