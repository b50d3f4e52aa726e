"""Make a GEM checkpoint directory load as ``SentenceTransformer(path)`` (and hence in mteb).

:func:`save_sentence_transformer` adds the sentence-transformers files to an HF export (the
directory of ``export_hf`` / ``save_pretrained`` with ``gem_config.json``); the HF files are left
untouched, so the same directory still loads with ``AutoModelForCausalLM`` and
``GEMEmbedder.from_pretrained``, and ``generate()`` is unaffected. The vectors equal
:class:`~megatron_gem.GEMEmbedder`'s (``text SPECIAL*K``, mean of the K special states, L2-norm).

Two layouts of the files, chosen by ``mode``:

``"builtin"`` (K = 1, the paper's default): only sentence-transformers' own modules, so
  ``SentenceTransformer(path)`` needs neither megatron_gem nor ``trust_remote_code``:
  ``Transformer`` (the base model, causal attention) -> ``Pooling("lasttoken")`` -> ``Normalize``.
  The tokenizer is loaded with ``processor_kwargs`` (in ``sentence_bert_config.json``) that append
  the GEM token as its end-of-sequence token. Exact because for ``text SPECIAL`` with a single
  special token the GEM mask *is* the causal mask (no suffix, no second special token), right
  padding is masked, and truncation keeps room for the appended token. Only sentence-transformers'
  tokenizer sees those kwargs; ``tokenizer_config.json`` is not changed.
``"custom"`` (any K): one module, :class:`GEMSentenceEncoder`, that runs the GEM layout and mask
  itself. sentence-transformers >= 6 imports a module class outside its own namespace only with
  ``SentenceTransformer(path, trust_remote_code=True)``, and megatron_gem must be installed.
``"auto"``: builtin when K = 1 and the tokenizer check below passes, else custom.

A summary-mode adapter folder (hf/summary_files.py) is always ``"custom"``: the module loads the
base checkpoint and the folder's deltas through ``GEMEmbedder.from_pretrained`` (digest and aLoRA
guard checked); the builtin ``Transformer`` module would load the folder through transformers,
which attaches the adapter as an aLoRA nothing activates (the base model's vectors).

The builtin mode is verified at export: the tokenizer loaded with the saved kwargs must produce
exactly ``tokenizer(text) + [gem token]`` on probe texts, else ``"auto"`` falls back to custom
(``"builtin"`` raises).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..gem.config import GEMConfig
from ..gem.readout import pool_special_states
from ..hf.summary_files import is_summary_adapter_dir

MODES = ("auto", "builtin", "custom")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "gem_sentence_config.json")
_PROBES = ("A short text.", "Another, somewhat longer text with punctuation: 42!", "x")


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def _adds_bos(tokenizer) -> bool:
    ids = tokenizer("x")["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def builtin_processor_kwargs(tokenizer, config: GEMConfig) -> dict:
    """The tokenizer kwargs that make ``AutoTokenizer`` append the (single) GEM token."""
    return {"add_eos_token": True, "eos_token": config.special_tokens[0], "add_bos_token": _adds_bos(tokenizer)}


def _builtin_tokenizer_ok(path: str, tokenizer, config: GEMConfig) -> bool:
    from transformers import AutoTokenizer

    try:
        st_tok = AutoTokenizer.from_pretrained(path, **builtin_processor_kwargs(tokenizer, config))
    except Exception:  # any tokenizer class that refuses the kwargs: use the custom module
        return False
    ids = config.special_token_ids
    return all(st_tok(t)["input_ids"] == tokenizer(t)["input_ids"] + list(ids) for t in _PROBES)


def save_sentence_transformer(
    path: str | os.PathLike,
    *,
    mode: str = "auto",
    max_seq_length: int = 512,
    backend: str = "sdpa",
) -> str:
    """Add sentence-transformers files to the GEM checkpoint at ``path``; returns the mode used.

    ``max_seq_length``: token budget of a text *including* the K special tokens (as
    ``GEMEmbedder(max_length=...)``). ``backend``: attention backend of the custom module.
    """
    from transformers import AutoTokenizer

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    path = str(path)
    config = GEMConfig.load(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not config.special_token_ids:
        from ..gem.tokens import find_gem_tokens

        config.special_token_ids = find_gem_tokens(tokenizer, config) or []
    if not config.special_token_ids:
        raise ValueError(f"{path}: the tokenizer has no GEM tokens {config.special_tokens}")
    k = config.num_special_tokens
    if is_summary_adapter_dir(path):
        if mode == "builtin":
            raise ValueError(f"{path}: a summary-mode adapter folder needs mode='custom' (the builtin modules would load the base model without the deltas)")
        mode = "custom"
    if max_seq_length <= k:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text before {k} special tokens")
    if mode in ("auto", "builtin"):
        ok = k == 1 and _builtin_tokenizer_ok(path, tokenizer, config)
        if not ok and mode == "builtin":
            raise ValueError(
                f"{path}: builtin sentence-transformers modules need K=1 (got {k}) and a tokenizer that can append "
                f"the GEM token as end-of-sequence; use mode='custom'"
            )
        mode = "builtin" if ok else "custom"
    for name in ST_FILES:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    _write_json(
        os.path.join(path, "config_sentence_transformers.json"),
        {"model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    if mode == "builtin":
        os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
        os.makedirs(os.path.join(path, "2_Normalize"), exist_ok=True)
        _write_json(
            os.path.join(path, "modules.json"),
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
            ],
        )
        processor_kwargs = builtin_processor_kwargs(tokenizer, config)
        processor_kwargs["model_max_length"] = max_seq_length
        _write_json(
            os.path.join(path, "sentence_bert_config.json"),
            {"transformer_task": "feature-extraction", "processor_kwargs": processor_kwargs, "config_kwargs": {"use_cache": False}},
        )
        hidden = _hidden_size(path)
        _write_json(
            os.path.join(path, "1_Pooling", "config.json"),
            {"embedding_dimension": hidden, "pooling_mode": "lasttoken", "include_prompt": True},
        )
    else:
        _write_json(
            os.path.join(path, "modules.json"),
            [{"idx": 0, "name": "0", "path": "", "type": f"{__name__}.GEMSentenceEncoder"}],
        )
        _write_json(os.path.join(path, GEMSentenceEncoder.config_file_name), {"max_seq_length": max_seq_length, "backend": backend})
    return mode


def _hidden_size(path: str) -> int:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


def _input_module_base():
    from sentence_transformers.base.modules import InputModule

    return InputModule


class GEMSentenceEncoder(_input_module_base()):
    """sentence-transformers input module: GEM readout for any K (the ``"custom"`` mode).

    ``preprocess`` lays each text out as ``text SPECIAL*K`` (padding is its own document,
    positions restart per text); ``forward`` runs the model under the GEM mask and writes
    ``sentence_embedding`` (mean of the K special states, L2-normalised) and ``token_embeddings``.
    """

    config_file_name = "gem_sentence_config.json"
    config_keys = ["max_seq_length", "backend"]
    save_in_root = True

    def __init__(self, model_name_or_path: str, max_seq_length: int = 512, backend: str = "sdpa", **unused):
        super().__init__()
        from ..embedder import GEMEmbedder

        self.embedder = GEMEmbedder.from_pretrained(model_name_or_path, backend=backend, max_length=max_seq_length)
        self.auto_model = self.embedder.model  # a submodule, so .to(device) and .eval() reach it
        self.gem_adapter = self.embedder.adapter  # summary mode: the deltas (None otherwise), moved with the module too
        self.source_path = model_name_or_path
        self.tokenizer = self.embedder.tokenizer
        self.max_seq_length = max_seq_length
        self.backend = backend

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None, local_files_only: bool = False, **kwargs):
        config = cls.load_config(
            model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only
        )
        root = os.path.join(model_name_or_path, subfolder) if subfolder else model_name_or_path
        return cls(root, **config)

    def get_embedding_dimension(self) -> int:
        return int(self.auto_model.config.hidden_size)

    def preprocess(self, inputs: Sequence[str], prompt: str | None = None, **kwargs) -> dict[str, Any]:
        texts = [(prompt or "") + t for t in inputs]
        keep = self.max_seq_length - len(self.embedder.special_ids)
        tokens = [self.tokenizer(t, add_special_tokens=True)["input_ids"][:keep] for t in texts]
        if any(not t for t in tokens):
            raise ValueError("a text tokenises to nothing; cannot embed an empty text")
        # GEMEmbedder's own batch builder: the identical layout is what makes the vectors equal.
        return self.embedder._batch(tokens, "right")

    def forward(self, features: dict[str, torch.Tensor], **kwargs) -> dict[str, torch.Tensor]:
        batch = {k: features[k] for k in ("input_ids", "position_ids", "doc_ids", "roles")}
        hidden = self.auto_model.base_model(**batch, use_cache=False).last_hidden_state
        n = batch["input_ids"].shape[0]  # one text per row: doc ids are the row numbers
        emb = pool_special_states(hidden.float(), batch["roles"], batch["doc_ids"], n)
        features["token_embeddings"] = hidden
        features["sentence_embedding"] = F.normalize(emb, dim=-1)
        return features

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        from ..attention.hf import use_gem_attention
        from .enable import disable_gem

        if self.gem_adapter is not None:  # summary mode: the adapter folder again, never the base weights as a full model
            from ..hf.summary_files import BASE_DIR, write_summary_adapter_files

            write_summary_adapter_files(
                output_path,
                lm=self.auto_model,
                adapter=self.gem_adapter,
                tokenizer=self.tokenizer,
                config=self.embedder.config,
                base_path=self.embedder.base_path,
                self_contained=os.path.isdir(os.path.join(self.source_path, BASE_DIR)),
            )
            self.save_config(output_path)
            return

        model = self.auto_model
        disable_gem(model)  # the export loads with sdpa; the GEM attention comes back afterwards
        try:
            model.save_pretrained(output_path, safe_serialization=safe_serialization)
        finally:
            use_gem_attention(model, backend=self.backend, suffix_sees_bos=self.embedder.config.suffix_sees_bos)
        self.tokenizer.save_pretrained(output_path)
        self.embedder.config.save(output_path)
        self.save_config(output_path)
