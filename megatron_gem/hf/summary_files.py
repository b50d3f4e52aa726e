"""Summary-mode adapter folders: a PEFT activated-LoRA (aLoRA) folder plus GEM's own files.

What ``export_summary_adapter`` (hf/export.py) writes (docs/integrations.md, "Summary-mode adapters"):

  adapter_config.json        PEFT LoraConfig: peft_type LORA, task_type CAUSAL_LM, r, lora_alpha,
                             target_modules, alora_invocation_tokens = the K summary token ids,
                             base_model_name_or_path
  adapter_model.safetensors  PEFT's keys: base_model.model.<module>.lora_A.weight [r, in] and
                             .lora_B.weight [out, r]; the file's metadata carries the marker
                             {"gem_summary_adapter": "1", "gem_invocation_tokens": "[ids]"}
  gem_config.json            train_mode "summary", special_token_ids, base_model, base_model_digest
  tokenizer files            the base tokenizer, unchanged (summary tokens are existing tokens)
  base/                      self_contained only: the base checkpoint's config and weight files
  manifest.json              last (common/manifest.py)

PEFT activates an aLoRA from the LAST occurrence of the invocation tokens to the end of the
input. On the embed layout ``text SPECIAL*K`` that is exactly the K summary positions, so PEFT
(>= 0.18, with our GEM attention for K >= 2) reproduces our vectors whatever the text contains.

The guard (``read_summary_adapter``): a runtime that drops ``alora_invocation_tokens`` applies
the deltas to every token and gives wrong vectors without a word. Our loaders refuse a folder
whose adapter_config lacks the key, whose tokens differ from gem_config's ids, or whose weight
file's marker disagrees with its config (a folder re-saved by such a tool); and GEMEmbedder
refuses a model that carries PEFT LoRA layers (hf/summary_files.py: ``refuse_peft_layers``),
since its readout does not drive PEFT's activation offsets.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch

from ..common.errors import ModelLoadError
from ..common.files import write_json_atomic
from ..common.manifest import sha256_of
from ..gem.adapter import SummaryAdapter, adapter_key
from ..gem.config import CONFIG_NAME, GEMConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BASE_DIR = "base"  # self-contained folders: the base checkpoint lives here (why not at the root: see write_base_copy)
MARKER = "gem_summary_adapter"
MARKER_TOKENS = "gem_invocation_tokens"
PEFT_PREFIX = "base_model.model."
# The files of an HF checkpoint that hold (or index) its weights: what the base digest covers.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")
BASE_CONFIG_FILES = ("config.json", "generation_config.json")


# ---- the base checkpoint and its digest ----


def base_weight_files(path: str) -> list[str]:
    """The weight files (and weight indexes) at the top of an HF checkpoint directory, sorted;
    never an adapter's own file."""
    if not os.path.isdir(path):
        raise ModelLoadError(f"base model {path}: not a directory")
    names = sorted(n for n in os.listdir(path) if n.endswith(WEIGHT_SUFFIXES) and not n.startswith("adapter_model") and os.path.isfile(os.path.join(path, n)))
    if not any(n.endswith((".safetensors", ".bin")) for n in names):
        raise ModelLoadError(f"base model {path}: no weight files (*.safetensors / *.bin)")
    return names


_digest_cache: dict[tuple, str] = {}


def base_model_digest(path: str) -> str:
    """``sha256:<hex>`` over (name, size, sha256) of every weight file of the checkpoint at
    ``path`` (common/manifest.py's hashing). Renaming or resharding the files changes it;
    config and tokenizer files are not covered. Cached per process by (path, sizes, mtimes):
    hashing reads every byte (about 1 GB/s per core, tools/bench_digest.py)."""
    names = base_weight_files(path)
    stats = tuple((n, os.stat(os.path.join(path, n)).st_size, os.stat(os.path.join(path, n)).st_mtime_ns) for n in names)
    key = (os.path.realpath(path), stats)
    if key not in _digest_cache:
        h = hashlib.sha256()
        for name, size, _ in stats:
            h.update(f"{name}\t{size}\t{sha256_of(os.path.join(path, name))}\n".encode())
        _digest_cache[key] = "sha256:" + h.hexdigest()
    return _digest_cache[key]


def write_base_copy(base_path: str, out_dir: str) -> None:
    """Copy the base checkpoint's config and weight files to ``out_dir/base``. Not the folder's
    root: transformers' from_pretrained on a directory with adapter_config.json attaches the
    adapter itself, as an aLoRA that nothing activates (the base model's vectors, silently)."""
    dst = os.path.join(out_dir, BASE_DIR)
    os.makedirs(dst, exist_ok=True)
    for name in [n for n in BASE_CONFIG_FILES if os.path.isfile(os.path.join(base_path, n))] + base_weight_files(base_path):
        shutil.copyfile(os.path.join(base_path, name), os.path.join(dst, name))


# ---- the PEFT files ----


def peft_state_dict(adapter: SummaryAdapter, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's key names (CPU, contiguous). ``state``: the adapter's
    own state dict when gathered elsewhere (ZeRO-3); default ``adapter.state_dict()``."""
    state = adapter.state_dict() if state is None else state
    out = {}
    for name in adapter.names:
        for part in ("lora_A", "lora_B"):
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = state[f"deltas.{adapter_key(name)}.{part}"].detach().cpu().contiguous()
    return out


def load_peft_state_dict(adapter: SummaryAdapter, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy PEFT-named weights into ``adapter``; every key and shape must match."""
    own = peft_state_dict(adapter)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ModelLoadError(f"{source}: adapter keys do not match the base model's layers (missing {missing[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for name in adapter.names:
            delta = adapter.delta_for(name)
            for part in ("lora_A", "lora_B"):
                key = f"{PEFT_PREFIX}{name}.{part}.weight"
                param = getattr(delta, part)
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ModelLoadError(f"{source}: {key} has shape {tuple(state[key].shape)}, the base model's layer needs {tuple(param.shape)}")
                param.copy_(state[key].to(param.dtype))


def peft_target_modules(lm, adapter: SummaryAdapter) -> list[str]:
    """PEFT ``target_modules``: the short layer names ("q_proj", ...) when PEFT's suffix match
    over ``lm`` selects exactly the adapted layers (what serving engines expect), else the full
    module names."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapter.names})
    linear = [n for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)]
    matched = {n for n in linear if any(n == t or n.endswith("." + t) for t in short)}
    return short if matched == set(adapter.names) else sorted(adapter.names)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def peft_adapter_config(adapter: SummaryAdapter, config: GEMConfig, target_modules: list[str], base_name: str) -> dict:
    rank = {d.rank for d in adapter.deltas.values()}
    scaling = {d.scaling for d in adapter.deltas.values()}
    if rank != {config.adapter_rank} or scaling != {config.adapter_alpha / config.adapter_rank}:
        raise ValueError(
            f"the adapter's rank/scaling {rank}/{scaling} differ from GEMConfig adapter_rank={config.adapter_rank} adapter_alpha={config.adapter_alpha}"
        )
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.adapter_rank,
        "lora_alpha": _number(config.adapter_alpha),
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "target_modules": target_modules,
        "alora_invocation_tokens": list(config.special_token_ids),
        "base_model_name_or_path": base_name,
    }


def summary_export_config(tokenizer, config: GEMConfig, base_path: str) -> GEMConfig:
    """The GEMConfig an export saves (base_model and base_model_digest filled in), after the
    checks: summary mode, summary tokens that the tokenizer maps to the recorded ids, and a base
    whose digest is the one the run recorded (if it recorded one). Raises ValueError."""
    if not config.summary_mode:
        raise ValueError(f"export_summary_adapter: GEMConfig.train_mode={config.train_mode!r}; an adapter export is for train_mode='summary'")
    ids = list(config.special_token_ids)
    vocab = tokenizer.get_vocab()
    if len(ids) != config.num_special_tokens or [vocab.get(t) for t in config.summary_tokens] != ids:
        raise ValueError(
            f"export_summary_adapter: GEMConfig.summary_tokens {config.summary_tokens} / special_token_ids {ids} do not match the tokenizer "
            f"(ids {[vocab.get(t) for t in config.summary_tokens]}); run gem.tokens.summary_token_ids(tokenizer, config) first"
        )
    digest = base_model_digest(base_path)
    if config.base_model_digest and config.base_model_digest != digest:
        raise ValueError(
            f"export_summary_adapter: base_path {base_path} has digest {digest}, but the run recorded {config.base_model_digest} "
            f"(GEMConfig.base_model_digest) for its base {config.base_model or '?'}: the base checkpoint changed or is another one"
        )
    saved = GEMConfig.from_dict(config.to_dict())
    saved.base_model = config.base_model or os.path.abspath(base_path)
    saved.base_model_digest = digest
    return saved


def write_summary_adapter_files(
    out_dir: str,
    *,
    lm,
    adapter: SummaryAdapter,
    tokenizer,
    config: GEMConfig,
    base_path: str,
    state: dict[str, torch.Tensor] | None = None,
    self_contained: bool = False,
    extra: dict | None = None,
    saved: GEMConfig | None = None,
) -> GEMConfig:
    """Write every file of the folder except the manifest into ``out_dir``; returns the saved
    GEMConfig. ``saved``: what ``summary_export_config`` returned (computed here when None)."""
    from safetensors.torch import save_file

    saved = saved or summary_export_config(tokenizer, config, base_path)
    ids = list(saved.special_token_ids)
    os.makedirs(out_dir, exist_ok=True)
    metadata = {"format": "pt", MARKER: "1", MARKER_TOKENS: json.dumps(ids)}
    save_file(peft_state_dict(adapter, state), os.path.join(out_dir, ADAPTER_WEIGHTS), metadata=metadata)
    write_json_atomic(os.path.join(out_dir, ADAPTER_CONFIG), peft_adapter_config(adapter, saved, peft_target_modules(lm, adapter), saved.base_model))
    tokenizer.save_pretrained(out_dir)
    saved.save(out_dir)
    if extra:
        write_json_atomic(os.path.join(out_dir, "training_info.json"), extra)
    if self_contained:
        write_base_copy(base_path, out_dir)
    return saved


# ---- reading a folder back: the guard ----


def is_summary_adapter_dir(path: str) -> bool:
    """True for a folder that is (or claims to be) an adapter: it has adapter_config.json, or a
    gem_config.json with train_mode "summary". Such a folder must go through
    ``read_summary_adapter``, never through a plain from_pretrained."""
    path = str(path)
    if not os.path.isdir(path):
        return False
    if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        return True
    cfg = os.path.join(path, CONFIG_NAME)
    if os.path.isfile(cfg):
        try:
            with open(cfg) as f:
                return json.load(f).get("train_mode") == "summary"
        except (OSError, ValueError):
            return False
    return False


def is_gem_adapter_dir(path: str) -> bool:
    """An adapter folder that a GEM export wrote (or that claims to be one): it also has
    gem_config.json. Generation-side loaders route only these through the guard; someone's
    plain PEFT LoRA folder (no gem_config.json) is theirs to load as it is."""
    return is_summary_adapter_dir(path) and os.path.isfile(os.path.join(str(path), CONFIG_NAME))


@dataclass
class SummaryAdapterFolder:
    """A checked adapter folder: its GEMConfig, PEFT config, PEFT-named weights and the base
    checkpoint directory it needs (digest verified)."""

    path: str
    config: GEMConfig
    peft_config: dict
    state: dict[str, torch.Tensor]
    base_path: str


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: line {e.lineno}: invalid JSON ({e.msg})") from e


def local_checkpoint_dir(name: str) -> str:
    """``name`` as a directory: itself when it is one, else its snapshot in the local HF cache
    (never a download). Raises what the cache lookup raised when it is neither."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, local_files_only=True)


def resolve_base(path: str, config: GEMConfig, base: str | None) -> str:
    """The base checkpoint directory of adapter folder ``path``: ``base`` when given, else the
    folder's own ``base/`` (self-contained), else gem_config.base_model (a directory, or a hub
    name already in the local HF cache)."""
    if base is not None:
        where = str(base)
    elif os.path.isdir(os.path.join(path, BASE_DIR)):
        where = os.path.join(path, BASE_DIR)
    elif config.base_model:
        try:
            where = local_checkpoint_dir(config.base_model)
        except Exception as e:  # not a directory and not in the local cache
            raise ModelLoadError(
                f"{path}: its base model {config.base_model!r} (gem_config.json base_model) is neither a directory nor in the local HF cache ({type(e).__name__}); "
                f"pass base=<directory of the base checkpoint> (tools: --base)"
            ) from e
    else:
        raise ModelLoadError(f"{path}: gem_config.json names no base_model; pass base=<directory of the base checkpoint> (tools: --base)")
    if os.path.isfile(os.path.join(where, ADAPTER_CONFIG)):
        raise ModelLoadError(f"{path}: base {where} is itself an adapter folder; the base must be a plain HF checkpoint")
    return where


def read_summary_adapter(path: str, *, base: str | None = None, verify_base: bool = True) -> SummaryAdapterFolder:
    """Read and check an adapter folder (the guard). Raises ModelLoadError naming the file when:
    gem_config.json is missing or not train_mode "summary"; adapter_config.json is missing, not
    a LoRA, uses rsLoRA/DoRA/dropout, lacks ``alora_invocation_tokens`` (a plain LoRA: applied
    to every token it would give other vectors) or names other tokens than gem_config's ids;
    r/lora_alpha differ from gem_config; the weight file lacks the marker or its tokens disagree;
    or the base checkpoint's digest is not gem_config.base_model_digest (a wrong base)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = str(path)
    cfg_path, peft_path, weights = (os.path.join(path, n) for n in (CONFIG_NAME, ADAPTER_CONFIG, ADAPTER_WEIGHTS))
    if not os.path.isfile(cfg_path):
        raise ModelLoadError(f"{path}: a PEFT adapter folder without {CONFIG_NAME}: not a megatron_gem summary-mode export (a plain LoRA is not a GEM model)")
    try:
        config = GEMConfig.load(path)
    except ValueError as e:
        raise ModelLoadError(str(e)) from e
    if not config.summary_mode:
        raise ModelLoadError(f"{cfg_path}: train_mode={config.train_mode!r} but the folder has {ADAPTER_CONFIG}; a GEM adapter folder is train_mode 'summary'")
    if not os.path.isfile(peft_path):
        raise ModelLoadError(f"{path}: gem_config.json says train_mode 'summary' but {ADAPTER_CONFIG} is missing")
    peft = _read_json(peft_path)
    if peft.get("peft_type") != "LORA":
        raise ModelLoadError(f"{peft_path}: peft_type={peft.get('peft_type')!r}; a GEM summary adapter is a LORA (activated LoRA)")
    tokens = peft.get("alora_invocation_tokens")
    if not tokens:
        raise ModelLoadError(
            f"{peft_path}: no alora_invocation_tokens: loaded like this the deltas would act on EVERY token (a plain LoRA), not only at the "
            f"summary tokens, and the vectors would be wrong; the folder was re-saved by a tool that drops the key (PEFT < 0.18, some serving "
            f'engines). Re-export it, or restore "alora_invocation_tokens": {config.special_token_ids}'
        )
    if list(tokens) != list(config.special_token_ids):
        raise ModelLoadError(f"{peft_path}: alora_invocation_tokens {tokens} differ from gem_config.json special_token_ids {config.special_token_ids}")
    if peft.get("use_rslora") or peft.get("use_dora") or float(peft.get("lora_dropout") or 0.0) != 0.0:
        raise ModelLoadError(f"{peft_path}: use_rslora/use_dora/lora_dropout set; a GEM summary adapter is a plain-scaled LoRA (alpha / r) without dropout")
    if peft.get("r") != config.adapter_rank or float(peft.get("lora_alpha", -1)) != float(config.adapter_alpha):
        raise ModelLoadError(
            f"{peft_path}: r={peft.get('r')} lora_alpha={peft.get('lora_alpha')} differ from gem_config.json adapter_rank={config.adapter_rank} adapter_alpha={config.adapter_alpha}"
        )
    if not os.path.isfile(weights):
        raise ModelLoadError(f"{path}: {ADAPTER_WEIGHTS} is missing")
    with safe_open(weights, framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get(MARKER) != "1":
        raise ModelLoadError(f"{weights}: no {MARKER!r} marker in the file's metadata: not written by export_summary_adapter (or re-saved by another tool)")
    if json.loads(meta.get(MARKER_TOKENS, "null")) != list(config.special_token_ids):
        raise ModelLoadError(
            f"{weights}: the marker's invocation tokens {meta.get(MARKER_TOKENS)} differ from gem_config.json special_token_ids {config.special_token_ids}"
        )
    base_path = resolve_base(path, config, base)
    if verify_base:
        if not config.base_model_digest:
            raise ModelLoadError(f"{cfg_path}: no base_model_digest; cannot check the base checkpoint (re-export with export_summary_adapter)")
        digest = base_model_digest(base_path)
        if digest != config.base_model_digest:
            raise ModelLoadError(
                f"{path}: wrong base checkpoint: {base_path} has weight digest {digest}, but the adapter was trained on "
                f"{config.base_model!r} with digest {config.base_model_digest} (gem_config.json)"
            )
    return SummaryAdapterFolder(path=path, config=config, peft_config=peft, state=load_file(weights), base_path=base_path)


def refuse_peft_layers(model) -> None:
    """Refuse a model carrying PEFT LoRA layers (a PeftModel, or transformers' load_adapter):
    our readout calls the decoder directly and never sets PEFT's aLoRA activation offsets, so
    such a model would give the base model's vectors (aLoRA) or deltas on every token (plain
    LoRA). Load adapter folders with GEMEmbedder.from_pretrained(folder) instead."""
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and isinstance(getattr(module, "lora_A"), torch.nn.ModuleDict):
            raise ModelLoadError(
                f"the model carries PEFT LoRA layers ({name}): GEMEmbedder does not drive PEFT's adapters; load a summary-mode folder with "
                f"GEMEmbedder.from_pretrained(folder) (base model + our summary adapter), or merge a full-mode LoRA first"
            )


# ---- loading ----


def _check_tokenizer(tokenizer, config: GEMConfig, source: str) -> None:
    vocab = tokenizer.get_vocab()
    got = [vocab.get(t) for t in config.summary_tokens]
    if got != list(config.special_token_ids):
        raise ModelLoadError(f"{source}: the tokenizer maps summary tokens {config.summary_tokens} to {got}, gem_config.json says {config.special_token_ids}")


def load_summary_model(path: str, *, base: str | None = None, dtype: torch.dtype | None = None, device=None, verify_base: bool = True):
    """The base model of adapter folder ``path`` (checked by ``read_summary_adapter``) with the
    folder's deltas attached by hf/summary.py's hooks. Returns (lm, tokenizer, config, adapter,
    base_path);
    the caller keeps ``adapter`` (the hooks use it; lm's own state dict stays the base's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .summary import DEFAULT_HF_TARGETS, adapter_shapes, attach_summary_adapter

    folder = read_summary_adapter(path, base=base, verify_base=verify_base)
    config = folder.config
    tokenizer = AutoTokenizer.from_pretrained(path)
    _check_tokenizer(tokenizer, config, path)
    lm = AutoModelForCausalLM.from_pretrained(folder.base_path, dtype=dtype or torch.float32)
    weight = lm.get_input_embeddings().weight
    shapes = adapter_shapes(lm, tuple(config.adapter_targets) or DEFAULT_HF_TARGETS)
    adapter = SummaryAdapter(shapes, rank=config.adapter_rank, alpha=config.adapter_alpha, positions=config.adapter_positions, dtype=weight.dtype)
    load_peft_state_dict(adapter, folder.state, path)
    attach_summary_adapter(lm, config, adapter=adapter)
    if device is not None:
        lm.to(device)
        adapter.to(device)
    return lm, tokenizer, config, adapter, folder.base_path


def load_generation_model(path: str, *, base: str | None = None, dtype: torch.dtype | None = None):
    """(causal LM, tokenizer) for generation from a checkpoint directory. For a summary-mode
    adapter folder that is the base model itself (the deltas act only at summary tokens, which
    generation never feeds), the folder checked by the guard and the base by its digest; any
    other directory (a plain PEFT LoRA folder too) loads as transformers loads it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if is_gem_adapter_dir(path):
        folder = read_summary_adapter(path, base=base)
        return AutoModelForCausalLM.from_pretrained(folder.base_path, dtype=dtype or torch.float32), AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype or torch.float32), AutoTokenizer.from_pretrained(str(path))
