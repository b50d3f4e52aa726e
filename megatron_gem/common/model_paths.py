"""Where a model comes from, checked before anything loads: the one place every entry point
asks (train.py ``--model``/``--tokenizer``, tools/preprocess_data.py ``--tokenizer``,
tools/eval_mteb.py and eval_lm.py ``--model``/``--base``, the converter, add_gem_tokens,
``GEMEmbedder.from_pretrained``).

A name is either a local directory or an HF hub repo id. Local paths stay local: a name that
looks like a path (``./x``, ``/x``, ``a/b/c``, ``corpus.jsonl``) and does not exist is refused;
it never falls through to the hub (transformers would retry the network for ~50 s and end in a
long traceback). A repo id is refused while the hub is off (``HF_HUB_OFFLINE``) unless the local
HF cache holds it. A directory that is not a model says what is missing. Everything here reads
at most a few small JSON files: no model is loaded and no network is touched.
"""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager

from .errors import GEMError, ModelLoadError, ModelNotFoundError, one_line

CONFIG_FILE = "config.json"
# Any one of these makes a directory a tokenizer directory (fast, sentencepiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model", "vocab.txt")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_CONFIG = "adapter_config.json"  # a summary-mode adapter folder (hf/summary_files.py)
MEGATRON_META = "megatron_gem.json"  # a megatron-core checkpoint of this project (mcore/checkpoint_io.py)

# huggingface_hub's rule for a repo id ("name" or "owner/name"); anything else can only be a path.
_REPO_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]{1,96}$")
# File suffixes no model repo id ends with: such a name is a file the user meant.
_FILE_SUFFIXES = (".jsonl", ".json", ".txt", ".parquet", ".gz", ".csv", ".safetensors", ".bin", ".pt", ".pth", ".gguf", ".idx", ".md", ".yaml")


def hub_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_path(name: str) -> bool:
    """True when ``name`` cannot be an HF repo id, so it can only mean a local path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or "--" in name or ".." in name or name.lower().endswith(_FILE_SUFFIXES) or not _REPO_ID.match(name)


def _cached(repo_id: str, filenames) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False
    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename), str):
                return True
        except Exception:  # a malformed id or cache: not usable offline
            return False
    return False


def missing_parts(path: str, *, config: bool = True, tokenizer: bool = False, weights: bool = False) -> list[str]:
    """What ``path`` (a directory) lacks to be the model asked for, as words for a message."""
    names = set(os.listdir(path))
    missing = []
    if config and CONFIG_FILE not in names:
        missing.append(CONFIG_FILE)
    if tokenizer and not names & set(TOKENIZER_FILES):
        missing.append(f"tokenizer files (one of {', '.join(TOKENIZER_FILES)})")
    if weights and not names & set(WEIGHT_FILES):
        missing.append(f"weights ({' or '.join(WEIGHT_FILES[:2])})")
    return missing


def check_model_source(
    flag: str, name, *, config: bool = True, tokenizer: bool = False, weights: bool = False, also: tuple[str, ...] = (), expect: str = ""
) -> str:
    """Return ``name`` when it is usable: a readable directory with what is asked (``config``:
    config.json; ``tokenizer``: tokenizer files; ``weights``: safetensors or .bin), or an HF repo
    id the hub can serve (online) or the local HF cache holds (offline). ``also``: files that
    make a directory acceptable by themselves (an adapter folder's adapter_config.json, a
    megatron checkpoint's megatron_gem.json). Otherwise ModelLoadError naming ``flag`` (a
    ModelNotFoundError, also a FileNotFoundError, for a path that does not exist; ``expect``
    says what such a directory should hold): one line, before any network attempt or model load."""
    name = os.fspath(name)
    if not name:
        raise ModelLoadError(f"{flag}: empty model name")
    if os.path.lexists(name) and not os.path.exists(name):
        raise ModelLoadError(f"{flag} {name}: a symbolic link to nowhere (or a link loop)")
    if os.path.exists(name):
        if not os.path.isdir(name):
            raise ModelLoadError(f"{flag} {name}: is a file; expected a checkpoint directory (config.json, tokenizer and weights)")
        if not os.access(name, os.R_OK | os.X_OK):
            raise ModelLoadError(f"{flag} {name}: directory is not readable (permission denied)")
        if any(os.path.isfile(os.path.join(name, f)) for f in also):
            return name
        missing = missing_parts(name, config=config, tokenizer=tokenizer, weights=weights)
        if missing:
            what = "is empty" if not os.listdir(name) else "is not a model directory"
            raise ModelLoadError(f"{flag} {name}: {what}: no {', no '.join(missing)}")
        return name
    if looks_like_path(name):
        raise ModelNotFoundError(f"{flag} {name}: no such directory{f' (expected: {expect})' if expect else ''}")
    if hub_offline():
        wanted = (CONFIG_FILE,) if config else ("tokenizer_config.json", "tokenizer.json")
        if not _cached(name, wanted):
            raise ModelNotFoundError(
                f"{flag} {name}: no such directory, and as an HF repo id it cannot be fetched: the hub is off (HF_HUB_OFFLINE) "
                "and the repo is not in the local HF cache"
            )
    return name


def read_model_config(path: str) -> dict | None:
    """The HF config of a model directory (``config.json``, or the one a megatron checkpoint
    recorded in megatron_gem.json), or of a cached repo id; None when there is none to read."""
    candidates = []
    if os.path.isdir(path):
        candidates = [(os.path.join(path, CONFIG_FILE), None), (os.path.join(path, MEGATRON_META), "hf_config")]
    elif not looks_like_path(path):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, CONFIG_FILE)
            candidates = [(cached, None)] if isinstance(cached, str) else []
        except Exception:
            candidates = []
    for file, key in candidates:
        if os.path.isfile(file):
            try:
                with open(file) as f:
                    data = json.load(f)
            except (OSError, ValueError) as e:
                raise ModelLoadError(f"{file}: unreadable model config ({type(e).__name__}: {e})") from e
            data = data.get(key) if key else data
            if isinstance(data, dict):
                return data
            raise ModelLoadError(f"{file}: not a model config (a JSON object expected)")
    return None


def max_positions(config: dict) -> tuple[int | None, str]:
    """(max_position_embeddings, a note on RoPE scaling) of an HF config dict. HF configs state
    the length a RoPE-scaled model supports in max_position_embeddings itself (Llama-3.1:
    131072 with rope_scaling factor 8 over 8192), so that number is the limit either way."""
    n = config.get("max_position_embeddings")
    n = n if isinstance(n, int) and n > 0 else None
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
    kind = scaling.get("rope_type") or scaling.get("type") if isinstance(scaling, dict) else None
    if kind and kind != "default":
        factor = scaling.get("factor")
        note = f"RoPE scaling {kind!r} (factor {factor}) is already counted in it"
    else:
        note = "the model has no RoPE scaling in its config, so longer rows are positions it never saw"
    return n, note


def _load_error_types() -> tuple:
    kinds = [OSError, ValueError, KeyError, TypeError, RuntimeError]
    try:
        from safetensors import SafetensorError

        kinds.append(SafetensorError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


def unreadable_safetensors(directory: str) -> str | None:
    """The first safetensors file of ``directory`` whose header safetensors refuses (truncated,
    not safetensors at all), or None."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:  # pragma: no cover
        return None
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            path = os.path.join(directory, name)
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except (SafetensorError, OSError):
                return path
    return None


@contextmanager
def loading(what: str, directory: str | None = None):
    """Around a from_pretrained of a folder the user named (``what``: "--model DIR" or the
    path; ``directory``: the folder, to name a bad safetensors file in it): what transformers,
    safetensors or torch raise for a truncated, foreign or mismatched file becomes one
    ModelLoadError. Errors of this project pass through unchanged."""
    try:
        yield
    except GEMError:
        raise
    except _load_error_types() as e:
        bad = unreadable_safetensors(directory) if directory and os.path.isdir(directory) else None
        where = f"{bad}: not a readable safetensors file (truncated or damaged)" if bad else "cannot load it"
        raise ModelLoadError(f"{what}: {where} ({type(e).__name__}: {one_line(e)})") from e
