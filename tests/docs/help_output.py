"""Prints the --help text of several entry points as one JSON list, in one interpreter (torch and
the frameworks import once). Input on stdin: a JSON list of argv lists, each a script path (run
as __main__) or ``megatron-gem`` followed by its arguments; --help is appended. Run by
tests/docs/test_readme_commands.py from the repository root."""

import contextlib
import io
import json
import runpy
import sys


def help_text(argv: list[str]) -> str:
    out = io.StringIO()
    saved = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if argv[0] == "megatron-gem":
                from megatron_gem.cli import main

                main([*argv[1:], "--help"])
            else:
                sys.argv = [argv[0], *argv[1:], "--help"]
                runpy.run_path(argv[0], run_name="__main__")
    except SystemExit:
        pass
    except Exception as e:  # the test shows it beside the missing flags
        out.write(f"\n[help_output] {type(e).__name__}: {e}")
    finally:
        sys.argv = saved
    return out.getvalue()


if __name__ == "__main__":
    print(json.dumps([help_text(a) for a in json.load(sys.stdin)]))
