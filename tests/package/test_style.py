"""The code is formatted and lint-clean by the configuration in pyproject.toml ([tool.ruff])."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PATHS = ["megatron_gem", "tools", "tests", "train.py"]


def ruff():
    exe = os.path.join(os.path.dirname(sys.executable), "ruff")
    exe = exe if os.path.exists(exe) else shutil.which("ruff")
    if exe is None:
        pytest.fail("ruff is not installed (the dev extra: pip install -e .[dev])")
    return exe


def test_formatted():
    r = subprocess.run([ruff(), "format", "--check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, f"run `ruff format {' '.join(PATHS)}`:\n{r.stdout}{r.stderr}"


def test_lint_clean():
    r = subprocess.run([ruff(), "check", *PATHS], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, f"`ruff check` finds:\n{r.stdout}{r.stderr}"
