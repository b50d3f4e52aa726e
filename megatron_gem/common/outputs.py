"""Output directories that never cost the user a file: what a tool may replace, and how.

The rule every tool that writes a directory follows (the converter, add_gem_tokens, the HF
exports, eval_mteb / eval_lm ``--output``, train.py ``--save``):

* a target that does not exist, or is an empty directory, is written;
* any other target is refused before the work starts (``check_output_dir``, naming it), unless
  the user passes ``--overwrite-output-dir`` (HF Trainer's ``--overwrite_output_dir``);
* even then only what the target's own ``manifest.json`` lists (the files a megatron-gem tool
  wrote there) is replaced: every other file is kept where it is (``replace_dir_atomic`` links
  it into the new directory before the swap), and a kept file whose name the new output also
  uses is refused rather than overwritten;
* the new directory is built beside the target under a fresh hidden name and swapped in by
  rename, so a reader sees the old directory or the new one, never a mix; temporary and
  set-aside names are new each time, so nothing already there is ever removed by name.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from contextlib import contextmanager

from .entry_point import describe_os_error
from .errors import GEMError, InputError, OutputExistsError, OutputWriteError
from .manifest import MANIFEST, CheckpointError, read_manifest

OVERWRITE_FLAG = "--overwrite-output-dir"
OVERWRITE_HELP = (
    "replace an existing, non-empty output (HF Trainer's --overwrite_output_dir); even then only the files its manifest.json lists "
    "(what megatron-gem wrote there) are replaced, any other file is kept"
)


def add_overwrite_flag(parser, help: str = OVERWRITE_HELP) -> None:
    parser.add_argument(OVERWRITE_FLAG, action="store_true", help=help)


def is_empty_dir(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def nearest_existing_parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    return parent


def check_output_dir(path: str, flag: str, *, overwrite: bool = False) -> None:
    """Before any work: raise (naming ``flag`` and ``path``) when ``path`` cannot be this tool's
    output directory: a file, a dangling link or a link loop, a directory that is not empty
    (unless ``overwrite``), or a place that cannot be written."""
    if os.path.lexists(path) and not os.path.exists(path):
        raise InputError(f"{flag} {path}: a symbolic link to nowhere (or a link loop); give a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a file; expected a directory (this tool never replaces a file it did not write)")
    if os.path.isdir(path):
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{flag} {path}: not writable (permission denied)")
        if not overwrite and not is_empty_dir(path):
            raise OutputExistsError(
                f"{flag} {path}: exists and is not empty; choose a new directory, or pass {OVERWRITE_FLAG} to replace what an earlier "
                f"megatron-gem run wrote there ({MANIFEST} lists it; other files are kept)"
            )
        return
    parent = nearest_existing_parent(path)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: cannot create it ({parent} is not writable)")


def check_apart(out_flag: str, out: str, in_flag: str, src: str) -> None:
    """Refuse an output that is the input, lies inside it or holds it: replacing it would
    replace (or hide) what is being read."""
    a, b = os.path.realpath(out), os.path.realpath(src)
    if a == b or a.startswith(b + os.sep) or b.startswith(a + os.sep):
        raise InputError(f"{out_flag} {out}: is {in_flag} {src}, or inside it, or around it; write the output elsewhere")


def fresh_tmp_dir(out_dir: str) -> str:
    """A new, empty directory beside ``out_dir`` (hidden, unique name) to build the output in;
    on the same file system, so the finished one is renamed into place."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)


@contextmanager
def removed_on_error(tmp: str, out_dir: str):
    """Remove the unfinished output ``tmp`` if the block fails: a failed tool leaves nothing
    behind. An OSError (ENOSPC, EIO) becomes OutputWriteError naming ``out_dir``."""
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, GEMError):
            raise
        raise OutputWriteError(f"{out_dir}: writing it failed ({describe_os_error(e)}); nothing was left there") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def building_dir(out_dir: str):
    """``fresh_tmp_dir(out_dir)`` to build the output in, removed again if the block fails
    (removed_on_error)."""
    with removed_on_error(fresh_tmp_dir(out_dir), out_dir) as tmp:
        yield tmp


def listed_files(directory: str) -> set[str]:
    """What a megatron-gem tool wrote in ``directory``: its manifest's files and the manifest
    itself; empty when there is no readable manifest (then nothing there is ours)."""
    try:
        return set(read_manifest(directory)["files"]) | {MANIFEST}
    except CheckpointError:
        return set()


def walk_entries(root: str) -> tuple[list[str], list[str]]:
    """(files, directories) under ``root``, relative; links count as files, never followed."""
    files, dirs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in list(dirnames):
            full = os.path.join(dirpath, name)
            if os.path.islink(full):  # os.walk lists a link to a directory among the directories
                dirnames.remove(name)
                files.append(os.path.relpath(full, root))
            else:
                dirs.append(os.path.relpath(full, root))
        files += [os.path.relpath(os.path.join(dirpath, n), root) for n in filenames]
    return sorted(files), sorted(dirs)


def _keep_foreign_files(old: str, new: str, flag: str) -> None:
    """Hard-link every file of ``old`` its manifest does not list into ``new`` (same names):
    the swap then keeps them, and removing the old directory removes only our own files."""
    ours = listed_files(old)
    files, dirs = walk_entries(old)
    foreign = [rel for rel in files if rel not in ours]
    new_files, _ = walk_entries(new)
    taken = set(new_files)
    # Directories to keep: the user's empty ones, and every one that holds a foreign file.
    keep = {rel for rel in dirs if not os.listdir(os.path.join(old, rel))}
    for rel in foreign:
        parent = os.path.dirname(rel)
        while parent:
            keep.add(parent)
            parent = os.path.dirname(parent)
    for rel in sorted(keep):
        if rel in taken:
            raise OutputExistsError(
                f"{flag} {os.path.join(old, rel)}/: holds files megatron-gem did not write and the new output has a file of that name; move it away"
            )
        os.makedirs(os.path.join(new, rel), exist_ok=True)
    for rel in foreign:
        if rel in taken:
            raise OutputExistsError(
                f"{flag} {os.path.join(old, rel)}: not written by megatron-gem ({MANIFEST} does not list it) and the new output has a file of "
                "that name; it is never overwritten: move it away"
            )
        target = os.path.join(new, rel)
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.link(os.path.join(old, rel), target, follow_symlinks=False)
        except OSError as e:
            raise OutputExistsError(
                f"{flag} {os.path.join(old, rel)}: not written by megatron-gem and cannot be kept in place ({e.strerror}); move it away"
            ) from e


def replace_dir_atomic(tmp: str, out_dir: str, *, overwrite: bool = False, flag: str = "output") -> str:
    """Swap the finished directory ``tmp`` (from ``fresh_tmp_dir``) in as ``out_dir``.

    ``out_dir`` absent or empty: one rename. Otherwise only with ``overwrite``: the files its
    manifest lists are replaced, every other file is kept (see the module docstring); without
    ``overwrite``, OutputExistsError. On a refusal ``tmp`` is removed and ``out_dir`` is as it was.
    ``flag``: how the message names the target."""
    try:
        if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
            raise InputError(f"{flag} {out_dir}: is not a directory; it is never replaced")
        if os.path.isdir(out_dir) and not is_empty_dir(out_dir):
            if not overwrite:
                raise OutputExistsError(f"{flag} {out_dir}: exists and is not empty; pass {OVERWRITE_FLAG} to replace what megatron-gem wrote there")
            _keep_foreign_files(out_dir, tmp, flag)
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-", dir=os.path.dirname(os.path.abspath(out_dir)))
            os.replace(out_dir, aside)  # onto the empty directory just made: a rename, atomic
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(aside, out_dir)
                raise
            # Only our own files are left to remove: every other file has a second link in out_dir.
            shutil.rmtree(aside, ignore_errors=True)
            return out_dir
        try:
            os.replace(tmp, out_dir)  # also onto an empty directory
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # someone wrote there meanwhile
                raise OutputExistsError(f"{flag} {out_dir}: files appeared there during the work; nothing was replaced") from e
            raise
        return out_dir
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
