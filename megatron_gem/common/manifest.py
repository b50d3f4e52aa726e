"""Checkpoint manifests: which files a complete checkpoint has, their sizes and sha256.

``manifest.json`` is written LAST, after every file of the checkpoint (every rank's) is on
disk; a directory without it is an incomplete save. ``verify`` refuses a checkpoint whose
file is missing, truncated (size) or changed (sha256), naming the file.

Why sha256 and not a cheaper digest: the size alone already catches truncation; a digest is
there for bit flips and partial overwrites, and sha256 (SHA-NI) hashes ~1 GB/s per core on
our CPU machine (tools/bench_digest.py), close enough to crc32's 2-3 GB/s once the shared file
system's read speed is the limit. Engines split the files over ranks (``share``), so each rank hashes
1/world of the checkpoint, mostly still in its page cache right after the save.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from typing import Callable

from .errors import GEMError
from .files import write_json_atomic

MANIFEST = "manifest.json"
VERSION = 1
_CHUNK = 1 << 24


class CheckpointError(GEMError, RuntimeError):
    """A damaged or incomplete checkpoint; the message names the directory and the file (exit 1:
    the data was there and is broken, not a wrong argument)."""


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def list_files(root: str) -> list[str]:
    """Every file under ``root`` (relative paths, sorted), except the manifest itself and the
    temporary files of atomic writes."""
    out = []
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            if rel == MANIFEST or ".tmp." in name:
                continue
            out.append(rel)
    return sorted(out)


def _mine(items: list, share: tuple[int, int]) -> list:
    rank, world = share
    return items[rank::world]


def _gathered(part, gather: Callable | None) -> list:
    return [part] if gather is None else gather(part)


def write_manifest(
    root: str,
    *,
    share: tuple[int, int] = (0, 1),
    gather: Callable | None = None,
    writer: bool = True,
    extra: dict | None = None,
    digests: bool = True,
) -> dict:
    """Hash this rank's share of ``root``'s files; ``gather`` (an all_gather of Python objects,
    None in one process) collects every rank's part; the ``writer`` rank writes manifest.json.
    Call after every file is written (collective when ``gather`` is given). ``digests=False``:
    sizes only (the streaming converters: hashing would add half their run time), so
    ``verify`` catches missing and truncated files there, not changed bytes."""
    # One listing (the writer's), shared: on a network file system another rank's directory
    # listing may lag behind, and the shares must be cut from the same list.
    files = list_files(root) if gather is None else next(f for f in gather(list_files(root) if writer else None) if f is not None)
    part = {}
    for rel in _mine(files, share):
        path = os.path.join(root, rel)
        part[rel] = {"size": os.path.getsize(path), "sha256": sha256_of(path)} if digests else {"size": os.path.getsize(path)}
    entries: dict = {}
    for p in _gathered(part, gather):
        entries.update(p)
    manifest = {"version": VERSION, "files": dict(sorted(entries.items())), **(extra or {})}
    if writer:
        write_json_atomic(os.path.join(root, MANIFEST), manifest)
    return manifest


def read_manifest(root: str) -> dict:
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: missing: the save did not finish (or the checkpoint predates manifests)")
    try:
        with open(path) as f:
            manifest = json.load(f)
        files = manifest["files"]
        if not isinstance(files, dict) or not all(isinstance(v, dict) and isinstance(v.get("size"), int) for v in files.values()):
            raise TypeError("'files' is not a mapping of file names to sizes")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from e
    return manifest | {"files": files}


def problems(root: str, manifest: dict, names: list[str], *, digests: bool = True) -> list[str]:
    """What is wrong with ``names`` (manifest entries) of ``root``: one line per bad file.
    ``digests=False``: presence and sizes only (no file is read)."""
    bad = []
    for rel in names:
        entry, path = manifest["files"][rel], os.path.join(root, rel)
        if not os.path.isfile(path):
            bad.append(f"{path}: missing (listed in {MANIFEST})")
            continue
        size = os.path.getsize(path)
        if size != entry["size"]:
            bad.append(f"{path}: {size} bytes, {MANIFEST} says {entry['size']} (truncated or overwritten)")
        elif digests and "sha256" in entry and sha256_of(path) != entry["sha256"]:
            bad.append(f"{path}: content does not match its sha256 in {MANIFEST} (damaged)")
    return bad


def verify(root: str, *, share: tuple[int, int] = (0, 1), gather: Callable | None = None, digests: bool = True) -> dict:
    """Raise CheckpointError naming the first bad file of ``root`` (every rank raises the same
    one when ``gather`` is given); return the manifest when all is well. ``digests=False``:
    missing and truncated files only (the converters, which read just part of a checkpoint:
    hashing all of it would cost more than the conversion)."""
    manifest = read_manifest(root)
    names = sorted(manifest["files"])
    bad = sorted(b for part in _gathered(problems(root, manifest, _mine(names, share), digests=digests), gather) for b in part)
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(bad[0] + more)
    return manifest


@contextmanager
def rewriting(root: str):
    """Edit files of a finished directory in place and keep its manifest true: a manifest.json
    there is verified first (a damaged checkpoint is refused, not re-blessed) and rewritten
    after the edit, keeping its extra keys. A directory without one is left without one."""
    if not os.path.isfile(os.path.join(root, MANIFEST)):
        yield
        return
    before = verify(root)
    yield
    write_manifest(root, extra={k: v for k, v in before.items() if k not in ("version", "files")})
