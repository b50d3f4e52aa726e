"""Atomic writes. A reader (a resuming job, a loader, another rank) sees the old file or the new
one, never a half-written mix: write a temporary file beside the target, fsync it, rename.
Whole directories: outputs.py."""

from __future__ import annotations

import json
import os


def write_text_atomic(path: str, text: str) -> None:
    _write_atomic(path, text, "w")


def write_bytes_atomic(path: str, data: bytes) -> None:
    _write_atomic(path, data, "wb")


def _write_atomic(path: str, data, mode: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (ENOSPC, say) must not leave its temporary file behind.
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
