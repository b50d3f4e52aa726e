"""lm-eval harness runs: offline multiple-choice tasks (local YAML), MMLU when reachable,
and held-out perplexity, on a checkpoint path or a live model.

Offline tasks (templates in ``lm_tasks/``, data written at run time by
:func:`prepare_lm_tasks`, never committed):
  gem_trivia_mc        red-trivia 4-way, distractors from the same category
  gem_wordnet_def_mc   WordNet "pick the definition" 4-way
Pseudo-task ``perplexity``: token-level perplexity on Python tutorial paragraphs (text no
recipe here trains on; see :func:`megatron_gem.eval.perplexity.heldout_perplexity`).
Any other name (``mmlu``, ``hellaswag``, ...) goes to lm-eval's own task registry and needs
its data to be reachable (the HF hub or a local datasets cache).
"""

from __future__ import annotations

import json
import os
from importlib import resources

from . import builders

OFFLINE_MC = ("gem_trivia_mc", "gem_wordnet_def_mc")
PERPLEXITY = "perplexity"
DEFAULT_TASKS = OFFLINE_MC + (PERPLEXITY,)

_BUILDERS = {"gem_trivia_mc": builders.trivia_mc, "gem_wordnet_def_mc": builders.wordnet_definition_mc}


def prepare_lm_tasks(out_dir: str, *, max_items: int | None = 500, seed: int = 0) -> str:
    """Write the offline MC data (jsonl) and their YAML task files into ``out_dir``; returns
    the folder to pass as ``TaskManager(include_path=...)``. Deterministic in (max_items, seed)."""
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    for task in OFFLINE_MC:
        items = _BUILDERS[task](max_items, seed)
        with open(os.path.join(out_dir, f"{task}.jsonl"), "w") as f:
            for it in items:
                f.write(json.dumps({"question": it.question, "choices": it.choices, "answer": it.answer}) + "\n")
        template = resources.files(__package__).joinpath("lm_tasks", f"{task}.yaml").read_text()
        with open(os.path.join(out_dir, f"{task}.yaml"), "w") as f:
            f.write(template.replace("__DATA_DIR__", out_dir))
    return out_dir


def _load_hflm(model, tokenizer, *, batch_size: int, device: str | None, dtype: str | None):
    from lm_eval.models.huggingface import HFLM

    if isinstance(model, (str, os.PathLike)):
        import torch

        # HFLM defaults to cuda; on a CPU-only machine say cpu explicitly.
        kw = {"pretrained": str(model), "batch_size": batch_size, "device": device or ("cuda" if torch.cuda.is_available() else "cpu")}
        if dtype:
            kw["dtype"] = dtype
        return HFLM(**kw)
    if tokenizer is None:
        raise ValueError("a live model needs its tokenizer")
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)


def _torch_dtype(dtype: str | None):
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype or "", torch.float32)


def _hf_model_and_tokenizer(model, tokenizer, dtype):
    if not isinstance(model, (str, os.PathLike)):
        return model, tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model), dtype=_torch_dtype(dtype)), AutoTokenizer.from_pretrained(str(model))


def run_lm_eval(
    model,
    tokenizer=None,
    *,
    tasks=DEFAULT_TASKS,
    work_dir: str,
    max_items: int | None = 500,
    limit: int | float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    seed: int = 0,
    perplexity_texts: int = 200,
    perplexity_max_length: int = 256,
    show_progress_bar: bool = True,
    base: str | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``tasks`` on ``model`` (checkpoint dir, hub name, or live HF model + tokenizer).

    Returns {task: {metric: value}} with accuracies in [0, 1] and ``perplexity`` under the
    ``perplexity`` pseudo-task. MC data and YAML go to ``work_dir/lm_tasks``.

    A summary-mode adapter folder evaluates its base model: the deltas act only at summary
    tokens, which generation never feeds, so the base model IS the generation model (its
    digest is checked against gem_config.json; ``base`` overrides the base_model it names).
    """
    from ..hf.summary_files import is_gem_adapter_dir, load_generation_model

    if isinstance(model, (str, os.PathLike)) and is_gem_adapter_dir(str(model)):
        model, tokenizer = load_generation_model(str(model), base=base, dtype=_torch_dtype(dtype))
        if device:
            model.to(device)
    elif base is not None:
        raise ValueError(f"base={base!r} is only for a summary-mode adapter folder, and {model!r} is not one")
    tasks = list(tasks)
    unknown_empty = [t for t in tasks if not t]
    if unknown_empty:
        raise ValueError("empty task name")
    results: dict[str, dict[str, float]] = {}
    lm_tasks = [t for t in tasks if t != PERPLEXITY]
    if lm_tasks:
        import lm_eval
        from lm_eval.tasks import TaskManager

        include = prepare_lm_tasks(os.path.join(work_dir, "lm_tasks"), max_items=max_items, seed=seed)
        # Indexing lm-eval's thousands of built-in tasks takes long on a small machine: only
        # when a non-offline task is asked for.
        manager = TaskManager(include_path=include, include_defaults=any(t not in OFFLINE_MC for t in lm_tasks))
        missing = [t for t in lm_tasks if t not in manager.all_tasks]
        if missing:
            raise ValueError(f"unknown lm-eval task(s) {missing}; offline ones: {list(OFFLINE_MC)} and '{PERPLEXITY}'")
        lm = _load_hflm(model, tokenizer, batch_size=batch_size, device=device, dtype=dtype)
        try:
            out = lm_eval.simple_evaluate(
                model=lm,
                tasks=lm_tasks,
                task_manager=manager,
                limit=limit,
                bootstrap_iters=0,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
        except Exception as e:  # datasets raise many kinds when the hub is unreachable
            hub = [t for t in lm_tasks if t not in OFFLINE_MC]
            if hub and ("offline" in str(e).lower() or "connect" in str(e).lower() or "hub" in str(e).lower()):
                raise RuntimeError(
                    f"lm-eval could not load the data of {hub}: it lives on the HF hub, which is not reachable "
                    f"(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE or no network). Run those where the hub is reachable, "
                    f"or use the offline tasks {list(OFFLINE_MC)}. Cause: {type(e).__name__}: {e}"
                ) from e
            raise
        for name, metrics in out["results"].items():
            clean = {}
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not k.endswith("_stderr,none") and "," in k:
                    clean[k.split(",")[0]] = float(v)
            results[name] = clean
        model = lm.model if isinstance(model, (str, os.PathLike)) else model
        tokenizer = lm.tokenizer if tokenizer is None else tokenizer
    if PERPLEXITY in tasks:
        from .perplexity import heldout_perplexity, heldout_texts

        model, tokenizer = _hf_model_and_tokenizer(model, tokenizer, dtype)
        texts = heldout_texts(perplexity_texts, seed)
        ppl = heldout_perplexity(model, tokenizer, texts, max_length=perplexity_max_length, batch_size=batch_size, show_progress_bar=show_progress_bar)
        results[PERPLEXITY] = {"perplexity": ppl, "texts": float(len(texts))}
    return results


def results_table(results: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per model; MC accuracies (x100) and perplexity."""
    tasks = sorted({t for r in results.values() for t in r if t != PERPLEXITY})
    cols = [f"{t} acc" for t in tasks] + (["perplexity"] if any(PERPLEXITY in r for r in results.values()) else [])
    lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, r in results.items():
        cells = [f"{100 * r[t]['acc']:.1f}" if t in r and "acc" in r[t] else "-" for t in tasks]
        if cols and cols[-1] == "perplexity":
            cells.append(f"{r[PERPLEXITY]['perplexity']:.2f}" if PERPLEXITY in r else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
