"""The errors an entry point reports in one line instead of a traceback, shared by every layer.

Every expected error derives from :class:`GEMError`, so a command line catches one family
(common/entry_point.py ``run_main``). ``exit_code`` says what went wrong: 2 the user's input or usage
(a wrong flag, path, file, model folder, record), 1 a failure during the work (a damaged
checkpoint, a write that failed, a non-finite loss). Subclasses elsewhere: ``CheckpointError``
(manifest.py), ``DataError`` (data/readers.py), ``ArgumentError`` (training/args.py),
``CheckpointWriteError`` and ``NonFiniteError`` (training/)."""

from __future__ import annotations


class GEMError(Exception):
    """An expected error; its message names the flag, file or line at fault."""

    exit_code = 1


class InputError(GEMError, ValueError):
    """The user's input is wrong (exit 2). A ValueError too, for callers that catch those."""

    exit_code = 2


class ModelLoadError(InputError):
    """A model path or checkpoint that cannot be used; the message names the argument."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model path that does not exist (a FileNotFoundError too, for callers that catch those)."""


class OutputExistsError(InputError):
    """An output target that holds something this tool did not write (see outputs.replace_dir_atomic)."""


class OutputWriteError(GEMError):
    """Writing an output failed part way (a full disk, an I/O error); nothing was left behind
    (exit 1: the work failed, not the arguments)."""


def one_line(message: str) -> str:
    """``message`` on one line (a nested error's newlines become ' | ')."""
    return " | ".join(part.strip() for part in str(message).splitlines() if part.strip())
