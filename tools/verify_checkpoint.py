#!/usr/bin/env python
"""Check a checkpoint directory against its manifest.json (every listed file present, its
size and sha256): a train.py checkpoint (SAVE/global_stepN), its HF export (SAVE/hf), or a
whole --save directory (then the checkpoint ``latest`` names, or every one with --all).

    python tools/verify_checkpoint.py runs/gem1b/global_step1000
    python tools/verify_checkpoint.py runs/gem1b --all

Exit 0 when everything verifies; 1 naming the first bad file of each refused checkpoint; 2 (one
line on stderr) for a path that is not a directory.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_gem.common.entry_point import add_debug_flag, run_main  # noqa: E402
from megatron_gem.common.errors import InputError  # noqa: E402
from megatron_gem.common.manifest import MANIFEST, CheckpointError, verify  # noqa: E402
from megatron_gem.training.checkpoint import read_latest, saved_tags  # noqa: E402


def targets(path: str, every: bool) -> list[str]:
    if os.path.isfile(os.path.join(path, MANIFEST)) or not os.path.isdir(path):
        return [path]
    if every:
        found = [os.path.join(path, t) for t in saved_tags(path)]
        if os.path.isdir(os.path.join(path, "hf")):
            found.append(os.path.join(path, "hf"))
        return found or [path]
    tag = read_latest(path)
    return [os.path.join(path, tag)] if tag else [path]


def check(args) -> int:
    if os.path.lexists(args.path) and not os.path.exists(args.path):
        raise InputError(f"{args.path}: a symbolic link to nowhere (or a link loop)")
    if not os.path.exists(args.path):
        raise InputError(f"{args.path}: no such directory")
    if not os.path.isdir(args.path):
        raise InputError(f"{args.path}: is a file; give a checkpoint directory or a --save directory")
    bad = 0
    try:
        dirs = targets(args.path, args.all)
    except CheckpointError as e:
        print(f"REFUSED {args.path}: {e}")
        return 1
    for d in dirs:
        try:
            m = verify(d)
        except CheckpointError as e:
            print(f"REFUSED {d}: {e}")
            bad += 1
            continue
        size = sum(f["size"] for f in m["files"].values())
        print(f"ok {d}: {len(m['files'])} files, {size / 1e9:.3f} GB")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="verify_checkpoint", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="a checkpoint directory, or a --save directory")
    p.add_argument("--all", action="store_true", help="with a --save directory: every global_stepN and hf/, not just latest")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return run_main("verify_checkpoint", lambda: check(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
