"""Training data for both phases from the same corpus (engine-independent)."""

from __future__ import annotations

from ..data import ContrastiveDataset, GEMDataLoader, make_ntp_loader, open_corpus, open_pair_corpus


def open_training_corpus(args, tokenizer):
    """Read --data (files, Megatron prefix, or hf:NAME) into one corpus."""
    on_bad = "skip" if args.skip_bad_records else "error"
    sources = args.data if len(args.data) > 1 else args.data[0]
    return open_corpus(sources, tokenizer, text_field=args.text_field, on_bad=on_bad)


def open_contrastive_pairs(args, tokenizer):
    """Read --contrastive-data into a PairCorpus (query field -> anchor, positive field -> positive)."""
    on_bad = "skip" if args.skip_bad_records else "error"
    sources = args.contrastive_data if len(args.contrastive_data) > 1 else args.contrastive_data[0]
    return open_pair_corpus(
        sources, tokenizer, query_field=args.contrastive_query_field, positive_field=args.contrastive_positive_field, on_bad=on_bad
    )


def build_loaders(args, corpus, tokenizer, gem_config, *, dp_rank: int, dp_size: int):
    """(NTP loader, contrastive loader or None); both endless (epochs repeat with new seeds)."""
    ntp = make_ntp_loader(
        corpus,
        gem_config,
        args.seq_length,
        micro_batch_size=args.micro_batch_size,
        global_batch_size=args.global_batch_size,
        seed=args.seed,
        tokenizer=tokenizer,
        data_parallel_rank=dp_rank,
        data_parallel_size=dp_size,
    )
    contrastive = None
    if args.gem_contrastive_from_step < args.train_iters:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        texts, positives = corpus, None
        if args.contrastive_data:
            pairs = open_contrastive_pairs(args, tokenizer)
            texts, positives = pairs.queries, pairs.positives
        ds = ContrastiveDataset(
            texts,
            gem_config,
            positives=positives,
            max_text_len=min(args.seq_length, args.contrastive_max_length),
            seq_length=args.seq_length,
            seed=args.seed + 1,
            pad_id=pad_id,
        )
        accum = args.global_batch_size // (args.micro_batch_size * dp_size)
        contrastive = GEMDataLoader(
            ds,
            micro_batch_size=args.contrastive_batch_size,
            global_batch_size=args.contrastive_batch_size * dp_size * accum,
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
