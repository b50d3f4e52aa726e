"""Command line of train.py, with Megatron-LM / DeepSpeed flag names, for both engines.

Everything a run needs is checked here, before any model is loaded, so wrong or conflicting
arguments fail at start with one clear message naming the flag; ``job_config`` then turns the
namespace into the typed JobConfig (config.py) that everything below the entry point reads.
Megatron's parallelism flags (``--tensor-model-parallel-size`` /
``--pipeline-model-parallel-size``) select the megatron-core engine and add its flags.
"""

from __future__ import annotations

import argparse
import os

from ..common.entry_point import add_debug_flag
from ..common.errors import InputError, ModelLoadError
from ..common.model_paths import MEGATRON_META, check_model_source, max_positions, read_model_config
from ..common.outputs import OVERWRITE_FLAG, add_overwrite_flag
from ..gem.config import ADAPTER_POSITIONS, LAYOUTS, TRAIN_MODES, GEMConfig, GEMConfigError
from ..gem.template import check_template
from .config import BatchConfig, CheckpointConfig, DataConfig, JobConfig, ModelConfig, OptimizerConfig, ParallelConfig, RunConfig, ValidationConfig, WandbConfig

_DATA_EXTENSIONS = (".json", ".jsonl", ".txt", ".parquet", ".gz", ".bin", ".idx")


class ArgumentError(InputError):
    """A bad command-line argument; the message names the flag."""


class HelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to a flag's help unless the help already says its default, or the
    default is None / False / empty (nothing worth printing)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], "", argparse.SUPPRESS) or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py",
        description="GEM post-training of an HF causal LM with DeepSpeed (ZeRO-1/2/3). Run with "
        "`deepspeed train.py --deepspeed ds_zero3.json ...`, `torchrun ... train.py ...` or plain "
        "`python train.py ...` (one process).",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="HF checkpoint directory (or hub name when online)")
    inputs = g.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--data", nargs="+", help="jsonl/json/parquet/txt files, or a Megatron .bin/.idx prefix")
    inputs.add_argument(
        "--data-path",
        nargs="+",
        help="a blend, as Megatron-LM writes it: W1 PATH1 W2 PATH2 ... (weights: shares of the packed rows), or PATH1 PATH2 ... "
        "(in proportion to size); each PATH a Megatron .bin/.idx prefix or one jsonl/json/parquet/txt file",
    )
    g.add_argument("--text-field", default="text", help="field holding the text in json/jsonl/parquet records")
    g.add_argument("--skip-bad-records", action="store_true", help="count and skip malformed records instead of failing")
    g.add_argument(
        "--contrastive-data",
        nargs="+",
        default=None,
        help="supervised pairs for phase 2 (jsonl/json/parquet records, or hf:NAME): each record's query field is "
        "the anchor and its positive field the positive, other pairs' positives the negatives; default: "
        "self-supervised positives (a token-dropout view of each --data text, the paper)",
    )
    g.add_argument("--contrastive-query-field", default="query", help="anchor field of --contrastive-data records")
    g.add_argument("--contrastive-positive-field", default="positive", help="positive field of --contrastive-data records")
    g.add_argument(
        "--contrastive-query-prompt",
        default="",
        metavar="TEXT",
        help="instruction prepended to the query/anchor text of phase 2 (not to positives), e.g. 'query: '; saved in the "
        "export as the sentence-transformers 'query' prompt and used by GEMEmbedder.encode_queries",
    )
    g.add_argument(
        "--gem-embed-template",
        default="",
        metavar="TEMPLATE",
        help="template with one {text} wrapped around every embedded text before its summary tokens, in the phase-2 views and "
        'at embedding time (saved in gem_config.json; GEMEmbedder applies it), e.g. \'This sentence : "{text}" means in one word:"\' '
        "(PromptEOL), or 'chat': the tokenizer's own chat template around one user message up to the start of the assistant turn "
        "(a chat prompt's prefill then holds what the summary tokens read: the server's return_embedding, docs/serving.md); default '': the bare text",
    )
    g.add_argument(
        "--contrastive-negative-field",
        default=None,
        metavar="NAME",
        help="hard-negative field of --contrastive-data records (a string or a list of strings): extra keys every anchor is "
        "scored against, as in sentence-transformers' MultipleNegativesRankingLoss; records without it are kept and counted",
    )
    g.add_argument(
        "--contrastive-negatives-required",
        action="store_true",
        help="a --contrastive-data record without hard negatives is a bad record (an error naming file:line, or skipped with --skip-bad-records)",
    )
    g.add_argument(
        "--save",
        required=True,
        help="output directory: checkpoints, metrics.jsonl, hf/ export; a non-empty one is refused unless it is also --load (a resume) "
        f"or {OVERWRITE_FLAG} is given",
    )
    g.add_argument(
        "--load",
        default=None,
        help="resume from the checkpoint DIR/latest names, after verifying its manifest; a DIR with no checkpoint (or no DIR) starts from step 0, saying so",
    )
    g.add_argument(
        "--load-fallback",
        action="store_true",
        help="if the checkpoint latest names is damaged or incomplete, resume from the newest earlier one that verifies",
    )
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: --model)")
    add_overwrite_flag(
        g,
        help="start a new run in a --save directory that holds another run's checkpoints (HF Trainer's --overwrite_output_dir): its "
        "'latest' goes at once, each checkpoint and the hf/ export are replaced as the new run writes them, and only files a "
        "manifest.json lists are ever replaced (other files are kept)",
    )

    g = p.add_argument_group("batch and schedule (Megatron names)")
    g.add_argument("--seq-length", type=int, default=512, help="packed row length in tokens")
    g.add_argument("--micro-batch-size", type=int, default=1, help="rows per micro-batch per data-parallel rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="rows per optimizer step over all ranks (default: micro x dp)")
    g.add_argument("--contrastive-batch-size", type=int, default=None, help="texts per contrastive micro-batch per rank (default: 8 x micro-batch-size)")
    g.add_argument(
        "--contrastive-micro-batch-size",
        type=int,
        default=None,
        help="GradCache: embed the --contrastive-batch-size texts in chunks of this many anchors (a no-grad pass, the loss and "
        "its embedding gradients over the whole batch, then a pass with graph per chunk): the gradient of the whole batch "
        "with the activation memory of a chunk (default: no chunking)",
    )
    g.add_argument(
        "--contrastive-max-length", type=int, default=512, help="tokens per contrastive text before its special tokens are appended (capped by --seq-length)"
    )
    g.add_argument("--train-iters", type=int, required=True, help="optimizer steps in total (both phases)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of phase 1 (mixed NTP)")
    g.add_argument("--contrastive-lr", type=float, default=1e-5, help="peak learning rate of phase 2 (contrastive)")
    g.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of the phase's peak")
    g.add_argument("--lr-warmup-fraction", type=float, default=0.01, help="warmup fraction of each phase")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (not on biases, norms and the logit scale)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient clipping (fills DeepSpeed's gradient_clipping)")
    g.add_argument("--seed", type=int, default=1234, help="seed of the GEM layouts, data order, dropout views and initialisation")

    g = p.add_argument_group("GEM")
    g.add_argument("--gem-num-special-tokens", type=int, default=1, help="K summary tokens")
    g.add_argument("--gem-p-raw", type=float, default=0.8, help="probability that a document stays plain in phase 1")
    g.add_argument("--gem-layout", choices=LAYOUTS, default="split", help="phase-1 layout of a GEM document: split (prefix, summary, suffix) or reconstruct")
    g.add_argument("--gem-min-prefix-len", type=int, default=4, help="fewest tokens before the summary tokens (BOS included)")
    g.add_argument("--gem-min-suffix-len", type=int, default=4, help="fewest tokens after the summary tokens")
    g.add_argument("--gem-suffix-sees-bos", action="store_true", help="keep the document's first token visible to the suffix")
    g.add_argument("--gem-contrastive-from-step", type=int, default=100, help="first step of phase 2 (contrastive)")
    g.add_argument("--gem-alpha", type=float, default=1.0, help="phase-2 weight of the contrastive loss; < 1 keeps (1-alpha) NTP to preserve generation")
    g.add_argument("--gem-prefix-dropout", type=float, default=0.1, help="token deletion rate of the positive view")
    g.add_argument("--gem-logit-scale-init", type=float, default=20.0, help="initial InfoNCE logit scale (1 / temperature), learnt")
    g.add_argument("--gem-logit-scale-max", type=float, default=100.0, help="upper bound of the learnt logit scale")
    g.add_argument(
        "--gem-train",
        choices=TRAIN_MODES,
        default="full",
        help="full: every weight trains (the paper); summary: the base model stays frozen and exact, low-rank deltas act only at summary positions",
    )
    g.add_argument("--gem-adapter-rank", type=int, default=16, help="summary mode: rank of each delta")
    g.add_argument("--gem-adapter-alpha", type=float, default=32.0, help="summary mode: delta scale alpha (applied as alpha / rank)")
    g.add_argument(
        "--gem-adapter-targets",
        nargs="+",
        default=[],
        metavar="NAME",
        help="summary mode: linear layers to adapt (default: every attention and MLP projection)",
    )
    g.add_argument("--gem-adapter-positions", choices=ADAPTER_POSITIONS, default="special", help="summary mode: tokens the deltas act on")
    g.add_argument(
        "--gem-summary-fast-path",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="summary mode, phase 2: run the texts without autograd and backpropagate only through the summary tokens (--no-gem-summary-fast-path: full rows with autograd, the reference)",
    )
    g.add_argument(
        "--gem-summary-tokens",
        nargs="+",
        default=[],
        metavar="TOKEN",
        help="summary mode: existing tokens used as the K summary tokens (default: unused special tokens)",
    )
    g.add_argument(
        "--attention-backend",
        choices=("auto", "sdpa", "flex", "triton"),
        default="auto",
        help="how the GEM mask runs: auto picks the fastest available, sdpa (dense mask), flex, triton (block-sparse kernel)",
    )

    g = p.add_argument_group("precision, memory, logging, checkpoints")
    g.add_argument("--bf16", action="store_true", help="bf16 training (fills DeepSpeed's bf16.enabled)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--save-interval", type=int, default=1000, help="DeepSpeed checkpoint every N steps (and at the end)")
    g.add_argument("--hf-export-interval", type=int, default=0, help="also write the HF export every N steps (0: only at the end)")
    g.add_argument(
        "--hf-export-self-contained",
        action="store_true",
        help="summary mode: the adapter export also carries the base checkpoint (SAVE/hf/base/), so it loads without --model's directory",
    )
    g.add_argument("--log-interval", type=int, default=10, help="one metrics.jsonl line every N steps")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--exit-signal-handler",
        action="store_true",
        help="on SIGUSR1/SIGTERM (e.g. SLURM's --signal before the time limit): finish the step, save a checkpoint, exit 0",
    )
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="collective timeout: a dead rank fails the job instead of hanging")
    g.add_argument(
        "--check-for-nan-in-loss-and-grad",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stop every rank, before saving, at a step whose loss or gradient norm is NaN/Inf on any rank",
    )
    g.add_argument("--exit-after-iters", type=int, default=None, help="stop (after saving) at this step; for tests and pre-emption drills")
    add_debug_flag(g)

    add_teacher_args(p)
    add_validation_args(p)
    add_io_args(p)

    g = p.add_argument_group("launcher")
    g.add_argument("--deepspeed", dest="deepspeed_config", default=None, help="DeepSpeed JSON config (e.g. ds_zero3.json)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)), help=argparse.SUPPRESS)
    return p


def add_teacher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("teacher distillation (phase 2)")
    g.add_argument(
        "--contrastive-teacher",
        default=None,
        metavar="DIR",
        help="a sentence-transformers model folder (local, safetensors) whose in-batch similarity structure phase 2 distils: it embeds the "
        "same texts as the student each step (no gradient; --data documents or --contrastive-data pairs) and the student's similarity rows "
        "are trained towards its (KL, docs/method.md)",
    )
    g.add_argument(
        "--contrastive-teacher-weight",
        type=float,
        default=None,
        metavar="W",
        help="share of the teacher's term in the contrastive loss: 1 the teacher alone, 0 < W < 1 mixed with (1 - W) x InfoNCE on the "
        "batch's pairs (default 1.0; needs --contrastive-teacher)",
    )
    g.add_argument(
        "--contrastive-teacher-temperature",
        type=float,
        default=None,
        metavar="T",
        help="temperature of the teacher's similarity softmax (the student's is its learnt logit scale) (default 0.05; needs --contrastive-teacher)",
    )
    g.add_argument(
        "--contrastive-teacher-cache",
        default=None,
        metavar="DIR",
        help="keep the teacher's embeddings on disk here, keyed by text and teacher digest, so repeated epochs and runs do not recompute "
        "them (default: not kept)",
    )


TEACHER_DEFAULTS = {"contrastive_teacher_weight": 1.0, "contrastive_teacher_temperature": 0.05}


def validate_teacher_args(args) -> None:
    """--contrastive-teacher*: the settings need the teacher; the teacher needs a phase 2 and text
    it can read (documents as text, or pairs); its folder passes distill's loader checks."""
    teacher = getattr(args, "contrastive_teacher", None)
    for dest, default in TEACHER_DEFAULTS.items():
        if getattr(args, dest, None) is not None and teacher is None:
            raise ArgumentError(f"--{dest.replace('_', '-')} needs --contrastive-teacher DIR")
        if getattr(args, dest, None) is None:
            setattr(args, dest, default)
    if getattr(args, "contrastive_teacher_cache", None) is not None and teacher is None:
        raise ArgumentError("--contrastive-teacher-cache needs --contrastive-teacher DIR")
    if teacher is None:
        return
    from ..distill.teacher import check_teacher_folder

    check_teacher_folder(teacher)  # a ModelLoadError naming --contrastive-teacher and the folder
    if args.gem_contrastive_from_step >= args.train_iters:
        raise ArgumentError(
            f"--contrastive-teacher is given but phase 2 never runs (--gem-contrastive-from-step {args.gem_contrastive_from_step} >= --train-iters {args.train_iters})"
        )
    if not args.contrastive_data:
        if args.data_path:
            raise ArgumentError(
                "--contrastive-teacher with --data-path: a blend's documents are not read as text; give --data files or --contrastive-data pairs"
            )
        for path in args.data or ():
            prefix = path[:-4] if path.endswith((".bin", ".idx")) else path
            if os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
                raise ArgumentError(
                    f"--contrastive-teacher with --data {path}: a Megatron .bin/.idx prefix holds token ids, not the text the teacher reads; "
                    "give the text files or --contrastive-data pairs"
                )
    cache = getattr(args, "contrastive_teacher_cache", None)
    if cache is not None and os.path.exists(cache) and not os.path.isdir(cache):
        raise ArgumentError(f"--contrastive-teacher-cache {cache}: is a file; expected a directory")


def add_validation_args(p: argparse.ArgumentParser) -> None:
    """Validation data and cadence, Weights & Biases: Megatron-LM's flag names."""
    g = p.add_argument_group("validation (Megatron names)")
    g.add_argument(
        "--split",
        default=None,
        help="train,valid,test weights over the documents of --data, in file order (Megatron's, e.g. 949,50,1); "
        "unlike Megatron there is no default split: without --split (or --valid-data) all of --data trains and nothing validates",
    )
    g.add_argument("--valid-data", nargs="+", default=None, help="held-out documents for validation (the formats of --data); instead of --split")
    g.add_argument(
        "--valid-contrastive-data",
        nargs="+",
        default=None,
        help="held-out (query, positive) pairs for the validation contrastive metric (the format of --contrastive-data); "
        "default: the valid part of --contrastive-data under --split, else self-supervised views of the validation documents",
    )
    g.add_argument(
        "--eval-interval", type=int, default=None, help="validate every N steps (and after the last step); default 1000 when validation data is given"
    )
    g.add_argument("--eval-iters", type=int, default=100, help="global batches per validation (0: no validation)")
    g = p.add_argument_group("Weights & Biases (Megatron names; rank 0 logs the metrics.jsonl records)")
    g.add_argument("--wandb-project", default=None, help="log to this W&B project (needs the wandb package; WANDB_MODE=offline works without network)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run name (required with --wandb-project, as in Megatron-LM)")
    g.add_argument("--wandb-save-dir", default=None, help="where W&B writes its run files (default: <--save>/wandb)")


def add_io_args(p: argparse.ArgumentParser) -> None:
    """Checkpoint rotation and the tokenised-data cache (docs/training.md)."""
    g = p.add_argument_group("checkpoint rotation and data cache")
    g.add_argument(
        "--save-total-limit",
        type=int,
        default=None,
        metavar="N",
        help="keep the newest N checkpoints in --save, deleting older ones after each verified save (HF Trainer's save_total_limit); "
        "what latest names, a save not yet complete and anything not written by this run are never deleted (default: keep all)",
    )
    g.add_argument(
        "--data-cache-path",
        default=None,
        metavar="DIR",
        help="text input (jsonl/json/parquet/txt) is tokenised once, by rank 0, into a Megatron .bin/.idx cache here, keyed by the "
        "input's content and the tokenizer; the other ranks wait and memory-map it, later runs reuse it (Megatron-LM's name; "
        "default: <--save>/data_cache; on a file system every node sees)",
    )


def validate_io_args(args) -> None:
    """The checks of add_io_args' flags (ArgumentError naming the flag)."""
    if args.save_total_limit is not None and args.save_total_limit < 1:
        raise ArgumentError(f"--save-total-limit must be >= 1 (the checkpoint just saved is always kept), got {args.save_total_limit}")
    if args.data_cache_path is not None and os.path.exists(args.data_cache_path) and not os.path.isdir(args.data_cache_path):
        raise ArgumentError(f"--data-cache-path {args.data_cache_path}: is a file; expected a directory")


def validate_validation_args(args) -> None:
    """The checks of add_validation_args' flags (ArgumentError naming the flag)."""
    from ..data.split import parse_split

    if args.split is not None:
        try:
            weights = parse_split(args.split)
        except ValueError as e:
            raise ArgumentError(f"--split {e}") from e
        if weights[0] == 0:
            raise ArgumentError(f"--split {args.split}: the train weight is 0; nothing would train")
        if args.valid_data:
            raise ArgumentError("--split and --valid-data both name validation documents; give one")
    if args.eval_interval is not None and args.eval_interval < 1:
        raise ArgumentError(f"--eval-interval must be >= 1, got {args.eval_interval}")
    if args.eval_iters < 0:
        raise ArgumentError(f"--eval-iters must be >= 0, got {args.eval_iters}")
    has_valid = bool(args.valid_data) or (args.split is not None and parse_split(args.split)[1] > 0)
    if not has_valid:
        for flag, value in (("--eval-interval", args.eval_interval), ("--valid-contrastive-data", args.valid_contrastive_data)):
            if value is not None and args.eval_iters > 0:
                raise ArgumentError(f"{flag} needs validation documents: --split with a non-zero valid weight (e.g. 949,50,1) or --valid-data")
    for path in args.valid_data or ():
        check_data_path("--valid-data", path)
    for path in args.valid_contrastive_data or ():
        check_data_path("--valid-contrastive-data", path)
    if args.wandb_project is None:
        for flag in ("--wandb-exp-name", "--wandb-save-dir"):
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                raise ArgumentError(f"{flag} is given without --wandb-project (W&B logging is off)")
        return
    if not args.wandb_exp_name:
        raise ArgumentError("--wandb-project needs --wandb-exp-name (the W&B run name), as in Megatron-LM")
    import importlib.util

    if importlib.util.find_spec("wandb") is None:
        raise ArgumentError("--wandb-project: the wandb package is not installed (pip install wandb)")


def validation_config_from_args(args) -> ValidationConfig:
    from ..data.split import parse_split

    return ValidationConfig(
        split=parse_split(args.split) if args.split is not None else None,
        valid_data=list(args.valid_data) if args.valid_data else None,
        valid_contrastive_data=list(args.valid_contrastive_data) if args.valid_contrastive_data else None,
        eval_interval=args.eval_interval if args.eval_interval is not None else 1000,
        eval_iters=args.eval_iters,
    )


# GEMConfig field -> the train.py flag that sets it (messages name the flag, not the field).
GEM_FLAGS = {
    "num_special_tokens": "--gem-num-special-tokens",
    "p_raw": "--gem-p-raw",
    "layout": "--gem-layout",
    "min_prefix_len": "--gem-min-prefix-len",
    "min_suffix_len": "--gem-min-suffix-len",
    "suffix_sees_bos": "--gem-suffix-sees-bos",
    "prefix_dropout": "--gem-prefix-dropout",
    "logit_scale_init": "--gem-logit-scale-init",
    "logit_scale_max": "--gem-logit-scale-max",
    "contrastive_from_step": "--gem-contrastive-from-step",
    "alpha": "--gem-alpha",
    "query_prompt": "--contrastive-query-prompt",
    "embed_template": "--gem-embed-template",
    "train_mode": "--gem-train",
    "adapter_rank": "--gem-adapter-rank",
    "adapter_alpha": "--gem-adapter-alpha",
    "adapter_targets": "--gem-adapter-targets",
    "adapter_positions": "--gem-adapter-positions",
    "summary_tokens": "--gem-summary-tokens",
    "teacher_weight": "--contrastive-teacher-weight",
    "teacher_temperature": "--contrastive-teacher-temperature",
}


def flag_message(e: GEMConfigError) -> str:
    """A GEMConfig error in train.py's words: '--gem-p-raw 1.5: must lie in [0, 1]'."""
    flag = GEM_FLAGS.get(e.field)
    if flag is None:
        return str(e)
    value = " ".join(map(str, e.value)) if isinstance(e.value, list) else e.value
    why = e.why
    for field, other in GEM_FLAGS.items():  # "must lie in [1, logit_scale_max=100.0]" -> "--gem-logit-scale-max 100.0"
        why = why.replace(f"{field}=", f"{other} ")
    return f"{flag} {value}: {why}"


def gem_config_from_args(args) -> GEMConfig:
    """The GEMConfig the flags give; ArgumentError naming the flag when one is out of range."""
    try:
        return _gem_config(args)
    except GEMConfigError as e:
        raise ArgumentError(flag_message(e)) from None


def _gem_config(args) -> GEMConfig:
    return GEMConfig(
        num_special_tokens=args.gem_num_special_tokens,
        p_raw=args.gem_p_raw,
        layout=args.gem_layout,
        min_prefix_len=args.gem_min_prefix_len,
        min_suffix_len=args.gem_min_suffix_len,
        suffix_sees_bos=args.gem_suffix_sees_bos,
        prefix_dropout=args.gem_prefix_dropout,
        logit_scale_init=args.gem_logit_scale_init,
        logit_scale_max=args.gem_logit_scale_max,
        contrastive_from_step=args.gem_contrastive_from_step,
        alpha=args.gem_alpha,
        query_prompt=args.contrastive_query_prompt,
        embed_template=args.gem_embed_template,
        train_mode=args.gem_train,
        adapter_rank=args.gem_adapter_rank,
        adapter_alpha=args.gem_adapter_alpha,
        adapter_targets=list(args.gem_adapter_targets),
        adapter_positions=args.gem_adapter_positions,
        summary_tokens=list(args.gem_summary_tokens),
        teacher_weight=_teacher_setting(args, "contrastive_teacher_weight"),
        teacher_temperature=_teacher_setting(args, "contrastive_teacher_temperature"),
    )


def _teacher_setting(args, dest: str) -> float:
    value = getattr(args, dest, None)
    return TEACHER_DEFAULTS[dest] if value is None else value


def validate_args(args, dp_size: int) -> None:
    """Raise ArgumentError (naming the flag) for anything wrong or conflicting."""

    def positive(flag: str, value) -> None:
        if value is None or value < 1:
            raise ArgumentError(f"{flag} must be >= 1, got {value}")

    for flag in ("--seq-length", "--micro-batch-size", "--train-iters", "--save-interval", "--log-interval"):
        positive(flag, getattr(args, flag[2:].replace("-", "_")))
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * dp_size
    per_step = args.micro_batch_size * dp_size
    if args.global_batch_size % per_step:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
            f"{args.micro_batch_size} x data-parallel size {dp_size} = {per_step}"
        )
    if args.contrastive_batch_size is None:
        args.contrastive_batch_size = 8 * args.micro_batch_size
    positive("--contrastive-batch-size", args.contrastive_batch_size)
    chunk = getattr(args, "contrastive_micro_batch_size", None)
    if chunk is not None and not 1 <= chunk <= args.contrastive_batch_size:
        raise ArgumentError(f"--contrastive-micro-batch-size {chunk} must lie in [1, --contrastive-batch-size {args.contrastive_batch_size}]")
    try:
        check_template(getattr(args, "gem_embed_template", ""))
    except ValueError as e:
        raise ArgumentError(f"--gem-embed-template: {e}") from None
    if args.lr <= 0 or args.contrastive_lr <= 0:
        raise ArgumentError(f"--lr and --contrastive-lr must be > 0, got {args.lr} and {args.contrastive_lr}")
    if not 0 <= args.lr_warmup_fraction < 1:
        raise ArgumentError(f"--lr-warmup-fraction must lie in [0, 1), got {args.lr_warmup_fraction}")
    if args.gem_contrastive_from_step > args.train_iters:
        raise ArgumentError(
            f"--gem-contrastive-from-step {args.gem_contrastive_from_step} is after --train-iters {args.train_iters}: "
            f"phase 2 would never run (set it <= --train-iters; equal means phase 1 only)"
        )
    if args.seq_length <= args.gem_num_special_tokens + args.gem_min_prefix_len:
        raise ArgumentError(f"--seq-length {args.seq_length} leaves no room for text around {args.gem_num_special_tokens} special tokens")
    validate_paths(args)
    validate_validation_args(args)
    validate_io_args(args)
    if args.contrastive_data and args.gem_contrastive_from_step >= args.train_iters:
        raise ArgumentError(
            f"--contrastive-data is given but phase 2 never runs (--gem-contrastive-from-step "
            f"{args.gem_contrastive_from_step} >= --train-iters {args.train_iters})"
        )
    if args.hf_export_self_contained and args.gem_train != "summary":
        raise ArgumentError("--hf-export-self-contained needs --gem-train summary (a full-mode export already holds every weight)")
    if args.contrastive_query_field == args.contrastive_positive_field:
        raise ArgumentError(f"--contrastive-query-field and --contrastive-positive-field are both {args.contrastive_query_field!r}")
    negative_field = getattr(args, "contrastive_negative_field", None)
    if (negative_field or getattr(args, "contrastive_negatives_required", False)) and not args.contrastive_data:
        raise ArgumentError("--contrastive-negative-field / --contrastive-negatives-required need --contrastive-data (hard negatives belong to pairs)")
    if getattr(args, "contrastive_negatives_required", False) and not negative_field:
        raise ArgumentError("--contrastive-negatives-required needs --contrastive-negative-field NAME")
    if negative_field in (args.contrastive_query_field, args.contrastive_positive_field):
        raise ArgumentError(f"--contrastive-negative-field {negative_field!r} is also the query or positive field")
    validate_teacher_args(args)
    gem_config_from_args(args)


def check_model_path(flag: str, path: str, *, tokenizer: bool = False) -> None:
    """--model / --tokenizer: a local checkpoint directory (config.json, or a megatron checkpoint
    of this project; with ``tokenizer`` also tokenizer files), or an HF repo id the hub can
    serve or the local HF cache holds (common/model_paths.py)."""
    try:
        if flag == "--tokenizer":
            check_model_source(flag, path, config=False, tokenizer=True)
        else:
            check_model_source(flag, path, config=True, tokenizer=tokenizer, also=(MEGATRON_META,))
    except ModelLoadError as e:
        raise ArgumentError(str(e)) from e


def check_seq_length(args) -> None:
    """--seq-length (and --contrastive-max-length, capped by it) within the model's positions,
    read from its config.json without loading it."""
    try:
        config = read_model_config(args.model)
    except ModelLoadError as e:
        raise ArgumentError(f"--model {e}") from e
    if config is None:
        return
    limit, note = max_positions(config)
    if limit is not None and args.seq_length > limit:
        raise ArgumentError(
            f"--seq-length {args.seq_length} is above --model {args.model}'s max_position_embeddings {limit} ({note}); use --seq-length {limit} or less"
        )


def check_save_dir(args) -> None:
    """--save: a new or empty directory, the directory --load resumes, or (with
    --overwrite-output-dir) one whose checkpoints and export megatron-gem's manifests list."""
    from .checkpoint import describe_save_dir, overwrite_problem

    save = args.save
    if os.path.lexists(save) and not os.path.exists(save):
        raise ArgumentError(f"--save {save}: a symbolic link to nowhere (or a link loop)")
    if os.path.exists(save) and not os.path.isdir(save):
        raise ArgumentError(f"--save {save}: is a file; expected a directory")
    if not os.path.isdir(save) or not os.listdir(save):
        return
    if args.load is not None and os.path.isdir(args.load) and os.path.samefile(args.load, save):
        return  # a resume: the directory is this run's
    if getattr(args, "overwrite_output_dir", False):
        problem = overwrite_problem(save)
        if problem:
            raise ArgumentError(f"--save {save} {OVERWRITE_FLAG}: {problem}")
        return
    raise ArgumentError(
        f"--save {save}: {describe_save_dir(save)}; resume it with --load {save}, choose a new --save, or pass {OVERWRITE_FLAG} to start a new run there"
    )


def _readable(flag: str, path: str, what: str) -> None:
    if not os.access(path, os.R_OK | (os.X_OK if os.path.isdir(path) else 0)):
        raise ArgumentError(f"{flag} {path}: {what} is not readable (permission denied)")


def check_data_path(flag: str, path: str) -> None:
    if path.startswith("hf:"):
        return  # a hub dataset: datasets fetches it, or finds it in its cache offline
    if os.path.isdir(path):
        raise ArgumentError(f"{flag} {path}: is a directory; give the files (jsonl/json/parquet/txt) or a Megatron .bin/.idx prefix")
    if os.path.isfile(path):
        _readable(flag, path, "file")
        return
    if os.path.isfile(path + ".idx") or os.path.isfile(path + ".bin"):
        for ext in (".bin", ".idx"):
            if not os.path.isfile(path + ext):
                raise ArgumentError(f"{flag} {path}: Megatron indexed dataset without its {ext} file ({path}{ext})")
            _readable(flag, path + ext, "file")
        return
    if flag == "--data" and not path.endswith(_DATA_EXTENSIONS) and os.environ.get("HF_DATASETS_OFFLINE") != "1":
        return  # can only be a hub dataset name, fetched by datasets
    hub = "" if flag == "--data" else " (hub datasets are written hf:NAME)"
    raise ArgumentError(f"{flag} {path}: no such file (nor {path}.bin/.idx for a Megatron indexed dataset){hub}")


def parse_data_path(values) -> tuple[list[str], list[float] | None]:
    """--data-path's list as Megatron-LM's get_blend_from_list reads it: (paths, weights or None).

    Pairs ``W PATH`` when the list has even length and every W is a number; paths only when no
    entry at a weight's place is a number (an odd-length list, or no numbers there)."""
    values = list(values)

    def number(v):
        try:
            return float(v)
        except ValueError:
            return None

    firsts = [number(v) for v in values[0::2]] if len(values) % 2 == 0 else []
    if firsts and all(w is not None for w in firsts):
        for raw, w, path in zip(values[0::2], firsts, values[1::2]):
            if not (0 < w < float("inf")):
                raise ArgumentError(f"--data-path {raw} {path}: the weight must be a positive number")
        return values[1::2], firsts
    numbers = [v for v in values if number(v) is not None]
    if numbers:
        raise ArgumentError(
            f"--data-path {' '.join(values)}: {numbers[0]!r} looks like a weight, but weights and paths do not alternate; "
            "write W1 PATH1 W2 PATH2 ... (every path weighted) or PATH1 PATH2 ... (none)"
        )
    return values, None


def validate_paths(args) -> None:
    """Every path argument, before anything heavy: one line naming the flag and the path."""
    check_model_path("--model", args.model, tokenizer=args.tokenizer is None)
    if args.tokenizer is not None:
        check_model_path("--tokenizer", args.tokenizer)
    check_seq_length(args)
    for path in args.data or ():
        check_data_path("--data", path)
    for path in parse_data_path(args.data_path)[0] if args.data_path else ():
        check_data_path("--data-path", path)
    for path in args.contrastive_data or ():
        check_data_path("--contrastive-data", path)
    if args.load is not None and os.path.exists(args.load) and not os.path.isdir(args.load):
        raise ArgumentError(f"--load {args.load}: is a file; expected the --save directory of an earlier run")
    check_save_dir(args)
    parent = os.path.abspath(args.save)
    while not os.path.isdir(parent):  # the nearest existing directory is where it gets created
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ArgumentError(f"--save {args.save}: cannot write there ({parent} is not writable)")
    if args.deepspeed_config is not None:
        from .ds_config import read_ds_json

        try:
            read_ds_json(args.deepspeed_config)
        except ValueError as e:
            raise ArgumentError(f"--deepspeed {e}") from e


# ---------------------------------------------------------------- megatron-core engine flags
MEGATRON_FLAGS = ("--tensor-model-parallel-size", "--pipeline-model-parallel-size")


def wants_megatron(argv) -> bool:
    """True when the command line selects the megatron-core backend."""
    return any(a == f or a.startswith(f + "=") for a in argv for f in MEGATRON_FLAGS)


def build_megatron_parser() -> argparse.ArgumentParser:
    p = build_parser()
    p.prog = "train.py (megatron-core backend)"
    p.description = (
        "GEM post-training of a Llama-family model with megatron-core (tensor, pipeline and data "
        "parallel with the distributed optimizer). Launch with torchrun; selected by "
        "--tensor-model-parallel-size / --pipeline-model-parallel-size."
    )
    g = p.add_argument_group("megatron-core (Megatron-LM flag names)")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="tensor-parallel ranks per model replica (selects this backend)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="pipeline stages per model replica (selects this backend)")
    g.add_argument("--sequence-parallel", action="store_true", help="shard norms/dropout activations along the sequence (needs TP > 1)")
    g.add_argument(
        "--recompute-granularity", choices=("full", "selective"), default=None, help="activation recomputation (full: whole layers; selective: core attention)"
    )
    g.add_argument(
        "--recompute-method",
        choices=("uniform", "block"),
        default=None,
        help="with --recompute-granularity full: uniform (groups of --recompute-num-layers) or block (the first N layers per stage)",
    )
    g.add_argument("--recompute-num-layers", type=int, default=None, help="layers per recomputed group (uniform) or recomputed layers per stage (block)")
    g.add_argument(
        "--no-distributed-optimizer",
        dest="use_distributed_optimizer",
        action="store_false",
        help="replicate optimizer states instead of sharding them over data-parallel ranks",
    )
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, help="pad the vocabulary to a multiple of this x TP")
    return p


def validate_megatron_args(args, world_size: int) -> int:
    """Validate everything (train.py's checks with the data-parallel size); returns dp size."""
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if tp < 1 or pp < 1:
        raise ArgumentError(f"--tensor-model-parallel-size {tp} and --pipeline-model-parallel-size {pp} must be >= 1")
    if args.contrastive_micro_batch_size is not None and pp > 1:
        raise ArgumentError(
            "--contrastive-micro-batch-size (GradCache) is not supported with --pipeline-model-parallel-size > 1: the cached "
            "embedding gradients would have to travel back through the pipeline stages; use PP=1 (TP/DP work) or drop the flag"
        )
    if world_size % (tp * pp):
        raise ArgumentError(f"{world_size} processes cannot be split into TP={tp} x PP={pp} (world size must be a multiple of {tp * pp})")
    if args.deepspeed_config is not None:
        raise ArgumentError("--deepspeed selects the DeepSpeed backend; it cannot be combined with --tensor/--pipeline-model-parallel-size")
    if args.sequence_parallel and tp == 1:
        raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.gradient_checkpointing and args.recompute_granularity is None:
        args.recompute_granularity = "full"
    if args.recompute_method is not None and args.recompute_granularity != "full":
        raise ArgumentError("--recompute-method applies to --recompute-granularity full only")
    if args.attention_backend == "flex":
        raise ArgumentError("--attention-backend flex has no backward on CPU and is for inference; use auto, sdpa or triton")
    dp = world_size // (tp * pp)
    validate_args(args, dp)
    return dp


def parse_args(argv=None):
    """train.py's arguments; Megatron's parallelism flags select (and add) the megatron ones."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    return (build_megatron_parser() if wants_megatron(argv) else build_parser()).parse_args(argv)


def job_config(args, *, world_size: int) -> JobConfig:
    """Check everything (ArgumentError naming the flag) and turn the namespace into the typed
    JobConfig the trainer and engines read. The namespace goes no further than this."""
    engine = "megatron" if hasattr(args, "tensor_model_parallel_size") else "deepspeed"
    dp = validate_megatron_args(args, world_size) if engine == "megatron" else world_size
    if engine == "deepspeed":
        validate_args(args, dp)
    megatron = {
        k: getattr(args, k)
        for k in (
            "tensor_model_parallel_size",
            "pipeline_model_parallel_size",
            "sequence_parallel",
            "recompute_granularity",
            "recompute_method",
            "recompute_num_layers",
            "use_distributed_optimizer",
            "make_vocab_size_divisible_by",
        )
        if hasattr(args, k)
    }
    blend_paths, blend_weights = parse_data_path(args.data_path) if args.data_path else (None, None)
    job = JobConfig(
        model=ModelConfig(args.model, args.tokenizer, args.attention_backend, args.bf16, args.gradient_checkpointing, args.gem_summary_fast_path),
        data=DataConfig(
            list(args.data or ()),
            args.text_field,
            args.skip_bad_records,
            list(args.contrastive_data) if args.contrastive_data else None,
            args.contrastive_query_field,
            args.contrastive_positive_field,
            blend_paths=blend_paths,
            blend_weights=blend_weights,
            negative_field=args.contrastive_negative_field,
            negatives_required=args.contrastive_negatives_required,
            cache_path=args.data_cache_path,
            teacher=args.contrastive_teacher,
            teacher_cache=args.contrastive_teacher_cache,
        ),
        batch=BatchConfig(
            args.seq_length,
            args.micro_batch_size,
            args.global_batch_size,
            args.contrastive_batch_size,
            args.contrastive_max_length,
            dp,
            contrastive_micro_batch_size=args.contrastive_micro_batch_size,
        ),
        optimizer=OptimizerConfig(
            args.train_iters,
            args.lr,
            args.contrastive_lr,
            args.min_lr_ratio,
            args.lr_warmup_fraction,
            args.weight_decay,
            args.adam_beta1,
            args.adam_beta2,
            args.clip_grad,
            args.seed,
        ),
        checkpoint=CheckpointConfig(
            args.save,
            args.load,
            args.load_fallback,
            args.save_interval,
            args.hf_export_interval,
            args.exit_after_iters,
            args.hf_export_self_contained,
            save_total_limit=args.save_total_limit,
            overwrite=args.overwrite_output_dir,
        ),
        run=RunConfig(args.log_interval, not args.no_progress, args.exit_signal_handler, args.distributed_timeout_minutes, args.check_for_nan_in_loss_and_grad),
        parallel=ParallelConfig(engine=engine, deepspeed_config=args.deepspeed_config, **megatron),
        gem=gem_config_from_args(args),
        validation=validation_config_from_args(args),
        wandb=WandbConfig(args.wandb_project, args.wandb_exp_name, args.wandb_save_dir),
    )
    if engine == "deepspeed":
        from .ds_config import load_ds_config

        try:  # types, ZeRO stage and the batch-size arithmetic, before any model is loaded
            load_ds_config(job.parallel.deepspeed_config, job, None)
        except ValueError as e:
            raise ArgumentError(f"--deepspeed {e}" if job.parallel.deepspeed_config else str(e)) from e
    return job
