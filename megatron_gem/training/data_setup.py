"""Training data for both phases from the same corpus (engine-independent)."""

from __future__ import annotations

from ..data import ContrastiveDataset, GEMDataLoader, make_ntp_loader, open_corpus


def open_training_corpus(args, tokenizer):
    """Read --data (files, Megatron prefix, or hf:NAME) into one corpus."""
    on_bad = "skip" if args.skip_bad_records else "error"
    sources = args.data if len(args.data) > 1 else args.data[0]
    return open_corpus(sources, tokenizer, text_field=args.text_field, on_bad=on_bad)


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
        ds = ContrastiveDataset(
            corpus,
            gem_config,
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
