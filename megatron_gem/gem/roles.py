"""The role of each token in a GEM document (docs/method.md, "Roles and layouts")."""

from enum import IntEnum


class Role(IntEnum):
    """Per-token role. Stored as small integers in ``roles`` tensors."""

    PREFIX = 0  # ordinary text; a document without special tokens is all PREFIX
    SPECIAL = 1  # the K inserted summary tokens
    SUFFIX = 2  # text after the special tokens; cut off from the PREFIX


# Label value ignored by the loss (the torch / HF convention).
IGNORE_INDEX = -100
# doc_id given to padding positions. Padding is its own document, so it never leaks into real
# documents and every padding token still sees itself (no NaN rows).
PAD_DOC_ID = -1
