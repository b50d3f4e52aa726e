"""What vLLM serves for a GEM folder, and what it cannot serve (refused here, before any weight
is read): the one place the plugin's processes (the API server's renderer, the engine's config
hook and model) and the command line agree on.

A GEM folder is a full-mode export (``export_hf``: an HF checkpoint with the GEM tokens and
gem_config.json) or a summary-mode adapter folder (``export_summary_adapter``: PEFT aLoRA files
and gem_config.json, the base checkpoint in ``base/`` or named by gem_config.json). vLLM loads
weights from one HF checkpoint directory: the export itself, or the adapter's base. The GEM
folder travels in the model's HF config as ``gem_dir`` (``--hf-overrides``); a full export
needs none (it is the model directory).

Refused: K > 1 summary tokens (GEM's rule that summary tokens do not see each other is not a
causal mask, and vLLM's runner only runs causal attention for decoder models), a base that is
not a Llama-layout model (the plugin's model class is vLLM's Llama), and a folder that fails
the summary-adapter guard (hf/summary_files.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ...common.errors import ModelLoadError
from ...gem.config import CONFIG_NAME, GEMConfig
from ...hf.summary_files import is_summary_adapter_dir, read_summary_adapter

ARCHITECTURE = "GEMForEmbedding"  # the model class the plugin registers with vLLM's ModelRegistry
TOKENIZER_MODE = "gem"  # vLLM's --tokenizer-mode that selects the plugin's renderer
GEM_DIR_KEY = "gem_dir"  # the HF-config key (--hf-overrides) naming the GEM folder
SUPPORTED_MODEL_TYPES = ("llama",)  # HF model_type served by vLLM's Llama module layout


@dataclass(frozen=True)
class GEMFolder:
    """A GEM folder that the plugin can serve.

    gem_dir: the folder with gem_config.json; model_dir: the HF checkpoint vLLM loads (the
    export, or the adapter's base); adapter_dir: the summary-mode adapter folder, None in full
    mode; summary_id: the one summary token's id."""

    gem_dir: str
    config: GEMConfig
    model_dir: str
    adapter_dir: str | None

    @property
    def summary_id(self) -> int:
        return int(self.config.special_token_ids[0])


def check_servable(config: GEMConfig, source: str) -> None:
    """Raise ModelLoadError unless vLLM can serve ``config`` exactly."""
    k = config.num_special_tokens
    if k != 1:
        raise ModelLoadError(
            f"{source}: num_special_tokens={k}: the GEM rule that the {k} summary tokens do not see each other is not a causal mask, and vLLM's "
            f"pooling runner runs decoder models with causal attention only; serve K = 1 models with vLLM, or this model with GEMEmbedder / "
            f"`megatron-gem serve`"
        )
    if len(config.special_token_ids) != 1:
        raise ModelLoadError(f"{source}: gem_config.json special_token_ids={config.special_token_ids}: a GEM export records the id of its summary token")


def _model_type(model_dir: str) -> str:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise ModelLoadError(f"{model_dir}: no config.json; vLLM loads an HF checkpoint directory")
    with open(path) as f:
        return json.load(f).get("model_type", "")


def check_model_type(model_type: str, source: str) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r}: the GEM vLLM plugin serves {list(SUPPORTED_MODEL_TYPES)} (vLLM's Llama module layout); "
            f"use GEMEmbedder / `megatron-gem serve` for this model"
        )


def open_gem_folder(path: str, *, base: str | None = None, verify_base: bool = True) -> GEMFolder:
    """Check the GEM folder ``path`` and resolve the checkpoint vLLM loads. ``base``: the base
    checkpoint of an adapter folder (default: its ``base/``, else gem_config.json base_model);
    ``verify_base``: check the base's weight digest (hashes every weight byte)."""
    path = os.path.abspath(str(path))
    if not os.path.isfile(os.path.join(path, CONFIG_NAME)):
        raise ModelLoadError(f"{path}: no {CONFIG_NAME}; serve a GEM export or summary-mode adapter folder (docs/vllm.md)")
    if is_summary_adapter_dir(path):
        folder = read_summary_adapter(path, base=base, verify_base=verify_base)
        config, model_dir, adapter_dir = folder.config, os.path.abspath(folder.base_path), path
    else:
        if base is not None:
            raise ModelLoadError(f"--base {base}: {path} is a full-mode export, not a summary-mode adapter folder (--base is only for those)")
        try:
            config = GEMConfig.load(path)
        except ValueError as e:
            raise ModelLoadError(str(e)) from e
        model_dir, adapter_dir = path, None
    check_servable(config, path)
    check_model_type(_model_type(model_dir), model_dir)
    return GEMFolder(gem_dir=path, config=config, model_dir=model_dir, adapter_dir=adapter_dir)


def gem_dir_of(model_config) -> str:
    """The GEM folder of a vLLM ModelConfig: its HF config's ``gem_dir``, else the model directory."""
    return str(getattr(model_config.hf_config, GEM_DIR_KEY, None) or model_config.model)


def folder_of(model_config, *, verify_base: bool = False) -> GEMFolder:
    """The GEM folder a vLLM ModelConfig serves, checked against the directory vLLM loads."""
    gem_dir = gem_dir_of(model_config)
    summary = is_summary_adapter_dir(gem_dir)
    folder = open_gem_folder(gem_dir, base=model_config.model if summary else None, verify_base=verify_base)
    if os.path.realpath(folder.model_dir) != os.path.realpath(str(model_config.model)):
        raise ModelLoadError(
            f"{ARCHITECTURE}: vLLM loads {model_config.model}, but the GEM folder {gem_dir} is a full-mode export of its own; "
            f"serve it as the model (vllm serve {gem_dir}) or drop {GEM_DIR_KEY} from --hf-overrides"
        )
    return folder
