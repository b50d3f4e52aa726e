"""README.md points at things that exist: every relative link (and its #anchor) of README and of
docs/ resolves, every command README quotes names a script, make target, sbatch script or pip
extra of this repository, and every --flag it passes is in that entry point's --help."""

import glob
import json
import os
import re
import subprocess
import sys

import pytest

from tests.docs.readme_docs import README, REPO, commands, headings, links, read

PAGES = [README, *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


@pytest.mark.parametrize("page", PAGES, ids=[os.path.relpath(p, REPO) for p in PAGES])
def test_links_resolve(page):
    broken = []
    for target in links(read(page)):
        path, _, anchor = target.partition("#")
        full = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(full):
            broken.append(f"{target} (no such file)")
        elif anchor and full.endswith(".md") and anchor not in headings(read(full)):
            broken.append(f"{target} (no heading with that anchor)")
    assert not broken, f"{os.path.relpath(page, REPO)}: broken links: {broken}"


def _entry_points():
    """(argv to print the help, flags the README passes) per quoted python/launcher command;
    checks the others (make, sbatch, pip) directly."""
    makefile = read(os.path.join(REPO, "Makefile"))
    # The extras: the keys of [project.optional-dependencies] (tomllib is 3.11+; the package supports 3.10).
    optional = read(os.path.join(REPO, "pyproject.toml")).split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = set(re.findall(r"^([\w-]+) = \[", optional, re.M))
    helps, problems = [], []
    for argv in commands(read(README)):
        tool, rest = argv[0], argv[1:]
        if tool == "make":
            problems += [f"make {t}: no such target" for t in rest if not re.search(rf"^{re.escape(t)}:", makefile, re.M)]
            continue
        if tool == "sbatch":
            script = next(a for a in rest if a.endswith(".sh"))
            if not os.path.exists(os.path.join(REPO, script)):
                problems.append(f"sbatch {script}: no such script")
            continue
        if tool == "pip":
            for spec in rest:
                for name in re.findall(r"megatron-gem\[([^\]]+)\]", spec) or re.findall(r"^\.\[([^\]]+)\]", spec):
                    problems += [f"pip extra [{e}] is not in pyproject.toml" for e in name.split(",") if e not in extras]
            continue
        if tool in ("deepspeed", "torchrun", "python", ".venv/bin/python"):
            while rest and not rest[0].endswith(".py"):
                rest = rest[1:]
            assert rest, f"no script in {' '.join(argv)}"
            tool, rest = rest[0], rest[1:]
            if not os.path.exists(os.path.join(REPO, tool)):
                problems.append(f"{tool}: no such script")
                continue
        elif tool != "megatron-gem":
            problems.append(f"{' '.join(argv)}: an entry point this test does not know")
            continue
        words = []
        for a in rest:
            if a.startswith("-"):
                break
            words.append(a)
        # train.py lists megatron-core's flags only when a parallelism flag selects that engine.
        parallel = [a for i, a in enumerate(rest) if a.endswith("model-parallel-size") or (i > 0 and rest[i - 1].endswith("model-parallel-size"))]
        flags = sorted({a.split("=")[0] for a in rest if a.startswith("--")})
        entry = ([tool, *words, *parallel], flags)
        if entry not in helps:
            helps.append(entry)
    return helps, problems


def test_readme_commands_exist_with_their_flags():
    helps, problems = _entry_points()
    assert helps, "README.md quotes no command"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    r = subprocess.run(
        [sys.executable, os.path.join(REPO, "tests", "docs", "help_output.py")],
        input=json.dumps([argv for argv, _ in helps]),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    texts = json.loads(r.stdout.splitlines()[-1])
    for (argv, flags), text in zip(helps, texts):
        known = set(re.findall(r"--[A-Za-z0-9][\w-]*", text))
        assert known, f"{' '.join(argv)} --help printed no options:\n{text[-2000:]}"
        problems += [f"{' '.join(argv[:2])}: {f} is not in its --help" for f in flags if f not in known]
    assert not problems, "README.md quotes what does not exist:\n" + "\n".join(problems)
