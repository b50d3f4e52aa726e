"""``SentenceTransformer(path)`` on a GEM checkpoint (and hence mteb): the custom module and the
writer, for a directory of the user's own.

Every HF export of megatron_gem already carries the sentence-transformers files (train.py's
``hf/`` from both engines, tools/convert_checkpoint.py); :func:`save_sentence_transformer`
(megatron_gem/hf/sentence_transformers_files.py, which documents the two layouts) writes them into
any other directory with ``gem_config.json``, e.g. one saved with ``save_pretrained`` after
``enable_gem``. :class:`GEMSentenceEncoder` is the ``"custom"`` layout's module (any K): the
GEM layout and mask inside sentence-transformers, GEMEmbedder's vectors.

A summary-mode adapter folder (hf/summary_files.py) is always ``"custom"``: the module loads the
base checkpoint and the folder's deltas through ``GEMEmbedder.from_pretrained`` (digest and aLoRA
guard checked); the builtin ``Transformer`` module would load the folder through transformers,
which attaches the adapter as an aLoRA nothing activates (the base model's vectors).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..gem.readout import pool_special_states
from ..hf.sentence_transformers_files import CUSTOM_CONFIG, MODES, ST_FILES, builtin_processor_kwargs, save_sentence_transformer

__all__ = ["GEMSentenceEncoder", "MODES", "ST_FILES", "builtin_processor_kwargs", "save_sentence_transformer"]


def _input_module_base():
    from sentence_transformers.base.modules import InputModule

    return InputModule


class GEMSentenceEncoder(_input_module_base()):
    """sentence-transformers input module: GEM readout for any K (the ``"custom"`` mode).

    ``preprocess`` lays each text out as ``text SPECIAL*K`` (padding is its own document,
    positions restart per text); ``forward`` runs the model under the GEM mask and writes
    ``sentence_embedding`` (mean of the K special states, L2-normalised) and ``token_embeddings``.
    """

    config_file_name = CUSTOM_CONFIG
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
        tokens = self.embedder.text_tokens(texts, self.max_seq_length)  # truncated and wrapped in the embed template as GEMEmbedder.encode does
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
