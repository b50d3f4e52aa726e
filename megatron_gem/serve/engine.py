"""GEMEngine: one loaded GEM model (one copy of the weights) behind every endpoint.

Loading is GEMEmbedder.from_pretrained's, nothing else: a summary-mode adapter folder loads its
base with the adapter's deltas hooked on (hf/summary_files.py: the aLoRA guard, the base digest),
a full export loads as itself. Generation runs ``generate`` on the same module: in summary mode
plain text never activates the deltas (no GEM metadata in the forward), so the answer is the base
model's; in full mode it is the trained model's.

Before anything is read the folder (and its base) must hold safetensors weights and no remote code
(``check_safe_folder``): transformers prefers safetensors files when present, so no pickle is ever
unpickled, and no ``auto_map`` means no Python from the folder is ever imported.

Every forward runs on one ModelWorker thread (worker.py says why).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch

from ..common.errors import ModelLoadError
from ..embedder import GEMEmbedder
from ..gem.config import GEMConfig
from ..gem.template import CHAT
from ..hf.summary_files import is_summary_adapter_dir, resolve_base
from .worker import ModelWorker

SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def check_safe_folder(path: str, *, weights: bool = True) -> None:
    """Refuse a checkpoint folder that could make loading run code: weights only as pickle
    (``*.bin`` / ``*.pt``: unpickling executes), or a config with ``auto_map`` (remote code).
    ``weights=False``: a summary-mode adapter folder (its weights are adapter_model.safetensors,
    read by safetensors itself; its base is checked as a checkpoint)."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"{path}: not a directory")
    names = os.listdir(path)
    if weights and not any(n in names for n in SAFE_WEIGHTS):
        pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
        raise ModelLoadError(
            f"{path}: no safetensors weights ({' / '.join(SAFE_WEIGHTS)})"
            + (f"; {pickles} are pickle files, which this server never loads (unpickling runs code): convert them to safetensors first" if pickles else "")
        )
    for name in ("config.json", "tokenizer_config.json"):
        cfg = os.path.join(path, name)
        if os.path.isfile(cfg):
            with open(cfg) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as e:
                    raise ModelLoadError(f"{cfg}: line {e.lineno}: invalid JSON ({e.msg})") from e
            if isinstance(data, dict) and data.get("auto_map"):
                raise ModelLoadError(f"{cfg}: auto_map {data['auto_map']} asks for the folder's own Python code; this server runs no remote code")


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class GEMEngine:
    """The served model: its GEMEmbedder (model, tokenizer, GEMConfig, template) and the worker."""

    def __init__(self, embedder: GEMEmbedder, *, name: str):
        self.embedder = embedder
        self.name = name
        self.tokenizer = embedder.tokenizer
        self.config = embedder.config
        cfg_len = getattr(embedder.model.config, "max_position_embeddings", None)
        self.max_model_len = int(cfg_len or 2048)  # ServeConfig.max_model_len may lower it
        self.worker = ModelWorker()
        self.eos_ids = _eos_ids(embedder.model, self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def load(cls, model_dir: str, *, base: str | None = None, max_input_tokens: int = 512, name: str | None = None) -> "GEMEngine":
        model_dir = str(model_dir)
        adapter = is_summary_adapter_dir(model_dir)
        check_safe_folder(model_dir, weights=not adapter)
        if adapter:
            check_safe_folder(resolve_base(model_dir, GEMConfig.load(model_dir), base))
        embedder = GEMEmbedder.from_pretrained(model_dir, base=base, dtype=torch.float32, max_length=max_input_tokens)
        return cls(embedder, name=name or os.path.basename(os.path.normpath(model_dir)))

    @property
    def summary_mode(self) -> bool:
        return self.config.summary_mode

    @property
    def chat_template_embeds(self) -> bool:
        """Whether texts are embedded inside the chat template (--gem-embed-template chat):
        then a one-message chat prompt is exactly what the summary tokens of that message read."""
        return self.config.embed_template == CHAT

    def stop(self) -> None:
        self.worker.stop()

    # ---- embeddings (run on the worker) ----

    def wrap_texts(self, texts: list[str], max_input_tokens: int) -> list[tuple[list[int], int]]:
        """(wrapped token ids, text tokens cut) per text, as GEMEmbedder.text_tokens builds
        them (tokenised with BOS, cut to fit, wrapped in the embed template)."""
        return self.wrap_token_ids([self.tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts], max_input_tokens)

    def wrap_token_ids(self, token_lists: list[list[int]], max_input_tokens: int) -> list[tuple[list[int], int]]:
        keep = max_input_tokens - len(self.embedder.special_ids)
        out = []
        for t in token_lists:
            ids, cut = self.embedder.template.fit(t, keep)
            out.append((ids.tolist(), cut))
        return out

    @torch.inference_mode()
    def embed_batch(self, token_lists: list[list[int]]) -> torch.Tensor:
        """Unit vectors [n, hidden] (float32) of already wrapped texts: GEMEmbedder.encode's.

        Computed as a prefill and a readout, the way ``return_embedding`` reads a chat prefill:
        the texts, right-padded, run through the model with plain causal attention, keeping the
        KV cache; then K summary steps read it (GEMEmbedder.embed_from_cache, padding hidden by
        the mask). Exact because no text token attends a summary token under the GEM rule, and
        in summary mode the deltas act only at the summary tokens: the prefill is the base
        model's, with no adapter rows to select and no GEM mask to build per layer (what makes
        it faster than encode's one forward over ``text SPECIAL*K``; docs/serving.md). Right
        padding comes after every real token, so causal attention never lets a real token see it."""
        from transformers import DynamicCache

        from ..hf.summary import cache_kwargs

        model, device = self.embedder.model, self.embedder.device
        width = max(len(t) for t in token_lists)
        ids = torch.full((len(token_lists), width), self.embedder.pad_id, dtype=torch.long)
        real = torch.zeros(len(token_lists), width, dtype=torch.bool)
        for i, t in enumerate(token_lists):
            if not t:
                raise ValueError(f"text {i} is empty; cannot embed an empty text")
            ids[i, : len(t)] = torch.as_tensor(t)
            real[i, : len(t)] = True
        cache = DynamicCache()  # full-length layers (prompt_cache says why)
        model.base_model(input_ids=ids.to(device), **cache_kwargs(model, cache))
        return self.embedder.embed_from_cache(cache, attention_mask=real.to(device)).cpu()

    # ---- generation ----

    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt of a conversation: the tokenizer's chat template up to the assistant turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            from .api_errors import bad_request

            raise bad_request("this model's tokenizer has no chat template: use /v1/completions", param="messages")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, prompt_ids: list[int], params: SamplingParams, streamer, *, return_embedding: bool = False) -> dict:
        """One answer (runs on the worker): ``model.generate`` on the prompt, streaming each new
        token to ``streamer``; with ``return_embedding`` the embedding of the prompt read from
        the KV cache generation filled (K summary steps over it, GEMEmbedder.embed_from_cache),
        no second pass over the prompt. Returns {"ids": generated ids, "embedding": [hidden] or None}."""
        from transformers import GenerationConfig

        model = self.embedder.model
        sample = params.temperature > 0
        gen = GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            # Every sampling knob set: unset ones would take the model's generation_config (top_k
            # 50, a repetition penalty, ...), which OpenAI's API does not have.
            temperature=params.temperature if sample else 1.0,
            top_p=params.top_p if sample else 1.0,
            top_k=0 if sample else None,  # 0: no top-k cut (greedy ignores it)
            min_p=None,
            repetition_penalty=1.0,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            stop_strings=params.stop or None,
            use_cache=True,
            return_dict_in_generate=True,
        )
        if params.seed is not None:
            torch.manual_seed(params.seed)
        ids = torch.tensor([prompt_ids], device=self.embedder.device)
        extra = {}
        if return_embedding:  # the readout needs every prompt key: a cache of full-length layers (prompt_cache)
            from transformers import DynamicCache

            from ..hf.summary import cache_kwargs

            name, cache = next(iter(cache_kwargs(model, DynamicCache()).items()))
            extra[name] = cache
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen, streamer=streamer, tokenizer=self.tokenizer, **extra)
        generated = out.sequences[0, ids.shape[1] :].tolist()
        embedding = None
        if return_embedding:
            cache = out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5.2x renamed it
            embedding = self.embedder.embed_from_cache(prompt_cache(cache, ids.shape[1]))[0].cpu()
        return {"ids": generated, "embedding": embedding}


def prompt_cache(cache, n: int):
    """A view of ``cache`` that holds its first ``n`` positions (the prompt), sharing the
    tensors; ``cache`` itself is left as it was. After ``generate`` the cache also holds the
    answer's tokens; causal attention left the prompt's keys and values as the prefill wrote them.
    The cache must have full-length layers (``DynamicCache()``, not ``DynamicCache(config=...)``):
    a sliding-window model's (Mistral) own cache layers keep only the last window of keys, while
    the summary tokens read the whole prompt under the GEM rule, which applies the window itself
    (gem/mask.py)."""
    view = copy.copy(cache)
    view.layers = []
    for layer in cache.layers:
        part = copy.copy(layer)
        part.keys, part.values = layer.keys[..., :n, :], layer.values[..., :n, :]
        view.layers.append(part)
    return view


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        ids += eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    ids = list(dict.fromkeys(int(i) for i in ids))
    if not ids:
        raise ModelLoadError("the model defines no end-of-sequence token (generation_config / config eos_token_id, tokenizer eos_token)")
    return ids
