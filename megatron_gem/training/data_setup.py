"""Training data for both phases from the same corpus (engine-independent)."""

from __future__ import annotations

from ..data import ContrastiveDataset, GEMDataLoader, make_ntp_loader, open_corpus, open_pair_corpus
from .config import DataConfig, JobConfig


def _one_or_many(paths: list[str]):
    return paths if len(paths) > 1 else paths[0]


def open_training_corpus(data: DataConfig, tokenizer):
    """Read --data (files, Megatron prefix, or hf:NAME) into one corpus."""
    return open_corpus(_one_or_many(data.paths), tokenizer, text_field=data.text_field, on_bad=data.on_bad)


def open_contrastive_pairs(data: DataConfig, tokenizer):
    """Read --contrastive-data into a PairCorpus (query field -> anchor, positive field -> positive)."""
    return open_pair_corpus(
        _one_or_many(data.pairs),
        tokenizer,
        query_field=data.query_field,
        positive_field=data.positive_field,
        negative_field=data.negative_field,
        negatives_required=data.negatives_required,
        on_bad=data.on_bad,
    )


def build_loaders(job: JobConfig, corpus, tokenizer, *, dp_rank: int, dp_size: int):
    """(NTP loader, contrastive loader or None); both endless (epochs repeat with new seeds)."""
    b, seed = job.batch, job.optimizer.seed
    ntp = make_ntp_loader(
        corpus,
        job.gem,
        b.seq_length,
        micro_batch_size=b.micro_batch_size,
        global_batch_size=b.global_batch_size,
        seed=seed,
        tokenizer=tokenizer,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )
    contrastive = None
    if job.has_phase_two:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts, positives, negatives = corpus, None, None
        if job.data.pairs:
            pairs = open_contrastive_pairs(job.data, tokenizer)
            texts, positives, negatives = pairs.queries, pairs.positives, pairs.negatives
        ds = ContrastiveDataset(
            texts,
            job.gem,
            positives=positives,
            negatives=negatives,
            chunk_size=b.contrastive_micro_batch_size,
            max_text_len=min(b.seq_length, b.contrastive_max_length),
            seq_length=b.seq_length,
            seed=seed + 1,
            pad_id=pad_id,
        )
        accum = b.global_batch_size // (b.micro_batch_size * dp_size)
        contrastive = GEMDataLoader(
            ds,
            micro_batch_size=b.contrastive_batch_size,
            global_batch_size=b.contrastive_batch_size * dp_size * accum,
            data_parallel_rank=dp_rank,
            data_parallel_size=dp_size,
        )
    return ntp, contrastive


def data_summary(corpus, contrastive_loader) -> str:
    """What reading the training data counted (read, skipped and why, tokens), pairs included."""
    text = corpus.stats.summary("read")
    dataset = contrastive_loader.dataset if contrastive_loader is not None else None
    if dataset is not None and dataset.positives is not None:
        text += f"\nphase-2 pairs ({len(dataset.corpus)}):\n" + dataset.corpus.stats.summary("pairs")
    return text
