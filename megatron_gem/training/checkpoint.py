"""Checkpoints: engine-native for exact resume, HF export for everyone else.

Atomicity: each save goes to a new tag directory (``global_step{N}``); only after every rank
has finished is ``latest`` replaced (write to a temporary file, then os.replace). A save
killed half-way leaves ``latest`` pointing at the previous good checkpoint. The HF export is
written to a temporary directory and swapped in by rename.
"""

from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import torch

from . import distributed as D

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"global_step{step}"


def write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def replace_dir_atomic(tmp: str, out_dir: str) -> str:
    """Swap the finished directory ``tmp`` in as ``out_dir`` by renames (the old one, if any,
    is moved aside first and removed last): readers see the old or the new, never a mix."""
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag or not os.path.isdir(os.path.join(load_dir, tag)):
        raise ValueError(f"{path} names checkpoint {tag!r}, which does not exist in {load_dir}")
    return tag


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_engine_checkpoint(engine, save_dir: str, step: int, client_state: dict) -> str:
    """DeepSpeed checkpoint of ``step`` (model, optimizer, scheduler, client_state) plus each
    rank's RNG state; ``latest`` moves only once everything is on disk."""
    tag = tag_for(step)
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    torch.save(rng_state(), os.path.join(save_dir, tag, f"rng_state_rank{D.rank()}.pt"))
    D.barrier()
    if D.is_main():
        write_text_atomic(os.path.join(save_dir, LATEST), tag)
    D.barrier()
    return tag


def load_engine_checkpoint(engine, load_dir: str) -> dict | None:
    """Resume from ``load_dir/latest``; returns the client state, or None when there is none."""
    tag = read_latest(load_dir)
    if tag is None:
        return None
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
    rng_path = os.path.join(load_dir, tag, f"rng_state_rank{D.rank()}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))  # our own file, written above
    return client_state


def _full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU copy of ``module``'s parameters (ZeRO-3: gathered one at a time) on rank 0;
    other ranks get an empty dict."""
    out = {}
    zero3 = any(hasattr(p, "ds_id") for p in module.parameters())
    if zero3:
        import deepspeed

        for name, p in module.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if D.is_main():
                    out[name] = p.data.detach().cpu().clone()
    elif D.is_main():
        out = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return out


def export_hf(lm, tokenizer, gem_config, out_dir: str, *, extra: dict | None = None) -> str | None:
    """Write an HF checkpoint (safetensors, config, tokenizer with the GEM tokens,
    gem_config.json) to ``out_dir`` atomically. Collective under ZeRO-3: call on all ranks."""
    state = _full_state_dict(lm)
    path = None
    if D.is_main():
        tmp = out_dir.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        gem_config.save(tmp)
        if extra:
            write_text_atomic(os.path.join(tmp, "training_info.json"), json.dumps(extra, indent=2) + "\n")
        path = replace_dir_atomic(tmp, out_dir)
    D.barrier()
    return path
