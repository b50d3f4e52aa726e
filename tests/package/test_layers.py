"""The house rules of docs/architecture.md, checked on the source: every import inside
megatron_gem points down the layers, and the method (gem/) imports no framework."""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "megatron_gem")

# Lower number = lower layer; a module may import its own layer and those below.
LAYERS = {
    "common": 0,
    "gem": 1,
    "attention": 2,
    "kernels": 2,
    "data": 3,
    "hf": 4,
    "mcore": 4,
    "embedder": 4,
    "packaged_models": 4,
    "distill": 4,
    "training": 5,
    "eval": 6,
    "integrations": 6,
    "serve": 6,
    "testing": 7,
    "cli": 7,
    "__init__": 7,
}


def room(path: str) -> str:
    rel = os.path.relpath(path, ROOT)
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".py") else first


def imports(path: str):
    """(imported room, line) for every import of a megatron_gem module in ``path``."""
    tree = ast.parse(open(path).read(), path)
    package = os.path.relpath(os.path.dirname(path), os.path.dirname(ROOT)).split(os.sep)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            else:
                target = (node.module or "").split(".")
            if target[0] != "megatron_gem":
                continue
            names = target[1:] or [a.name for a in node.names]
            if len(target) == 1:  # from megatron_gem import x
                for a in node.names:
                    yield a.name, node.lineno
            elif names:
                yield names[0], node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "megatron_gem" and len(parts) > 1:
                    yield parts[1], node.lineno


def sources():
    for dirpath, dirnames, names in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in names:
            if name.endswith(".py"):
                yield os.path.join(dirpath, name)


def test_the_package_holds_no_symlink():
    """Every file of the package lives in its tree (a symlinked room installs or copies differently
    from a checkout)."""
    links = [os.path.join(d, n) for d, dirs, names in os.walk(ROOT) for n in dirs + names if os.path.islink(os.path.join(d, n))]
    assert not links, links


def test_every_room_has_a_layer():
    rooms = {room(p) for p in sources()}
    assert rooms <= set(LAYERS), rooms - set(LAYERS)


def test_imports_point_down():
    upward = []
    for path in sources():
        mine = LAYERS[room(path)]
        for target, line in imports(path):
            if target in LAYERS and LAYERS[target] > mine:
                upward.append(f"{os.path.relpath(path, ROOT)}:{line} imports {target} (layer {LAYERS[target]} > {mine})")
    assert not upward, "\n".join(upward)


@pytest.mark.parametrize("framework", ["deepspeed", "megatron", "transformers", "triton"])
def test_the_method_imports_no_framework(framework):
    for path in sources():
        if room(path) != "gem":
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            mods = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and not node.level
                else []
            )
            assert not any(m.split(".")[0] == framework for m in mods), f"{path} imports {framework}"
