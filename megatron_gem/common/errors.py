"""Errors that mean "the user's input is wrong", shared by every layer; entry points turn them
into one line ``train.py: error: ...`` (exit 2) instead of a traceback."""


class ModelLoadError(ValueError):
    """A model path or checkpoint that cannot be used; the message names the argument."""
