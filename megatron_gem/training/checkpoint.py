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

import os
import random
import re
import shutil

import numpy as np
import torch

from ..common import distributed as D
from ..common.files import write_text_atomic
from ..common.manifest import CheckpointError, read_manifest, verify, write_manifest

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
                raise CheckpointError(
                    f"--load {load_dir}: checkpoint {candidate} refused: {e} (--load-fallback resumes from the newest earlier complete checkpoint)"
                ) from e
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


_ROTATING = re.compile(r"^global_step\d+\.rotating$")


def _ours(path: str, engine: str) -> bool:
    """A complete checkpoint a save of ``engine`` wrote (commit_checkpoint's manifest extras)."""
    try:
        manifest = read_manifest(path)
    except CheckpointError:
        return False
    return manifest.get("engine") == engine and manifest.get("step") == int(_TAG.match(os.path.basename(path)).group(1))


def rotate_checkpoints(save_dir: str, keep: int, *, newest: str, engine: str, log=print) -> list[str]:
    """--save-total-limit (HF Trainer's ``save_total_limit``): keep the newest ``keep``
    checkpoints of ``save_dir`` and delete the older ones; returns the tags deleted. Call on
    one rank, after ``commit_checkpoint`` of ``newest`` returned on every rank (its manifest
    hashed over every file, ``latest`` moved, both agreed), then barrier.

    Never deleted: what ``latest`` names (read again here), ``newest``, a ``global_step{N}``
    without a manifest (a save still being written, or killed: not a complete checkpoint, so
    not one this rule counts), a step newer than ``newest`` (an earlier leg's save that a
    --load-fallback resume went past: the user decides), and anything not named
    ``global_step{N}`` or whose manifest was not written by a save of this engine at step N
    (foreign files and directories). Before anything is deleted, ``newest``
    must read as complete (its manifest lists files that all exist with their sizes). A
    deletion renames the directory to ``global_step{N}.rotating`` first (no longer a tag
    --load or --load-fallback could pick) and removes it then; a leftover of a killed
    rotation is removed by the next one. A failed deletion is printed, not fatal."""
    newest_step = int(_TAG.match(newest).group(1))
    latest = read_latest(save_dir)
    path = os.path.join(save_dir, newest)
    try:
        manifest = read_manifest(path)
        bad = [
            rel for rel, e in manifest["files"].items() if not os.path.isfile(os.path.join(path, rel)) or os.path.getsize(os.path.join(path, rel)) != e["size"]
        ]
    except CheckpointError as e:
        bad = [str(e)]
    if bad or latest != newest:
        log(f"[megatron-gem] --save-total-limit: nothing deleted ({newest} is not complete: {bad[:1]}; latest names {latest})")
        return []
    complete = [t for t in saved_tags(save_dir) if int(_TAG.match(t).group(1)) <= newest_step and _ours(os.path.join(save_dir, t), engine)]
    doomed = [t for t in complete[keep:] if t not in (latest, newest)]
    leftovers = [os.path.join(save_dir, n) for n in os.listdir(save_dir) if _ROTATING.match(n) and os.path.isdir(os.path.join(save_dir, n))]
    deleted = []
    for tag in doomed:
        aside = os.path.join(save_dir, tag + ".rotating")
        try:
            os.replace(os.path.join(save_dir, tag), aside)
        except OSError as e:
            log(f"[megatron-gem] --save-total-limit: could not delete {os.path.join(save_dir, tag)}: {e}")
            continue
        deleted.append(tag)
        leftovers.append(aside)
    for aside in leftovers:
        try:
            shutil.rmtree(aside)
        except OSError as e:
            log(f"[megatron-gem] --save-total-limit: could not delete {aside}: {e}")
    if deleted:
        kept = [t for t in complete if t not in deleted]
        log(f"[megatron-gem] --save-total-limit {keep}: deleted {', '.join(deleted)}; kept {', '.join(kept)}")
    return deleted


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


def load_trainable_only(src: dict, dst: torch.nn.Module) -> None:
    """DeepSpeed's module load (``custom_load_fn``) for summary-mode checkpoints, saved without the
    frozen base (``exclude_frozen_parameters``): the frozen parameters keep the values loaded from
    the base checkpoint; anything else missing, or anything unexpected, is an error, as a strict
    load would say. Used by train.py's DeepSpeed engine and by GEMTrainer under DeepSpeed."""
    result = dst.load_state_dict(src, strict=False)
    frozen = {n for n, p in dst.named_parameters() if not p.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise CheckpointError(f"summary-mode checkpoint does not match the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
