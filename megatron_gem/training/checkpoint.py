"""Checkpoints: engine-native for exact resume, HF export for everyone else.

What every save guarantees, in both engines (docs/checkpoints.md):

* each save goes to a new tag directory (``global_step{N}``); when every rank has written
  its files, they are hashed (split over ranks) into ``manifest.json``, written last, and only
  then is ``latest`` replaced (temporary file + fsync + rename). A save killed half-way, or
  one that fails (a full disk), leaves ``latest`` naming the previous complete checkpoint;
* a write error on any rank stops every rank with the path and the error (CheckpointWriteError);
* ``--load`` verifies the manifest (every file present, sizes, sha256) before loading, and
  refuses a damaged or incomplete checkpoint naming the file; with ``--load-fallback`` it
  takes the newest earlier checkpoint that verifies instead;
* the HF export is written to a temporary directory, gets its own manifest, and is swapped
  in by rename.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

from ..common.files import replace_dir_atomic, write_text_atomic
from ..common.manifest import CheckpointError, verify, write_manifest
from . import distributed as D

LATEST = "latest"
_TAG = re.compile(r"^global_step(\d+)$")


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint failed on some rank; the message names the path and the error."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def read_latest(load_dir: str) -> str | None:
    path = os.path.join(load_dir, LATEST)
    if not os.path.isfile(path):
        return None
    tag = open(path).read().strip()
    if not tag or not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{path} names checkpoint {tag!r}, which does not exist in {load_dir}")
    return tag


def saved_tags(load_dir: str) -> list[str]:
    """The ``global_step{N}`` directories of ``load_dir``, newest first."""
    tags = [(int(m.group(1)), name) for name in os.listdir(load_dir) if (m := _TAG.match(name)) and os.path.isdir(os.path.join(load_dir, name))]
    return [name for _, name in sorted(tags, reverse=True)]


def _share() -> tuple[int, int]:
    return D.rank(), D.world_size()


def verify_checkpoint(path: str) -> dict:
    """Collective: every rank checks its share of ``path``'s manifest; all raise the same
    CheckpointError when a file is missing, truncated or changed."""
    return verify(path, share=_share(), gather=D.all_gather_object)


def resolve_checkpoint(load_dir: str, *, fallback: bool = False, log=print) -> str | None:
    """The tag to resume from: the one ``latest`` names, verified. None (and one line saying
    so) when ``load_dir`` holds no checkpoint: the run starts from step 0, as Megatron does.
    With ``fallback``, a damaged ``latest`` gives way to the newest earlier checkpoint that
    verifies (each refusal is printed). Collective."""
    if not os.path.isdir(load_dir):
        log(f"[megatron-gem] --load {load_dir}: no such directory, so no checkpoint to resume; starting from step 0")
        return None
    try:
        tag = read_latest(load_dir)
    except CheckpointError:
        if not fallback:
            raise
        tag = None
    if tag is None and not (fallback and saved_tags(load_dir)):
        log(f"[megatron-gem] --load {load_dir}: no checkpoint there (no {LATEST} file); starting from step 0")
        return None
    latest_step = int(_TAG.match(tag).group(1)) if tag and _TAG.match(tag) else None
    candidates = [tag] if tag else []
    if fallback:
        older = [t for t in saved_tags(load_dir) if t != tag and (latest_step is None or int(_TAG.match(t).group(1)) < latest_step)]
        candidates += older
    first_error = None
    for candidate in candidates:
        try:
            verify_checkpoint(os.path.join(load_dir, candidate))
        except CheckpointError as e:
            if not fallback:
                raise CheckpointError(f"--load {load_dir}: checkpoint {candidate} refused: {e} (--load-fallback resumes from the newest earlier complete checkpoint)") from e
            first_error = first_error or e
            log(f"[megatron-gem] --load {load_dir}: checkpoint {candidate} refused: {e}")
            continue
        if candidate != tag:
            log(f"[megatron-gem] --load {load_dir}: falling back to {candidate}, the newest checkpoint that verifies")
        return candidate
    raise CheckpointError(f"--load {load_dir}: no complete checkpoint (first refusal: {first_error})")


def agree_on_write(path: str, error: BaseException | None, *, partial: str | None = None) -> None:
    """Collective after a save's writes: if any rank's write failed, every rank raises
    CheckpointWriteError naming the path and that rank's error (no rank waits forever).
    ``partial``: the half-written tag directory, removed then (a full disk needs the space;
    it has no manifest, so nothing could ever resume from it)."""
    errors = D.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        if partial is not None and D.is_main():
            shutil.rmtree(partial, ignore_errors=True)
        raise CheckpointWriteError(f"saving checkpoint {path} failed on rank {rank}: {message}; the previous checkpoint is kept ({LATEST} was not moved)")


def commit_checkpoint(save_dir: str, tag: str, **info) -> None:
    """Collective, after every rank wrote its files of ``save_dir/tag``: the manifest (hashed
    over ranks, written last by rank 0), then ``latest``."""
    path = os.path.join(save_dir, tag)
    error = None
    try:
        write_manifest(path, share=_share(), gather=D.all_gather_object, writer=D.is_main(), extra=info)
    except OSError as e:  # ENOSPC while writing the manifest: latest must not move
        error = e
    agree_on_write(path, error, partial=path)
    D.barrier()
    if D.is_main():
        try:
            write_text_atomic(os.path.join(save_dir, LATEST), tag)
        except OSError as e:
            error = e
    agree_on_write(os.path.join(save_dir, LATEST), error)


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
    rank's RNG state; then the manifest and ``latest`` (commit_checkpoint)."""
    tag = tag_for(step)
    error = None
    try:
        engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    except OSError as e:
        # The other ranks are finishing DeepSpeed's save_checkpoint, whose collectives after
        # the writes are ZeRO-3's checkpoint_event_epilogue (re-gathering persistent
        # parameters) and a final barrier. Take part in the same ones, then agree on the error
        # (below) instead of leaving them hanging until the collective timeout.
        error = e
        if getattr(engine, "optimizer", None) is not None and hasattr(engine.optimizer, "checkpoint_event_epilogue"):
            engine.optimizer.checkpoint_event_epilogue()
        D.barrier()
    if error is None:
        try:
            torch.save(rng_state(), os.path.join(save_dir, tag, f"rng_state_rank{D.rank()}.pt"))
        except OSError as e:
            error = e
    agree_on_write(os.path.join(save_dir, tag), error, partial=os.path.join(save_dir, tag))
    commit_checkpoint(save_dir, tag, step=step, engine="deepspeed")
    return tag


def load_engine_checkpoint(engine, load_dir: str, tag: str) -> dict:
    """Resume from ``load_dir/tag`` (resolve_checkpoint chose and verified it); returns the
    client state."""
    path, client_state = engine.load_checkpoint(load_dir, tag=tag, load_module_strict=True)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag} from {load_dir}")
    rng_path = os.path.join(load_dir, tag, f"rng_state_rank{D.rank()}.pt")
    if os.path.isfile(rng_path):
        set_rng_state(torch.load(rng_path, weights_only=False))  # our own file, verified by the manifest
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
        write_manifest(tmp)
        path = replace_dir_atomic(tmp, out_dir)
    D.barrier()
    return path
