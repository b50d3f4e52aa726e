"""Data pipeline: corpora -> GEM pieces (seeded layout per document) -> packed rows -> batches.

The batch contract (every field int64 [B, seq_length]): ``input_ids``, ``labels``
(gem.layout.next_token_labels), ``position_ids`` (restart per document), ``doc_ids`` (unique
within the micro-batch, padding PAD_DOC_ID, padding only at a row's end), ``roles``.
Contrastive micro-batches add ``num_texts`` (N): doc ids 0..N-1 anchors, N+j positive of j
(a dropout view of text j, or its paired text when trained on pairs).
See docs/data.md.
"""

from .blend import BlendedDataset, CorpusBlend, blending_indices, largest_remainder_counts, reference_blending_indices
from .corpus import (
    IndexedCorpus,
    InMemoryCorpus,
    PairCorpus,
    open_corpus,
    open_pair_corpus,
)
from .datasets import (
    ContrastiveDataset,
    EpochPlan,
    PackedDataset,
    StreamingPackedDataset,
)
from .loader import GEMDataLoader, MegatronBatchSampler, make_ntp_loader
from .packing import BestFitPacker, assemble_row, collate_rows, pack_lengths, pack_texts
from .readers import (
    DataError,
    Document,
    iter_documents,
    iter_hf_documents,
    resolve_paths,
)
from .samples import PiecePlan, SampleBuilder, epoch_order
from .stats import DataStats
from .texts import RawTexts, read_texts
from .tokenization import tokenize_stream, tokenize_texts
from .writer import IndexedWriter

__all__ = [
    "BestFitPacker",
    "BlendedDataset",
    "CorpusBlend",
    "ContrastiveDataset",
    "RawTexts",
    "read_texts",
    "DataError",
    "DataStats",
    "Document",
    "EpochPlan",
    "GEMDataLoader",
    "IndexedCorpus",
    "IndexedWriter",
    "InMemoryCorpus",
    "MegatronBatchSampler",
    "PackedDataset",
    "PairCorpus",
    "PiecePlan",
    "SampleBuilder",
    "StreamingPackedDataset",
    "assemble_row",
    "blending_indices",
    "collate_rows",
    "epoch_order",
    "iter_documents",
    "iter_hf_documents",
    "largest_remainder_counts",
    "make_ntp_loader",
    "open_corpus",
    "open_pair_corpus",
    "pack_lengths",
    "pack_texts",
    "reference_blending_indices",
    "resolve_paths",
    "tokenize_stream",
    "tokenize_texts",
]
