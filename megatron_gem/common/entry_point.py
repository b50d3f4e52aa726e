"""How every entry point (train.py, tools/*.py) ends on an error: one line ``PROG: error: ...`` on
stderr naming the flag, file or line, and an exit code that says whose fault it was (2: the
input or usage, 1: a failure during the work); the traceback only with ``--debug``. A true bug
(any other exception) keeps its traceback."""

from __future__ import annotations

import errno
import sys
from typing import Callable

from .errors import GEMError, one_line

# OSErrors that mean "this path is wrong" (the user's input), not "the work failed".
_INPUT_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG, errno.EROFS}


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback instead of one line")


def describe_os_error(e: OSError) -> str:
    """'PATH: reason' for an OSError (the path first, as compilers and linters write it)."""
    reason = e.strerror or str(e)
    if e.filename is not None and e.filename2 is not None:
        return f"{e.filename} -> {e.filename2}: {reason}"
    return f"{e.filename}: {reason}" if e.filename is not None else one_line(str(e))


def exit_code_of(e: BaseException, input_errors: tuple = ()) -> int | None:
    """The exit code an expected error gets; None for a true bug (keep its traceback)."""
    if isinstance(e, GEMError):
        return e.exit_code
    if isinstance(e, input_errors):
        return 2
    if isinstance(e, OSError):
        return 2 if e.errno in _INPUT_ERRNOS or isinstance(e, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) else 1
    return None


def message_of(e: BaseException) -> str:
    if isinstance(e, OSError) and not isinstance(e, GEMError) and (e.strerror or e.filename):
        return describe_os_error(e)
    return one_line(str(e)) or type(e).__name__


def report(prog: str, message: str, *, stream=None) -> None:
    print(f"{prog}: error: {one_line(message)}", file=stream or sys.stderr, flush=True)


def run_main(prog: str, work: Callable[[], int | None], *, debug: bool = False, input_errors: tuple = (), on_error: Callable[[], None] | None = None) -> int:
    """Run ``work`` (a tool's body, after its flags are parsed): its return value (None: 0), or
    for an expected error one line on stderr and its exit code. ``input_errors``: further
    exception types that mean bad input here (exit 2, e.g. a library's ValueError). ``debug``:
    re-raise instead (the traceback). ``on_error``: called before reporting (clean-up)."""
    try:
        code = work()
    except BaseException as e:
        code = None if isinstance(e, (KeyboardInterrupt, SystemExit)) else exit_code_of(e, input_errors)
        if code is None or debug:
            raise
        if on_error is not None:
            on_error()
        report(prog, message_of(e))
        return code
    return 0 if code is None else int(code)
