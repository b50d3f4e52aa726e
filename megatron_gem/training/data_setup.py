"""Training data for both phases from the same corpus (engine-independent)."""

from __future__ import annotations

import os
import sys

from ..common import distributed as D
from ..data import (
    BlendedDataset,
    ContrastiveDataset,
    CorpusBlend,
    DataError,
    GEMDataLoader,
    PairCorpus,
    RawTexts,
    make_ntp_loader,
    open_corpus,
    open_pair_corpus,
    read_texts,
)
from ..data.datasets import SHORT_FOR_SUMMARY
from ..data.split import CorpusView, split_corpus
from ..data.token_cache import build_or_reuse, cacheable, open_cached
from ..data.tokenization import PromptedText
from ..gem.template import EmbedTemplate
from .config import DataConfig, JobConfig


def _one_or_many(paths: list[str]):
    return paths if len(paths) > 1 else paths[0]


def data_cache_dir(job: JobConfig) -> str:
    """--data-cache-path, else <--save>/data_cache: --save is on a file system every rank
    sees (the checkpoint protocol already needs that: ranks hash each other's files)."""
    return job.data.cache_path or os.path.join(job.checkpoint.save, "data_cache")


def open_documents(source, tokenizer, data: DataConfig, cache_dir: str | None):
    """One corpus of documents. Text input with a ``cache_dir`` is tokenised once, by global
    rank 0, into a .bin/.idx cache there (data/token_cache.py; reused when one with the same key
    exists), while the other ranks wait; every rank then memory-maps it. Its start-up line
    travels as ``corpus.cache_note`` (rank 0 says on stderr when it starts tokenising). Other input (a Megatron prefix, hf:NAME) opens as before.
    Collective when cached."""
    if cache_dir is None or not cacheable(source):
        return open_corpus(source, tokenizer, text_field=data.text_field, on_bad=data.on_bad)
    entry = D.run_on_main(
        lambda: build_or_reuse(
            source, tokenizer, cache_dir, log=lambda line: print(line, file=sys.stderr, flush=True), text_field=data.text_field, on_bad=data.on_bad
        )
    )
    corpus, error = None, None
    try:
        corpus = open_cached(entry)
    except (OSError, ValueError) as e:
        error = f"rank {D.rank()}: {e}"
    failed = [e for e in D.all_gather_object(error) if e is not None]
    if failed:
        raise DataError(f"--data-cache-path {cache_dir}: {failed[0]} (rank 0 wrote the cache there: it must be on a file system every rank sees)")
    corpus.cache_note = entry.note(source)
    return corpus


def open_training_corpus(data: DataConfig, tokenizer, cache_dir: str | None = None):
    """Read --data (files, Megatron prefix, or hf:NAME) into one corpus, or --data-path's
    sources into a CorpusBlend (one corpus each; make_ntp_loader blends their rows); text
    input through the cache in ``cache_dir`` (open_documents)."""
    if data.blend_paths:
        corpora = [open_documents(path, tokenizer, data, cache_dir) for path in data.blend_paths]
        return CorpusBlend(corpora, data.blend_paths, data.blend_weights)
    return open_documents(_one_or_many(data.paths), tokenizer, data, cache_dir)


def open_contrastive_pairs(data: DataConfig, tokenizer, query_prompt: str = ""):
    """Read --contrastive-data into a PairCorpus (query field -> anchor, positive field -> positive,
    optional hard negatives; --contrastive-query-prompt prepended to the query text); with a
    teacher (--contrastive-teacher) the pairs' strings travel too (``texts``)."""
    return open_pair_corpus(
        _one_or_many(data.pairs),
        tokenizer,
        query_field=data.query_field,
        positive_field=data.positive_field,
        negative_field=data.negative_field,
        negatives_required=data.negatives_required,
        on_bad=data.on_bad,
        query_prompt=query_prompt,
        keep_texts=data.teacher is not None,
    )


def document_texts(data: DataConfig, corpus) -> RawTexts:
    """The raw strings of the --data documents ``corpus`` holds (all of --data, or --split's train
    part: a CorpusView of it), read again with the reader that tokenised them (data.read_texts):
    what a teacher embeds for the self-supervised views of phase 2."""
    texts = read_texts(_one_or_many(data.paths), text_field=data.text_field, on_bad=data.on_bad)
    whole = corpus.parent if isinstance(corpus, CorpusView) else corpus
    if len(texts) != len(whole):
        raise DataError(f"--data: read {len(texts)} documents as text but the tokenised corpus holds {len(whole)} (did the input change?)")
    raw = RawTexts(texts)
    return raw.view(corpus.start, corpus.stop) if isinstance(corpus, CorpusView) else raw


def _ntp_loader(job: JobConfig, corpus, tokenizer, dp_rank: int, dp_size: int):
    """The packed next-token loader of ``corpus`` with the job's batch shape (training and validation alike)."""
    b = job.batch
    return make_ntp_loader(
        corpus,
        job.gem,
        b.seq_length,
        micro_batch_size=b.micro_batch_size,
        global_batch_size=b.global_batch_size,
        seed=job.optimizer.seed,
        tokenizer=tokenizer,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )


def build_loaders(job: JobConfig, corpus, tokenizer, *, dp_rank: int, dp_size: int, pairs: PairCorpus | None = None):
    """(NTP loader, contrastive loader or None); both endless (epochs repeat with new seeds).
    ``pairs``: --contrastive-data already read (open_contrastive_pairs), else read here."""
    b, seed = job.batch, job.optimizer.seed
    ntp = _ntp_loader(job, corpus, tokenizer, dp_rank, dp_size)
    contrastive = None
    if job.has_phase_two:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts, positives, negatives, anchor_prompt, raw = corpus, None, None, None, None
        if job.data.pairs:
            if pairs is None:
                pairs = open_contrastive_pairs(job.data, tokenizer, job.gem.query_prompt)
            pairs = split_pairs(job, pairs)["train"]
            texts, positives, negatives, raw = pairs.queries, pairs.positives, pairs.negatives, pairs.texts
        else:
            if job.gem.query_prompt:
                anchor_prompt = PromptedText(tokenizer, job.gem.query_prompt)
            if job.data.teacher is not None:
                raw = document_texts(job.data, corpus)
        ds = ContrastiveDataset(
            texts,
            job.gem,
            positives=positives,
            anchor_prompt=anchor_prompt,
            negatives=negatives,
            chunk_size=b.contrastive_micro_batch_size,
            max_text_len=min(b.seq_length, b.contrastive_max_length),
            seq_length=b.seq_length,
            seed=seed + 1,
            pad_id=pad_id,
            embed_template=EmbedTemplate.from_tokenizer(job.gem.embed_template, tokenizer),
            texts=raw,
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


def cache_report(corpus) -> str:
    """The start-up lines of open_documents' caches (built or reused) of ``corpus`` (or of
    each source of a blend), one per line, each starting with a newline; "" without a cache.
    Take it before --split: the split's views are other objects."""
    parts = corpus.corpora if isinstance(corpus, CorpusBlend) else [corpus]
    return "".join(f"\n{c.cache_note}" for c in parts if getattr(c, "cache_note", None))


def data_report(corpus, contrastive_loader, ntp_loader=None) -> str:
    """What reading the training data counted (read, skipped and why, tokens), pairs included;
    for a blend, each source's documents and its samples per blend epoch; in summary mode also
    the phase-1 pieces left out for being too short for a GEM layout."""
    text = corpus.stats.report("read")
    if isinstance(corpus, CorpusBlend):
        for name, c in zip(corpus.names, corpus.corpora):
            text += f"\n[blend] {name}: {c.stats.documents_read} documents read, {c.stats.documents_skipped} skipped, {c.stats.tokens_in} tokens"
    if ntp_loader is not None and isinstance(ntp_loader.dataset, BlendedDataset):
        text += "\n" + ntp_loader.dataset.report()
    dataset = ntp_loader.dataset if ntp_loader is not None else None
    config = getattr(dataset, "config", None)
    if config is not None and config.summary_mode and hasattr(dataset, "plan"):
        plan = dataset.plan(0)
        text += (
            f"\n[phase 1] summary mode: every piece gets the {dataset.config.layout!r} layout (no plain text: it would train nothing); "
            f"epoch 0: {len(plan.pieces)} pieces, {plan.pieces.skipped_short} skipped as too short for the layout ({SHORT_FOR_SUMMARY})"
        )
    dataset = contrastive_loader.dataset if contrastive_loader is not None else None
    if dataset is not None and dataset.positives is not None:
        text += f"\nphase-2 pairs ({len(dataset.corpus)}):\n" + dataset.corpus.stats.report("pairs")
    return text


# ------------------------------------------------------------------ validation data
def split_pairs(job: JobConfig, pairs: PairCorpus) -> dict[str, PairCorpus]:
    """--split applied to --contrastive-data pairs too (the same rule as documents); without
    --split, or with --valid-contrastive-data (the held-out pairs), all pairs train."""
    v = job.validation
    if v.split is None or v.valid_contrastive_data:
        return {"train": pairs}
    q, p = split_corpus(pairs.queries, v.split), split_corpus(pairs.positives, v.split)
    # Hard negatives stay with the train part, which is the first range of pairs (pair i's
    # negatives are still negatives.get(i)); validation scores in-batch keys only.
    assert q["train"].start == 0
    negatives = pairs.negatives.head(len(q["train"])) if pairs.negatives is not None else None
    texts = {name: pairs.texts.view(q[name].start, q[name].stop) if pairs.texts is not None else None for name in q}
    return {name: PairCorpus(q[name], p[name], negatives if name == "train" else None, texts[name]) for name in q}


def split_training_corpus(job: JobConfig, corpus, tokenizer):
    """(documents that train, held-out validation documents or None, what was done): --split's
    train and valid parts of --data (the test part is held out and unused), or all of --data
    and --valid-data. An empty part is an error naming --split."""
    v = job.validation
    if v.split is not None:
        parts = split_corpus(corpus, v.split)
        text = ",".join(f"{w:g}" for w in v.split)
        for name in ("train", "valid") if v.split[1] > 0 else ("train",):
            if len(parts[name]) == 0:
                raise DataError(f"--split {text}: the {name} part of {len(corpus)} documents is empty")
        note = f"--split {text}: {len(parts['train'])} train / {len(parts['valid'])} valid / {len(parts['test'])} test (held out, unused) documents"
        return parts["train"], (parts["valid"] if v.split[1] > 0 else None), note
    if v.valid_data and v.eval_iters > 0:
        valid = open_documents(_one_or_many(v.valid_data), tokenizer, job.data, data_cache_dir(job))
        note = f"\n{valid.cache_note}" if getattr(valid, "cache_note", None) else ""
        return corpus, valid, f"--valid-data:\n{valid.stats.report('valid')}{note}"
    return corpus, None, ""


def open_validation_pairs(job: JobConfig, tokenizer) -> PairCorpus | None:
    """--valid-contrastive-data read into a PairCorpus; None without it."""
    v = job.validation
    if not v.valid_contrastive_data:
        return None
    return open_pair_corpus(
        _one_or_many(v.valid_contrastive_data), tokenizer, query_field=job.data.query_field, positive_field=job.data.positive_field, on_bad=job.data.on_bad
    )


def build_validation_loaders(job: JobConfig, valid_corpus, tokenizer, *, dp_rank: int, dp_size: int, valid_pairs: PairCorpus | None = None):
    """(NTP loader, contrastive loader, what the contrastive texts are) over held-out data, with
    the training batch shapes; the validator restarts both at sample 0 for every validation,
    so every validation sees the same batches. Contrastive: held-out pairs (--valid-contrastive-
    data, or the valid part of --contrastive-data under --split), else the validation documents
    with self-supervised positive views (the training phase-2 recipe). ``valid_pairs``:
    --valid-contrastive-data already read (open_validation_pairs), else read here."""
    b, seed, v = job.batch, job.optimizer.seed, job.validation
    ntp = _ntp_loader(job, valid_corpus, tokenizer, dp_rank, dp_size)
    texts, positives, source = valid_corpus, None, "self-supervised views of the validation documents"
    if v.valid_contrastive_data:
        pairs = valid_pairs if valid_pairs is not None else open_validation_pairs(job, tokenizer)
        texts, positives, source = pairs.queries, pairs.positives, f"{len(pairs)} pairs of --valid-contrastive-data"
    elif job.data.pairs and v.split is not None:
        pairs = split_pairs(job, open_contrastive_pairs(job.data, tokenizer))["valid"]
        if len(pairs) == 0:
            raise DataError("--split leaves no validation pairs of --contrastive-data; give --valid-contrastive-data or a larger valid weight")
        texts, positives, source = pairs.queries, pairs.positives, f"the valid part of --contrastive-data ({len(pairs)} pairs)"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = ContrastiveDataset(
        texts,
        job.gem,
        positives=positives,
        max_text_len=min(b.seq_length, b.contrastive_max_length),
        seq_length=b.seq_length,
        seed=seed + 1,
        pad_id=pad_id,
        embed_template=EmbedTemplate.from_tokenizer(job.gem.embed_template, tokenizer),
    )
    accum = b.global_batch_size // (b.micro_batch_size * dp_size)
    contrastive = GEMDataLoader(
        ds,
        micro_batch_size=b.contrastive_batch_size,
        global_batch_size=b.contrastive_batch_size * dp_size * accum,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )
    return ntp, contrastive, source
