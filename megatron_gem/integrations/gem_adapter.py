"""Summary mode (``GEMConfig(train_mode="summary")``, train.py's ``--gem-train summary``) on a
user's own HF model: the adapter kept on the model, saved and loaded in the export format.

The pieces are train.py's: ``hf.summary.attach_summary_adapter`` hooks gem/adapter.py's
SummaryAdapter onto the model's linear layers and freezes the base; ``hf.export.
export_summary_adapter`` writes the PEFT activated-LoRA folder; ``hf.summary_files.
read_summary_adapter`` reads one back through the aLoRA guard and the base digest check.

What this module adds is where the adapter lives: registered as the submodule ``gem_adapter``
of the HF model, so ``model.to()``, DDP / DeepSpeed and the HF Trainer's optimizer (which takes
the parameters that require grad) see its parameters and no base parameter. The base model's
own modules are not wrapped; ``model.state_dict()`` then also holds ``gem_adapter.*`` keys
(what a Trainer/DeepSpeed checkpoint of the module needs), while ``model.save_pretrained``
leaves them out (``_keys_to_ignore_on_save``): it writes the base, unchanged. The trained thing
is saved with :func:`save_gem_adapter` (``GEMTrainer.save_model`` calls it).
"""

from __future__ import annotations

import os
import shutil

from ..common import distributed as D
from ..common.errors import ModelLoadError
from ..gem.adapter import SummaryAdapter
from ..gem.config import GEMConfig

ADAPTER_ATTR = "gem_adapter"


def gem_adapter_of(model) -> SummaryAdapter | None:
    """The summary adapter :func:`attach_gem_adapter` registered on ``model`` (None: none)."""
    adapter = getattr(model, ADAPTER_ATTR, None)
    return adapter if isinstance(adapter, SummaryAdapter) else None


def base_checkpoint(model, config: GEMConfig, base_path: str | None) -> tuple[str, str]:
    """(name recorded as gem_config ``base_model``, local directory of its weights) of the base
    checkpoint the adapter export will name and digest: ``base_path``, else config.base_model,
    else the path or hub name ``model`` was loaded from (``model.name_or_path``; a hub name must
    be in the local HF cache). Raises before any training when there is none."""
    name = str(base_path or config.base_model or getattr(model, "name_or_path", "") or "")
    if not name:
        raise ValueError(
            "summary mode: the adapter export names and digests the base checkpoint, and this model was not loaded from one "
            "(model.name_or_path is empty); pass enable_gem(..., base_path=<directory of the base checkpoint>)"
        )
    from ..hf.summary_files import base_weight_files, local_checkpoint_dir

    if os.path.isdir(name):
        where = name
        name = os.path.abspath(name)
    else:
        try:
            where = local_checkpoint_dir(name)
        except Exception as e:  # not a directory and not in the local cache
            raise ValueError(
                f"summary mode: base checkpoint {name!r} is neither a directory nor in the local HF cache ({type(e).__name__}); "
                f"pass enable_gem(..., base_path=<directory of the base checkpoint>)"
            ) from e
    try:
        base_weight_files(where)  # the export digests these: refuse now, not at the first save
    except ModelLoadError as e:
        raise ValueError(f"summary mode: {e}; pass enable_gem(..., base_path=<directory of the base checkpoint>)") from e
    return name, where


def attach_gem_adapter(model, tokenizer, config: GEMConfig, *, base_path: str | None = None) -> SummaryAdapter:
    """Freeze ``model`` and attach a new summary adapter from ``config`` (train.py's
    attach_summary_adapter), registered as ``model.gem_adapter``; idempotent (an attached
    adapter is returned as it is). ``config.base_model`` is filled in (see base_checkpoint)."""
    existing = gem_adapter_of(model)
    if existing is not None:
        return existing
    from ..hf.summary import attach_summary_adapter

    name, where = base_checkpoint(model, config, base_path)
    config.base_model = config.base_model or name
    requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    adapter = attach_summary_adapter(model, config)
    model.add_module(ADAPTER_ATTR, adapter)
    skipped = {f"{ADAPTER_ATTR}.{k}" for k in adapter.state_dict()}
    model._keys_to_ignore_on_save = set(getattr(model, "_keys_to_ignore_on_save", None) or ()) | skipped
    # Plain attributes (not modules): what detach restores and what the export needs.
    model.__dict__["_gem_adapter_state"] = {"requires_grad": requires_grad, "skipped": skipped, "base_path": where, "tokenizer": tokenizer}
    return adapter


def detach_gem_adapter(model) -> SummaryAdapter | None:
    """Undo :func:`attach_gem_adapter`: hooks removed, submodule and save exclusions gone, each
    base parameter's requires_grad as before. Returns the (now detached) adapter, or None."""
    from ..hf.summary import detach_summary_adapter

    adapter = gem_adapter_of(model)
    if adapter is None:
        return None
    state = model.__dict__.pop("_gem_adapter_state", {})
    detach_summary_adapter(adapter)
    delattr(model, ADAPTER_ATTR)
    model._keys_to_ignore_on_save = set(model._keys_to_ignore_on_save or ()) - state.get("skipped", set())
    for n, p in model.named_parameters():
        p.requires_grad_(state.get("requires_grad", {}).get(n, True))
    return adapter


def _state(model) -> dict:
    if gem_adapter_of(model) is None or "_gem_adapter_state" not in model.__dict__:
        raise ValueError("the model has no GEM summary adapter: call enable_gem(model, tokenizer, GEMConfig(train_mode='summary')) first")
    return model.__dict__["_gem_adapter_state"]


def save_gem_adapter(model, out_dir: str, *, tokenizer=None, extra: dict | None = None, self_contained: bool = False) -> str:
    """Write the adapter folder (hf.export.export_summary_adapter: PEFT aLoRA files, gem_config,
    tokenizer, sentence-transformers files, model card, manifest) into ``out_dir``. A new
    directory is written atomically; into an existing one (a Trainer's output_dir with its
    checkpoint-* folders) only the folder's own files are swapped in, the manifest last (it lists
    those files). ``tokenizer``: default the one given to enable_gem. Collective under ZeRO-3."""
    from ..hf.export import export_summary_adapter

    state = _state(model)
    tokenizer = tokenizer if tokenizer is not None else state["tokenizer"]
    adapter, config = gem_adapter_of(model), model.gem_config
    out_dir = str(out_dir).rstrip("/")
    fresh = not os.path.exists(out_dir) or (os.path.isdir(out_dir) and not os.listdir(out_dir))
    target = out_dir if fresh else out_dir + ".gem_adapter"
    export_summary_adapter(model, adapter, tokenizer, config, target, extra, base_path=state["base_path"], self_contained=self_contained)
    if not fresh and D.is_main():
        from ..common.manifest import MANIFEST

        names = sorted(os.listdir(target), key=lambda n: n == MANIFEST)  # the manifest last
        for name in names:
            dst = os.path.join(out_dir, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(target, name), dst)
        os.rmdir(target)
    D.barrier()
    return out_dir


def load_gem_adapter(model, folder: str) -> None:
    """Copy the deltas of adapter folder ``folder`` (manifest verified when present, the aLoRA
    guard, the base digest against the model's base checkpoint) into ``model.gem_adapter``."""
    from ..common.manifest import MANIFEST, verify
    from ..hf.summary_files import load_peft_state_dict, read_summary_adapter

    state = _state(model)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        verify(folder)
    saved = read_summary_adapter(folder, base=state["base_path"])
    ids, mine = list(saved.config.special_token_ids), list(model.gem_config.special_token_ids)
    if ids != mine:
        raise ModelLoadError(f"{folder}: summary token ids {ids} differ from the model's {mine} (gem_config.json special_token_ids)")
    load_peft_state_dict(gem_adapter_of(model), saved.state, folder)
