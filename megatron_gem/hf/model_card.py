"""The model card (README.md) of a GEM export: base model, GEM settings, training data and steps,
how to use it, and the evaluation figures that were measured on it.

Written at export from what the directory holds (gem_config.json, config.json, the run's
training_info.json when train.py wrote it). Evaluation figures are never guessed: the card says
"not evaluated" until ``tools/eval_mteb.py`` / ``tools/eval_lm.py --update-model-card`` ran on the
directory; :func:`record_evaluation` then keeps the figures in ``eval_results.json`` (one entry
per tool, with the command that produced it) and rewrites the card's evaluation section.
"""

from __future__ import annotations

import json
import os

from ..common.files import write_json_atomic, write_text_atomic
from ..common.manifest import rewriting
from ..gem.config import GEMConfig

CARD = "README.md"
EVAL_RESULTS = "eval_results.json"
TRAINING_INFO = "training_info.json"
_EVAL_HEADING = "## Evaluation"


def _read_json(path: str):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _base_model(info: dict | None) -> str | None:
    model = ((info or {}).get("config") or {}).get("model") or {}
    return model.get("path")


def _gem_rows(gem: GEMConfig, tokens: list[str]) -> list[tuple[str, str]]:
    ids = ", ".join(f"`{t}` = {i}" for t, i in zip(gem.special_tokens, gem.special_token_ids)) or ", ".join(f"`{t}`" for t in tokens)
    rows = [
        ("summary tokens K", f"{gem.num_special_tokens} ({ids})"),
        ("phase-1 layout", f"{gem.layout} (a document stays plain with p_raw = {gem.p_raw})"),
        ("phase 2 from step", str(gem.contrastive_from_step)),
        ("phase-2 contrastive weight alpha", str(gem.alpha)),
        ("positive view token dropout", str(gem.prefix_dropout)),
        ("suffix sees BOS", str(gem.suffix_sees_bos)),
        ("query prompt", repr(gem.query_prompt) if gem.query_prompt else "none"),
    ]
    if gem.embed_template:  # GEMEmbedder and the sentence-transformers module wrap every text in it
        rows.append(("embed template", repr(gem.embed_template)))
    if gem.train_mode != "full":
        rows.append(("train mode", gem.train_mode))
    return rows


def _training_lines(info: dict | None, source: str | None) -> list[str]:
    if info is None:
        where = f" {source}" if source else ""
        return [f"Written by{where}; the checkpoint records no training details beyond the GEM settings above."]
    cfg = info.get("config") or {}
    data, batch, opt, par = (cfg.get(k) or {} for k in ("data", "batch", "optimizer", "parallel"))
    lines = [
        f"- steps: {info.get('step')} of {opt.get('train_iters')} (train.py, {par.get('engine', '?')} engine)",
        f"- data: {', '.join(f'`{p}`' for p in data.get('paths') or []) or '?'}",
    ]
    if data.get("pairs"):
        lines.append(f"- phase-2 pairs: {', '.join(f'`{p}`' for p in data['pairs'])} (fields {data.get('query_field')!r} -> {data.get('positive_field')!r})")
    else:
        lines.append("- phase-2 positives: self-supervised (a token-dropout view of each text)")
    lines += [
        f"- sequence length {batch.get('seq_length')}, global batch {batch.get('global_batch_size')} rows, "
        f"contrastive batch {batch.get('contrastive_batch_size')} texts per rank (max {batch.get('contrastive_max_length')} tokens)",
        f"- learning rate {opt.get('lr')} (phase 1), {opt.get('contrastive_lr')} (phase 2); seed {opt.get('seed')}",
    ]
    return lines


def _usage(name: str, st_modules: list[dict], has_query_prompt: bool) -> str:
    custom = any(not m.get("type", "").startswith("sentence_transformers.") for m in st_modules)
    trust = ", trust_remote_code=True" if custom else ""
    query = '\nq = model.encode(["a question"], prompt_name="query")  # the prompt it was trained with' if has_query_prompt else ""
    gem_query = '\nq = emb.encode_queries(["a question"])' if has_query_prompt else ""
    st = f"""```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer("{name}"{trust})
vectors = model.encode(["first text", "second text"]){query}
```

"""
    note = "\nThe sentence-transformers module of this model (megatron_gem's GEMSentenceEncoder, K > 1) needs megatron_gem installed.\n" if custom else ""
    return f"""{st if st_modules else ""}```python
from megatron_gem import GEMEmbedder
from transformers import AutoModelForCausalLM

emb = GEMEmbedder.from_pretrained("{name}")
vectors = emb.encode(["first text", "second text"]){gem_query}
lm = AutoModelForCausalLM.from_pretrained("{name}")  # generation: an ordinary causal LM
```
{note}"""


def evaluation_section(results: dict | None) -> str:
    """The card's evaluation section from eval_results.json's content (figures as measured)."""
    if not results:
        return (
            f"{_EVAL_HEADING}\n\nNot evaluated yet. `python tools/eval_mteb.py --model DIR --output OUT --update-model-card` "
            "and `python tools/eval_lm.py --model DIR --output OUT --update-model-card` record their figures here.\n"
        )
    parts = [_EVAL_HEADING, ""]
    for kind in sorted(results):
        entry = results[kind]
        parts += [f"### {kind}", "", f"Measured with `{entry.get('command', '?')}`.", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in sorted(entry.get("scores", {}).items()):
            for metric, value in sorted(metrics.items()):
                parts.append(f"| {task} | {metric} | {value:.4f} |" if isinstance(value, (int, float)) else f"| {task} | {metric} | {value} |")
        parts.append("")
    return "\n".join(parts)


def model_card_text(directory: str, *, source: str | None = None, name: str | None = None) -> str:
    """The card of the export in ``directory`` (read from its files). ``source``: how it was
    made when train.py did not make it (e.g. ``tools/convert_checkpoint.py megatron-to-hf``);
    ``name``: the path users load it from (default ``directory``; exports pass their final
    directory, not the temporary one they are written in)."""
    gem = GEMConfig.load(directory)
    info = _read_json(os.path.join(directory, TRAINING_INFO))
    hf = _read_json(os.path.join(directory, "config.json")) or {}
    modules = _read_json(os.path.join(directory, "modules.json")) or []  # none: no sentence-transformers files
    base = _base_model(info)
    name = os.path.normpath(name or directory)
    parts = name.split(os.sep)
    title = "/".join(parts[-2:]) if parts[-1] == "hf" and len(parts) > 1 else parts[-1]  # runs/demo/hf -> demo/hf
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:"]
    front += [f"- {t}" for t in ("megatron-gem", "gem", "text-generation", "feature-extraction", "sentence-transformers")]
    if base and not os.path.isabs(base):
        front.append(f"base_model: {base}")
    front.append("---")
    arch = ", ".join(f"{k} {hf[k]}" for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size") if k in hf)
    lines = front + [
        "",
        f"# {title}",
        "",
        "One decoder-only model that both generates text and embeds it (GEM: K summary tokens after the text and a "
        "modified attention mask; made with megatron-gem). An embedding is the mean of the K summary tokens' last-layer "
        "states, L2-normalised; plain text (generation) runs as the ordinary causal LM.",
        "",
        "## Base model",
        "",
        f"{f'`{base}`' if base else 'not recorded'}; {', '.join(hf.get('architectures') or ['?'])} ({arch}).",
        "",
        "## GEM configuration",
        "",
        "| setting | value |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in _gem_rows(gem, gem.special_tokens)],
        "",
        "## Training",
        "",
        *_training_lines(info, source),
        "",
        "## Usage",
        "",
        _usage(name, modules, bool(gem.query_prompt)),
        evaluation_section(_read_json(os.path.join(directory, EVAL_RESULTS))),
    ]
    return "\n".join(lines)


def write_model_card(directory: str, *, source: str | None = None, name: str | None = None) -> str:
    path = os.path.join(directory, CARD)
    write_text_atomic(path, model_card_text(directory, source=source, name=name))
    return path


def record_evaluation(directory: str, kind: str, scores: dict[str, dict[str, float]], *, command: str) -> str:
    """Keep ``scores`` ({task: {metric: value}}, as the tool measured them) under ``kind`` in
    ``directory``'s eval_results.json and rewrite the card's evaluation section (the rest of the
    card is kept). A manifest there is verified before and updated after. Returns the card path."""
    if not os.path.isfile(os.path.join(directory, "gem_config.json")):
        raise ValueError(f"{directory}: no gem_config.json; --update-model-card needs a GEM export directory")
    with rewriting(directory):
        results = _read_json(os.path.join(directory, EVAL_RESULTS)) or {}
        results[kind] = {"command": command, "scores": scores}
        write_json_atomic(os.path.join(directory, EVAL_RESULTS), results)
        path = os.path.join(directory, CARD)
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read()
            head = text.split(_EVAL_HEADING, 1)[0]
            write_text_atomic(path, head + evaluation_section(results))
        else:
            write_model_card(directory)
    return path
