"""MTEB (2.x) models: GEM checkpoints, the training-free baselines of any HF causal LM, and
sentence-transformers models, behind one wrapper.

``load_mteb_model(path, method)`` with method
  gem        GEMEmbedder: ``text SPECIAL*K`` under the GEM mask, mean of the K special states
  mean | last | echo | prompteol   :mod:`baselines` on the plain causal LM
  st         a sentence-transformers model folder (reference embedders, e.g. all-MiniLM-L6-v2)

A summary-mode adapter folder (hf/summary_files.py) works with every method: ``gem`` loads the
base checkpoint plus the deltas (digest and aLoRA guard checked; ``base`` overrides
gem_config.json's base_model), the baselines run on the base model itself (what the adapter
leaves of plain text), ``st`` on the folder's sentence-transformers files.

The wrapper collects the texts of mteb's DataLoader, embeds them in its own batches (sorted
by length, so padding stays small), and returns float32 numpy rows, L2-normalised, compared
by cosine. Task instructions are off by default (GEM and the baselines were not trained with
any); ``instructions=True`` prepends ``"Instruct: {task instruction}\\nQuery: "`` to queries
(and to every text of symmetric tasks), using mteb's per-task (else per-task-type) prompt.
A model trained with a query prompt (``--contrastive-query-prompt``; gem_config.json's
``query_prompt``, the sentence-transformers ``"query"`` prompt) gets it on what mteb marks as
queries (``prompt_type=query``: retrieval queries), never on documents or symmetric-task texts,
as ``SentenceTransformer.encode_query`` does; with ``instructions`` it comes first.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np
import torch

METHODS = ("gem", "mean", "last", "echo", "prompteol", "st")

INSTRUCTION_TEMPLATE = "Instruct: {instruction}\nQuery: "


def _revision(path: str) -> str:
    """A short content id of a local checkpoint: its config files and weight file sizes."""
    h = hashlib.sha1()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if name.endswith(".json") and os.path.getsize(full) < 1 << 20:
            with open(full, "rb") as f:
                h.update(name.encode() + f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
    return "local-" + h.hexdigest()[:12]


def _model_name(path_or_name: str, method: str) -> str:
    base = os.path.basename(os.path.normpath(str(path_or_name))) or "model"
    return f"megatron-gem/{base.replace(' ', '_')}-{method}"


def _make_meta(
    name: str,
    revision: str,
    *,
    n_parameters: int | None,
    embed_dim: int | None,
    max_tokens: int | None,
    adapted_from: str | None,
    use_instructions: bool,
    loader=None,
):
    from mteb.models.model_meta import ModelMeta

    return ModelMeta(
        loader=loader,
        name=name,
        revision=revision,
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=n_parameters,
        memory_usage_mb=None,
        max_tokens=max_tokens,
        embed_dim=embed_dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["PyTorch"],
        similarity_fn_name="cosine",
        use_instructions=use_instructions,
        training_datasets=None,
        adapted_from=adapted_from,
    )


def _encoder_base():
    from mteb.models.abs_encoder import AbsEncoder

    return AbsEncoder


class _Lazy:
    """Resolves the mteb base class at first use so importing this module stays cheap."""


def _wrapper_class():
    AbsEncoder = _encoder_base()

    class MTEBEncoder(AbsEncoder):
        """An mteb encoder around ``encode_fn(list[str]) -> [n, d]`` (tensor or array)."""

        def __init__(
            self,
            encode_fn: Callable[[list[str]], Any],
            meta,
            *,
            instructions: bool = False,
            show_progress_bar: bool = True,
            description: str = "",
            query_prompt: str = "",
        ):
            self.encode_fn = encode_fn
            self.query_prompt = query_prompt
            self.mteb_model_meta = meta
            self.instructions = instructions
            self.instruction_template = INSTRUCTION_TEMPLATE if instructions else None
            self.show_progress_bar = show_progress_bar
            self.description = description
            self.model = None

        def _prefix(self, task_metadata, prompt_type) -> str:
            from mteb.types import PromptType

            trained = self.query_prompt if prompt_type == PromptType.query else ""
            return trained + self._instruction(task_metadata, prompt_type)

        def _instruction(self, task_metadata, prompt_type) -> str:
            if not self.instructions:
                return ""
            from mteb.types import PromptType

            # Asymmetric tasks (retrieval): only queries get the instruction, as in E5/GritLM.
            if prompt_type == PromptType.document:
                return ""
            instruction = self.get_instruction(task_metadata, prompt_type)
            return self.format_instruction(instruction, prompt_type) if instruction else ""

        def encode(self, inputs, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None, **kwargs) -> np.ndarray:
            texts = []
            for batch in inputs:
                texts.extend(batch["text"])
            prefix = self._prefix(task_metadata, prompt_type)
            if prefix:
                texts = [prefix + t for t in texts]
            # Empty texts would have nothing to read out; one space keeps their row defined.
            texts = [t if t.strip() else " " for t in texts]
            # mteb's STS evaluator sends every pair's texts (Lee-50: 1225 pairs of 50 documents):
            # embed each distinct text once.
            unique = list(dict.fromkeys(texts))
            emb = self.encode_fn(unique)
            if isinstance(emb, torch.Tensor):
                emb = emb.detach().float().cpu().numpy()
            emb = np.asarray(emb, dtype=np.float32)
            if emb.shape[0] != len(unique):
                raise RuntimeError(f"encoder returned {emb.shape[0]} rows for {len(unique)} texts")
            index = {t: i for i, t in enumerate(unique)}
            return emb[[index[t] for t in texts]]

    return MTEBEncoder


def wrap_encoder(
    encode_fn: Callable[[list[str]], Any],
    *,
    name: str,
    revision: str = "live",
    embed_dim: int | None = None,
    n_parameters: int | None = None,
    max_tokens: int | None = None,
    adapted_from: str | None = None,
    instructions: bool = False,
):
    """An mteb model around any ``encode(list[str]) -> [n, d]`` function (e.g. a live model's
    encoder); ``name`` must look like ``org/model``."""
    if "/" not in name:
        name = f"megatron-gem/{name}"
    meta = _make_meta(
        name, revision, n_parameters=n_parameters, embed_dim=embed_dim, max_tokens=max_tokens, adapted_from=adapted_from, use_instructions=instructions
    )
    return _wrapper_class()(encode_fn, meta, instructions=instructions)


def load_mteb_model(
    path: str,
    method: str = "gem",
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    instructions: bool = False,
    show_progress_bar: bool = True,
    name: str | None = None,
    base: str | None = None,
):
    """An mteb model for a checkpoint directory (or hub name when online) and a method.
    ``base``: the base checkpoint of a summary-mode adapter folder (default: its gem_config.json)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if isinstance(dtype, str):
        dtype = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }[dtype]
    path = str(path)
    revision = _revision(path) if os.path.isdir(path) else "hub"
    name = name or _model_name(path, method)

    if method == "st":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(path, device=str(device) if device else "cpu")
        if dtype is not None:
            st = st.to(dtype)
        fn = lambda texts: st.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=show_progress_bar)
        query_prompt = st.prompts.get("query") or ""
        n_params = sum(p.numel() for p in st.parameters())
        dim, max_tokens, adapted = st.get_sentence_embedding_dimension(), st.max_seq_length, None
    elif method == "gem":
        from ..embedder import GEMEmbedder

        emb = GEMEmbedder.from_pretrained(path, dtype=dtype, device=device, max_length=max_length, base=base)
        fn = lambda texts: emb.encode(texts, batch_size=batch_size, show_progress_bar=show_progress_bar)
        query_prompt = emb.prompts.get("query", "")
        n_params = sum(p.numel() for p in emb.model.parameters())
        dim, max_tokens, adapted = emb.model.config.hidden_size, max_length, None
    else:
        from ..hf.summary_files import load_generation_model
        from .baselines import CausalLMEncoder

        lm, tok = load_generation_model(path, base=base, dtype=dtype)
        query_prompt = ""
        enc = CausalLMEncoder(lm, tok, method, max_length=max_length, batch_size=batch_size, device=device, show_progress_bar=show_progress_bar)
        fn = enc.encode
        n_params = sum(p.numel() for p in lm.parameters())
        dim, max_tokens, adapted = lm.config.hidden_size, max_length, None
    meta = _make_meta(name, revision, n_parameters=n_params, embed_dim=dim, max_tokens=max_tokens, adapted_from=adapted, use_instructions=instructions)
    return _wrapper_class()(fn, meta, instructions=instructions, show_progress_bar=show_progress_bar, query_prompt=query_prompt)


def main_scores(model_result) -> dict[str, float]:
    """{task name: main score} from what ``mteb.evaluate`` returns (mteb's scale, 0-1)."""
    out = {}
    for tr in model_result.task_results:
        out[tr.task_name] = float(tr.get_score())
    return out


def run_mteb(model, tasks, output_dir: str, *, overwrite: bool = True, show_progress_bar: bool = True, batch_size: int = 16) -> dict[str, float]:
    """Evaluate ``model`` on ``tasks`` (task objects or names), writing mteb's result files
    under ``output_dir``; returns {task name: main score}."""
    import mteb
    from mteb.cache import ResultCache

    tasks = [mteb.get_task(t) if isinstance(t, str) else t for t in tasks]
    result = mteb.evaluate(
        model,
        tasks,
        cache=ResultCache(output_dir),
        overwrite_strategy="always" if overwrite else "only-missing",
        show_progress_bar=show_progress_bar,
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": show_progress_bar},
    )
    return main_scores(result)


def score_table(scores: dict[str, dict[str, float]], columns: list[str] | None = None) -> str:
    """Markdown table: one row per model, one column per task, plus the average (x100)."""
    columns = columns or sorted({t for s in scores.values() for t in s})
    head = "| model | " + " | ".join(columns) + " | avg |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for model, s in scores.items():
        vals = [s.get(c) for c in columns]
        got = [v for v in vals if v is not None]
        avg = sum(got) / len(got) if got else None
        cell = lambda v: "-" if v is None else f"{100 * v:.1f}"
        lines.append(f"| {model} | " + " | ".join(cell(v) for v in vals) + f" | {cell(avg)} |")
    return "\n".join(lines)


def save_score_table(scores: dict[str, dict[str, float]], output_dir: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "summary.json"), "w") as f:
        json.dump(scores, f, indent=2, sort_keys=True)
    table = score_table(scores)
    with open(os.path.join(output_dir, "summary.md"), "w") as f:
        f.write(table + "\n")
    return table
