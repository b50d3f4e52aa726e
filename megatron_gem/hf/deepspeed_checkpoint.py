"""A checkpoint of train.py's DeepSpeed engine back to HF files (``convert_checkpoint.py
deepspeed-to-hf``), for every engine configuration train.py writes:

* ZeRO-0 (no --deepspeed, or stage 0), fp32: the module's own weights (mp_rank_00_model_states.pt,
  read with ``torch.load(weights_only=True)``);
* ZeRO-0 with --bf16: the optimizer's fp32 master weights (fp32_groups), matched to the
  parameters in the optimizer's own order (train.py's param_groups: decayed matrices, then the
  rest) and checked against the module's bf16 copies, which must be their rounding;
* ZeRO-1/2/3 (any precision): DeepSpeed's own consolidation, zero_to_fp32, with every file it
  reads loaded weights-only (``_weights_only_zero_to_fp32``): tensors, containers and three
  DeepSpeed record types, never a pickled callable, so a foreign checkpoint cannot run code;
* summary mode (--gem-train summary): the checkpoint holds only what trained (adapter, logit
  scale); the output is the adapter folder train.py exports (hf/summary_files.py) over the base
  checkpoint given as ``model_dir``.

Full mode writes fp32 safetensors + config + tokenizer with the GEM tokens + gem_config.json +
the embedder files. A checkpoint's manifest.json is checked first (a missing or truncated file
is named; a file that cannot be read is named when it is read); the output follows common/outputs.py (a manifest of sizes; a non-empty target only
with ``overwrite``)."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import types
from unittest import mock

import torch

from ..common.errors import ModelLoadError
from ..common.manifest import MANIFEST, CheckpointError, verify, write_manifest
from ..common.outputs import building_dir, replace_dir_atomic
from ..gem.config import CONFIG_NAME, GEMConfig

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def checkpoint_tag_dir(ds_dir: str, tag: str | None) -> str:
    """The tag directory of a --save directory: ``tag``, else the one ``latest`` names.
    ModelLoadError naming the directory when there is none."""
    if tag is None:
        latest = os.path.join(ds_dir, "latest")
        if not os.path.isfile(latest):
            found = sorted(n for n in os.listdir(ds_dir) if n.startswith("global_step") and os.path.isdir(os.path.join(ds_dir, n)))
            hint = f" (it holds {', '.join(found[-3:])}: pass --tag)" if found else " (not a train.py --save directory of the DeepSpeed engine)"
            raise ModelLoadError(f"--input {ds_dir}: no 'latest' file naming a checkpoint{hint}")
        with open(latest, "rb") as f:
            raw = f.read(256)
        tag = raw.decode("utf-8", "replace").strip()
        if not tag or "/" in tag or "\x00" in tag:
            raise ModelLoadError(f"{latest}: does not name a checkpoint ({raw[:40]!r})")
    path = os.path.join(ds_dir, tag)
    if not os.path.isdir(path):
        raise ModelLoadError(f"--input {ds_dir}: checkpoint {tag!r} does not exist there")
    if not any(os.path.isfile(os.path.join(path, n)) for n in MODEL_STATES):
        raise ModelLoadError(f"{path}: no {MODEL_STATES[0]} (nor {MODEL_STATES[1]}); not a DeepSpeed checkpoint")
    return path


def _safe_load(path: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: pickle, zip and torch raise many kinds
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not isinstance(state.get("module"), dict):
        raise CheckpointError(f"{path}: no 'module' state dict; not a DeepSpeed model-states file")
    return state


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))


def _parameter_names(module: dict, buffers) -> list[str]:
    """The module's parameters in state-dict order, without buffers and without the second name
    of a tied tensor (torch.load keeps the sharing): named_parameters' order."""
    seen, names = set(), []
    for name, t in module.items():
        if name in buffers or _storage_key(t) in seen:
            continue
        seen.add(_storage_key(t))
        names.append(name)
    return names


def _zero0_state(path: str) -> dict[str, torch.Tensor]:
    """Parameters of a ZeRO-0 model-states file, fp32: the fp32 master weights when the
    optimizer kept them (bf16), else the module's own (fp32 training)."""
    state = _safe_load(path)
    module = state["module"]
    groups = (state.get("optimizer") or {}).get("fp32_groups")
    if not groups:
        return {k: v.float() for k, v in module.items()}
    names = _parameter_names(module, set(state.get("buffer_names") or ()))
    # train.py's param_groups (hf/model.py): matrices decay, vectors and the logit scale do not.
    decay = [n for n in names if module[n].dim() >= 2 and not n.startswith("logit_scale")]
    order = decay + [n for n in names if n not in decay]
    flat = [t for group in groups for t in group]
    if len(flat) != len(order) or any(tuple(t.shape) != tuple(module[n].shape) for n, t in zip(order, flat)):
        raise CheckpointError(f"{path}: its {len(flat)} fp32 master weights do not match the module's {len(order)} parameters")
    masters = {}
    for name, master in zip(order, flat):
        if not torch.equal(master.to(module[name].dtype), module[name]):
            raise CheckpointError(f"{path}: the fp32 master weight of {name} does not round to the module's {module[name].dtype} copy")
        masters[_storage_key(module[name])] = master.float()
    # A tied name gets its tensor's master; a buffer stays as the module has it.
    return {name: masters.get(_storage_key(t), t.float()) for name, t in module.items()}


# The DeepSpeed types an optimizer-state file pickles beside its tensors (DeepSpeed 0.19): a
# loss scaler's attributes, the ZeRO stage enum and ZeRO-1/2's fragment records. Allowing these
# classes lets ``weights_only`` loading rebuild them; nothing else (no callable) is allowed.
def _deepspeed_safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


class _WeightsOnlyTorch(types.ModuleType):
    """``torch`` as zero_to_fp32 sees it: the same module except ``load``, which always loads
    weights-only (zero_to_fp32 passes ``weights_only=False`` to every file it reads)."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def load(f, *args, **kwargs):
        kwargs["weights_only"] = True
        return torch.load(f, *args, **kwargs)


@contextlib.contextmanager
def _weights_only_zero_to_fp32():
    """DeepSpeed's zero_to_fp32 module, reading every checkpoint file weights-only."""
    from deepspeed.utils import zero_to_fp32

    with mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()), torch.serialization.safe_globals(_deepspeed_safe_globals()):
        yield zero_to_fp32


def deepspeed_state(tag_dir: str) -> dict[str, torch.Tensor]:
    """fp32 tensors of every parameter a checkpoint directory of the DeepSpeed engine holds,
    under GEMModel's names (``lm.*``, ``logit_scale.*``, summary mode ``adapter.*``). Every file
    is read weights-only: a file that needs more than tensors and DeepSpeed's record types to
    load is refused (CheckpointError naming it), never unpickled."""
    names = os.listdir(tag_dir)
    if not any(n.endswith("_optim_states.pt") for n in names):  # ZeRO-0: no partitioned optimizer state
        return _zero0_state(os.path.join(tag_dir, MODEL_STATES[0]))
    try:
        with _weights_only_zero_to_fp32() as zero_to_fp32, contextlib.redirect_stdout(io.StringIO()):  # its progress prints
            return dict(zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir), tag=os.path.basename(tag_dir)))
    except pickle.UnpicklingError as e:  # weights-only refused a global: name the file's verdict, not torch's advice
        reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise CheckpointError(f"{tag_dir}: refusing to load it: a file holds more than tensors and DeepSpeed's checkpoint records ({reason})") from e
    except Exception as e:  # DeepSpeed's reader raises whatever a bad file makes it raise
        raise CheckpointError(f"{tag_dir}: DeepSpeed's zero_to_fp32 cannot read it ({type(e).__name__}: {e})") from e


def _run_gem_config(ds_dir: str, tag_dir: str) -> GEMConfig | None:
    for where in (ds_dir, tag_dir):
        if os.path.isfile(os.path.join(where, CONFIG_NAME)):
            try:
                return GEMConfig.load(where)
            except ValueError as e:
                raise ModelLoadError(str(e)) from e
    return None


def deepspeed_to_hf(ds_dir: str, out_dir: str, *, model_dir: str, tag: str | None = None, overwrite: bool = False, log=print) -> str:
    """A DeepSpeed checkpoint of train.py (``ds_dir``: its --save directory; ``tag``: default the
    one ``latest`` names) -> HF files in ``out_dir`` (module docstring). ``model_dir``: the HF
    checkpoint the run started from (config, tokenizer; summary mode: the base the adapter
    applies to); full mode re-adds the GEM tokens to its tokenizer from the run's
    gem_config.json, and they must land on the recorded ids."""
    tag_dir = checkpoint_tag_dir(ds_dir, tag)
    if os.path.isfile(os.path.join(tag_dir, MANIFEST)):
        # A missing or truncated file is named before anything reads it (sizes: hashing a
        # checkpoint with its optimizer states would cost more than the conversion).
        verify(tag_dir, digests=False)
    gem = _run_gem_config(ds_dir, tag_dir)
    state = deepspeed_state(tag_dir)
    if gem is not None and gem.summary_mode:
        return _summary_adapter_to_hf(state, gem, tag_dir, out_dir, model_dir=model_dir, overwrite=overwrite, log=log)
    return _full_to_hf(state, gem, tag_dir, out_dir, model_dir=model_dir, overwrite=overwrite, log=log)


def _full_to_hf(state, gem, tag_dir, out_dir, *, model_dir, overwrite, log) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .export import add_embedder_files

    lm_state = {k[len("lm.") :]: v for k, v in state.items() if k.startswith("lm.")}
    if not lm_state or "model.embed_tokens.weight" not in lm_state:
        raise ModelLoadError(f"{tag_dir}: no 'lm.*' weights; not a full-mode checkpoint of train.py's DeepSpeed engine")
    hf_config = AutoConfig.from_pretrained(model_dir)
    base_rows = hf_config.vocab_size
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if gem is not None:
        from ..gem.tokens import find_gem_tokens

        if find_gem_tokens(tokenizer, gem) is None:
            tokenizer.add_special_tokens({"additional_special_tokens": gem.special_tokens}, replace_extra_special_tokens=False)
        ids = tokenizer.convert_tokens_to_ids(gem.special_tokens)
        if gem.special_token_ids and list(ids) != list(gem.special_token_ids):
            raise ModelLoadError(f"--model {model_dir}: the GEM tokens get ids {ids} in its tokenizer but the run used {gem.special_token_ids}: wrong --model")
    # Full mode trains on rows padded to a multiple of 64 (gem.tokens.pad_vocab_rows); the run's
    # own export drops them, and so does this: the real rows are add_gem_tokens' max(base, tokenizer).
    vocab = min(lm_state["model.embed_tokens.weight"].shape[0], max(base_rows, len(tokenizer)))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name in lm_state:
            lm_state[name] = lm_state[name][:vocab]
    hf_config.vocab_size = vocab
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    missing, unexpected = lm.load_state_dict(lm_state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and hf_config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelLoadError(f"{tag_dir}: parameters do not match --model {model_dir}'s architecture (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if hf_config.tie_word_embeddings:
        lm.tie_weights()
    with building_dir(out_dir) as tmp:
        lm.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if gem is not None:
            gem.save(tmp)
            add_embedder_files(tmp, source=f"tools/convert_checkpoint.py deepspeed-to-hf from `{tag_dir}` (base `{model_dir}`)", name=out_dir)
        write_manifest(tmp, digests=False)
    replace_dir_atomic(tmp, out_dir, overwrite=overwrite, flag="--output")
    log(f"[convert] consolidated {tag_dir} ({len(lm_state)} tensors, fp32) into {out_dir}")
    return out_dir


def _summary_adapter_to_hf(state, gem, tag_dir, out_dir, *, model_dir, overwrite, log) -> str:
    """Summary mode: the adapter's deltas (GEMModel's ``adapter.deltas.<key>.lora_A/B``) as the
    adapter folder train.py exports, over the base checkpoint ``model_dir``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..gem.adapter import adapter_key
    from .export import export_summary_adapter_state
    from .summary import DEFAULT_HF_TARGETS, adapter_shapes

    hf_config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    names = adapter_shapes(skeleton, tuple(gem.adapter_targets) or DEFAULT_HF_TARGETS)
    hf_state, missing = {}, []
    for name in names:
        for part in ("lora_A", "lora_B"):
            key = f"adapter.deltas.{adapter_key(name)}.{part}"
            if key not in state:
                missing.append(key)
            else:
                hf_state[f"{name}.{part}.weight"] = state[key].float()
    if missing or not names:
        raise ModelLoadError(f"{tag_dir}: the adapter does not match --model {model_dir}'s layers (missing {missing[:3]})")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        export_summary_adapter_state(hf_state, hf_config.to_dict(), tokenizer, gem, out_dir, base_path=model_dir, overwrite=overwrite)
    except ValueError as e:  # the base's digest or tokens are not the run's
        raise ModelLoadError(f"--model {model_dir}: {e}") from e
    log(f"[convert] summary-mode adapter of {tag_dir} ({len(names)} layers) into {out_dir} (base {model_dir})")
    return out_dir
