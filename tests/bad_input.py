"""Helpers of the bad-input tables (one per tool): what is on disk before and after, the tool's
one error line, and loaders replaced by ones that fail the test, so that a refusal is shown to
come before any heavy work by construction rather than by a clock."""

from __future__ import annotations

import hashlib
import os


def tree(root) -> dict:
    """{relative path: sha256, 'dir', or 'link->target'} of everything under ``root`` (links
    are not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if os.path.islink(full):
                out[rel] = "link->" + os.readlink(full)
            elif os.path.isdir(full):
                out[rel] = "dir"
            else:
                with open(full, "rb") as f:
                    out[rel] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(err: str, prog: str) -> str:
    """The tool's single error line in ``err`` (progress bars may share stderr; no traceback)."""
    lines = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err[-3000:]
    return lines[0]


def forbid(monkeypatch, what: str, *targets) -> None:
    """Replace each (object, attribute name) of ``targets`` by a function that fails the test
    with "``what`` started before the input was refused"."""

    def boom(*args, **kwargs):
        raise AssertionError(f"{what} started before the input was refused")

    for obj, name in targets:
        monkeypatch.setattr(obj, name, boom)
