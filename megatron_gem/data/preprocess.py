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

from .readers import DataError, iter_documents
from .stats import DataStats
from .tokenization import tokenize_stream
from .writer import IndexedWriter


def indexed_prefix(output_prefix: str, text_field: str = "text") -> str:
    """Megatron's naming: ``{output_prefix}_{json_key}_document``."""
    return f"{output_prefix}_{text_field}_document"


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
) -> tuple[str, DataStats]:
    """Tokenise ``inputs`` (paths, directories, globs) into ``{output_prefix}_{text_field}_document``.

    Returns (path prefix written, stats). On an error no partial output is left behind.
    """
    stats = DataStats()
    prefix = indexed_prefix(output_prefix, text_field)
    docs = iter_documents(inputs, text_field=text_field, txt_unit=txt_unit, on_bad=on_bad, max_chars=max_chars, stats=stats)
    texts = (d.text for d in docs)
    tokens = tokenize_stream(texts, tokenizer, batch_size=batch_size, num_proc=workers, add_special_tokens=add_special_tokens, append_eod=append_eod)
    writer = IndexedWriter(prefix, len(tokenizer))
    try:
        if progress:
            from tqdm import tqdm

            tokens = tqdm(tokens, desc="tokenising", unit=" docs", file=sys.stderr, mininterval=1.0)
        for t in tokens:
            writer.add(t)
            stats.tokens_in += int(t.shape[0])
        if writer.documents == 0:
            raise DataError(f"{inputs}: no usable documents ({stats.summary('preprocess')})")
        writer.close()
    except BaseException:
        writer.abort()
        for suffix in (".bin", ".idx"):
            if os.path.exists(prefix + suffix):
                os.remove(prefix + suffix)
        raise
    stats.tokens_out = stats.tokens_in  # written as is; GEM layouts are applied when loading
    return prefix, stats
