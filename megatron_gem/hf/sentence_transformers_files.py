"""The sentence-transformers files of a GEM export, so ``SentenceTransformer(path)`` (and hence
mteb) gives :class:`~megatron_gem.GEMEmbedder`'s vectors (``text SPECIAL*K``, mean of the K
special states, L2-norm) instead of silently mean-pooling the plain model.

Every HF export writes them (train.py's ``hf/`` from both engines, the converters; see
:func:`megatron_gem.hf.export.add_embedder_files`); ``integrations.save_sentence_transformer``
is this same writer for a directory of the user's own. The HF files are left untouched, so the
directory still loads with ``AutoModelForCausalLM`` and ``GEMEmbedder.from_pretrained``.

Two layouts of the files, chosen by ``mode``:

``"builtin"`` (K = 1, the paper's default): only sentence-transformers' own modules, so
  ``SentenceTransformer(path)`` needs neither megatron_gem nor ``trust_remote_code``:
  ``Transformer`` (the base model, causal attention) -> ``Pooling("lasttoken")`` -> ``Normalize``.
  The tokenizer is loaded with ``processor_kwargs`` (in ``sentence_bert_config.json``) that append
  the GEM token as its end-of-sequence token. Exact because for ``text SPECIAL`` with a single
  special token the GEM mask *is* the causal mask (no suffix, no second special token), right
  padding is masked, and truncation keeps room for the appended token. Only sentence-transformers'
  tokenizer sees those kwargs; ``tokenizer_config.json`` is not changed.
``"custom"`` (any K): one module, ``GEMSentenceEncoder`` (megatron_gem/integrations/
  sentence_transformers.py, named here by its import path only: it is an integration, a layer
  above), that runs the GEM layout and mask itself. sentence-transformers >= 6 imports a module
  class outside its own namespace only with ``SentenceTransformer(path, trust_remote_code=True)``,
  and megatron_gem must be installed.
``"auto"``: builtin when K = 1, no embed template (GEMConfig.embed_template) and the tokenizer
check below passes, else custom.

The builtin mode is verified at export: the tokenizer loaded with the saved kwargs must produce
exactly ``tokenizer(text) + [gem token]`` on probe texts, else ``"auto"`` falls back to custom
(``"builtin"`` raises).

Prompts: ``GEMConfig.query_prompt`` (train.py's ``--contrastive-query-prompt``) is saved as the
``"query"`` prompt of ``config_sentence_transformers.json``; ``default_prompt_name`` stays null,
so only ``encode(..., prompt_name="query")`` / ``encode_query`` prepend it (as GEMEmbedder's
``encode_queries`` does).
"""

from __future__ import annotations

import os
import shutil

from ..common.files import write_json_atomic
from ..common.manifest import rewriting
from ..gem.config import GEMConfig

MODES = ("auto", "builtin", "custom")
ST_FILES = ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "gem_sentence_config.json")
ST_DIRS = ("1_Pooling", "2_Normalize")
# The custom module's import path (what modules.json names; tests check it is the class's own).
CUSTOM_MODULE = "megatron_gem.integrations.sentence_transformers.GEMSentenceEncoder"
CUSTOM_CONFIG = "gem_sentence_config.json"
DEFAULT_MAX_SEQ_LENGTH = 512  # GEMEmbedder's default max_length
_PROBES = ("A short text.", "Another, somewhat longer text with punctuation: 42!", "x")


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


def _model_config(path: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    return cfg if hasattr(cfg, "hidden_size") else cfg.get_text_config()


def prompts_of(config: GEMConfig) -> dict[str, str]:
    """The sentence-transformers prompts a GEM model was trained with ({} when none)."""
    return {"query": config.query_prompt} if config.query_prompt else {}


def save_sentence_transformer(path: str | os.PathLike, *, mode: str = "auto", max_seq_length: int | None = None, backend: str = "sdpa") -> str:
    """Write the sentence-transformers files into the GEM checkpoint at ``path`` (files written
    atomically; a manifest.json there is verified first and brought up to date after);
    returns the mode used.

    ``max_seq_length``: token budget of a text *including* the K special tokens (as
    ``GEMEmbedder(max_length=...)``); default 512 (GEMEmbedder's), capped by the model's
    ``max_position_embeddings``. ``backend``: attention backend of the custom module.
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
    if config.summary_mode:  # an adapter folder: the model's config is the base checkpoint's
        from .summary_files import resolve_base

        model_config = _model_config(resolve_base(path, config, None))
    else:
        model_config = _model_config(path)
    if max_seq_length is None:
        max_seq_length = min(DEFAULT_MAX_SEQ_LENGTH, getattr(model_config, "max_position_embeddings", None) or DEFAULT_MAX_SEQ_LENGTH)
    k = config.num_special_tokens
    if max_seq_length <= k:
        raise ValueError(f"max_seq_length={max_seq_length} leaves no room for text before {k} special tokens")
    if config.summary_mode:  # an adapter folder: only the custom module loads base + deltas
        if mode == "builtin":
            raise ValueError(f"{path}: a summary-mode adapter folder needs mode='custom' (the builtin modules would load the base model without the deltas)")
        mode = "custom"
    if config.embed_template:  # the builtin tokenizer only appends the GEM token: it cannot wrap the text in the template
        if mode == "builtin":
            raise ValueError(f"{path}: GEMConfig.embed_template={config.embed_template!r} needs mode='custom' (the builtin modules cannot apply it)")
        mode = "custom"
    if mode in ("auto", "builtin"):
        ok = k == 1 and _builtin_tokenizer_ok(path, tokenizer, config)
        if not ok and mode == "builtin":
            raise ValueError(
                f"{path}: builtin sentence-transformers modules need K=1 (got {k}) and a tokenizer that can append "
                f"the GEM token as end-of-sequence; use mode='custom'"
            )
        mode = "builtin" if ok else "custom"
    with rewriting(path):
        _write_files(path, mode, config, tokenizer, model_config, max_seq_length, backend)
    return mode


def _write_files(path: str, mode: str, config: GEMConfig, tokenizer, model_config, max_seq_length: int, backend: str) -> None:
    # A rewrite in the other mode must not leave the first one's files behind.
    for name in ST_FILES:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    for name in ST_DIRS:
        shutil.rmtree(os.path.join(path, name), ignore_errors=True)
    write_json_atomic(
        os.path.join(path, "config_sentence_transformers.json"),
        {"model_type": "SentenceTransformer", "prompts": prompts_of(config), "default_prompt_name": None, "similarity_fn_name": "cosine"},
    )
    if mode == "builtin":
        os.makedirs(os.path.join(path, "1_Pooling"))
        os.makedirs(os.path.join(path, "2_Normalize"))
        write_json_atomic(
            os.path.join(path, "modules.json"),
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.sentence_transformer.modules.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.base.modules.Normalize"},
            ],
        )
        processor_kwargs = builtin_processor_kwargs(tokenizer, config)
        processor_kwargs["model_max_length"] = max_seq_length
        write_json_atomic(
            os.path.join(path, "sentence_bert_config.json"),
            {"transformer_task": "feature-extraction", "processor_kwargs": processor_kwargs, "config_kwargs": {"use_cache": False}},
        )
        write_json_atomic(
            os.path.join(path, "1_Pooling", "config.json"),
            {"embedding_dimension": int(model_config.hidden_size), "pooling_mode": "lasttoken", "include_prompt": True},
        )
    else:
        write_json_atomic(os.path.join(path, "modules.json"), [{"idx": 0, "name": "0", "path": "", "type": CUSTOM_MODULE}])
        write_json_atomic(os.path.join(path, CUSTOM_CONFIG), {"max_seq_length": max_seq_length, "backend": backend})
