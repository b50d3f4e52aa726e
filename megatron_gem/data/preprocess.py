"""Text files -> Megatron ``.bin/.idx`` (data/writer.py), the library side
of ``tools/preprocess_data.py``.

Documents are read (and validated) in order in this process and tokenised in ``workers``
processes; the output holds one sequence per document, so ``IndexedCorpus`` on the result
yields exactly the documents ``InMemoryCorpus.from_texts`` would build from the same files
with the same options: both input kinds feed the same packed batches.
"""

from __future__ import annotations

import os
import sys
import tempfile

from ..common.errors import InputError, OutputExistsError
from ..common.outputs import OVERWRITE_FLAG
from .readers import DataError, iter_documents
from .stats import DataStats
from .tokenization import tokenize_stream
from .writer import IndexedWriter


def indexed_prefix(output_prefix: str, text_field: str = "text") -> str:
    """Megatron's naming: ``{output_prefix}_{json_key}_document``."""
    return f"{output_prefix}_{text_field}_document"


def check_output_prefix(output_prefix: str, text_field: str = "text", *, overwrite: bool = False) -> str:
    """Before any work: the prefix of the files ``preprocess_to_indexed`` writes, refused (naming
    --output-prefix) when its directory cannot be made or written, or when the .bin/.idx exist
    and ``overwrite`` is not given."""
    prefix = indexed_prefix(output_prefix, text_field)
    parent = os.path.dirname(os.path.abspath(prefix))
    probe = parent
    while not os.path.isdir(probe):
        if os.path.lexists(probe):
            raise InputError(f"--output-prefix {output_prefix}: {probe} is not a directory")
        probe = os.path.dirname(probe)
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"--output-prefix {output_prefix}: cannot write in {probe} (permission denied)")
    for suffix in (".bin", ".idx"):
        path = prefix + suffix
        if os.path.lexists(path) and (os.path.isdir(path) or not os.path.exists(path)):
            raise InputError(f"--output-prefix {output_prefix}: {path} is a directory or a dangling link")
        if os.path.lexists(path) and not overwrite:
            raise OutputExistsError(f"--output-prefix {output_prefix}: {path} exists; choose another prefix or pass {OVERWRITE_FLAG} to replace it")
    return prefix


def preprocess_to_indexed(
    inputs,
    tokenizer,
    output_prefix: str,
    *,
    text_field: str = "text",
    txt_unit: str = "document",
    on_bad: str = "error",
    max_chars: int | None = None,
    workers: int = 1,
    batch_size: int = 512,
    add_special_tokens: bool = True,
    append_eod: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[str, DataStats]:
    """Tokenise ``inputs`` (paths, directories, globs) into ``{output_prefix}_{text_field}_document``.

    Returns (path prefix written, stats). The files are written under fresh temporary names
    beside the target and renamed when complete: on an error nothing is left behind and an
    existing pair (replaced only with ``overwrite``, see check_output_prefix) is untouched.
    Checks the output prefix before reading anything.
    """
    stats = DataStats()
    prefix = check_output_prefix(output_prefix, text_field, overwrite=overwrite)
    docs = iter_documents(inputs, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats)
    texts = (d.text for d in docs)
    tokens = tokenize_stream(texts, tokenizer, batch_size=batch_size, num_proc=workers, add_special_tokens=add_special_tokens, append_eod=append_eod)
    parent = os.path.dirname(os.path.abspath(prefix))
    created = parent  # the topmost directory this call creates (removed again on an error)
    while not os.path.isdir(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = None if os.path.isdir(parent) else created
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(prefix)}.tmp-", dir=os.path.dirname(os.path.abspath(prefix)))
    os.close(fd)  # a unique name; the writer creates tmp.bin / tmp.idx beside it
    writer = IndexedWriter(tmp, len(tokenizer))
    try:
        if progress:
            from tqdm import tqdm

            tokens = tqdm(tokens, desc="tokenising", unit=" docs", file=sys.stderr, mininterval=1.0)
        for t in tokens:
            writer.add(t)
            stats.tokens_in += int(t.shape[0])
        if writer.documents == 0:
            raise DataError(f"{inputs}: no usable documents ({stats.report('preprocess')})")
        writer.close()
        # Two renames: a job opening the pair between them would see one old and one new file
        # (only when --overwrite-output-dir replaces a pair something is reading).
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    except BaseException:
        writer.abort()
        for suffix in ("", ".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        if created is not None:
            for dirpath, _, _ in sorted(os.walk(created), key=lambda d: -len(d[0])):
                if not os.listdir(dirpath):
                    os.rmdir(dirpath)
        raise
    if os.path.exists(tmp):
        os.remove(tmp)
    stats.tokens_out = stats.tokens_in  # written as is; GEM layouts are applied when loading
    return prefix, stats
