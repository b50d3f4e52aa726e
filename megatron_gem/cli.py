"""The ``megatron-gem`` command: ``megatron-gem serve MODEL_DIR ...`` (docs/serving.md)."""

from __future__ import annotations

import sys

COMMANDS = {"serve": "serve a GEM model over HTTP (OpenAI-compatible embeddings and chat)"}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        listing = "\n".join(f"  {name:8s} {what}" for name, what in COMMANDS.items())
        out = sys.stdout if argv and argv[0] in ("-h", "--help") else sys.stderr
        if argv and argv[0] not in ("-h", "--help"):
            print(f"megatron-gem: unknown command {argv[0]!r}", file=out)
        print(f"usage: megatron-gem COMMAND [ARGS]\n\ncommands:\n{listing}", file=out)
        return 0 if out is sys.stdout else 2
    from .serve.cli import main as serve

    return serve(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
