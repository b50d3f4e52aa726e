#!/usr/bin/env python
"""Benchmark of `megatron-gem serve` (docs/serving.md, "Measured"). Last line: one JSON object.

What it measures, on a GEM model of SmolLM2-135M (--model DIR, or by default a summary-mode
adapter on SmolLM2-135M-Instruct with the chat template as embed template and random deltas,
built once and cached: speed and memory do not depend on training), fp32, --threads threads:

1. memory: RSS of one GEM server (after a warm-up: one chat answer, one embedding batch) vs the
   two-model stack it replaces: the base LLM loaded for chat and a separate embedder process
   (GEMEmbedder on the same folder), each with the HTTP framework imported and the same warm-up.
   Target: server <= 0.55x the stack.
2. query embedding cost: read from the chat prefill (the K summary steps over the cached prompt,
   what return_embedding adds) vs embedding the same message with a separate call, both
   in-process on the same loaded model (compute only), and over HTTP (a chat answer with and
   without return_embedding, against a /v1/embeddings call). Target: prefill read <= 0.1x.
3. embedding throughput (texts/s) on --texts held-out texts of ~--chars characters (pieces of the
   Python tutorial's paragraphs, then of the GNU info manuals: text no recipe trains on; the texts
   of tools/bench_vllm_plugin.py): the server (requests of 32 texts, 8 at once) and
   GEMEmbedder.encode in alternating --rounds (medians), SentenceTransformer.encode on the same
   folder, all-MiniLM-L6-v2, and the GEM vLLM plugin's /v1/embeddings on the same folder and
   requests: with --vllm started here (vLLM's environment, make vllm-venv; after our server has
   stopped, so the two never share the cores), or a running one at --vllm-url.
   Target: server >= 1.2x GEMEmbedder.encode, and above vLLM when given.
4. latency p50/p99 under load: --clients async openai clients mixing /v1/embeddings (4 texts)
   and streaming chat (--chat-tokens tokens) for --seconds.

Figures taken while other jobs use the cores are not measurements: say so beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))  # bench_vllm_plugin.start_plugin (--vllm)


def log(msg: str) -> None:
    print(f"[bench_serve {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a GEM export or summary-mode adapter folder (default: the cached SmolLM2 bench adapter)")
    p.add_argument("--texts", type=int, default=256)
    p.add_argument("--chars", type=int, default=320)
    p.add_argument("--threads", type=int, default=2, help="torch threads of every process (the server's OMP_NUM_THREADS)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the load test")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--chat-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15, help="repeats of each query-embedding timing")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the server and GEMEmbedder.encode throughput (medians reported)")
    p.add_argument("--vllm", action="store_true", help="start the GEM vLLM plugin (.venv-vllm) on the same folder and time its /v1/embeddings too")
    p.add_argument("--vllm-url", default=None, help="a vLLM server (GEM plugin) serving the same model: its /v1/embeddings throughput is included")
    p.add_argument("--vllm-model", default=None, help="the model name the vLLM server expects (default: its first /v1/models entry)")
    p.add_argument("--skip", nargs="*", default=[], choices=("memory", "query", "throughput", "load", "baselines"), help="parts to leave out")
    p.add_argument("--role", choices=("chat", "embed"), default=None, help=argparse.SUPPRESS)  # one process of the two-model stack
    return p.parse_args(argv)


# ---- the model and the texts ----


def bench_model() -> str:
    """The default model: a summary-mode adapter (K = 1, chat embed template) on SmolLM2-135M-
    Instruct with random deltas, exported once into the cache."""
    from megatron_gem.packaged_models import DEFAULT_CACHE, smollm2_135m_dir

    out = os.path.join(DEFAULT_CACHE, "bench_serve_smollm2_summary_chat")
    if os.path.isfile(os.path.join(out, "gem_config.json")):
        return out
    from megatron_gem.hf.export import export_summary_adapter
    from megatron_gem.testing import tiny_summary_model

    base = smollm2_135m_dir()
    lm, tok, cfg, adapter = tiny_summary_model(base, 1, seed=0)
    cfg.embed_template = "chat"
    export_summary_adapter(lm, adapter, tok, cfg, out, base_path=base)
    return out


def rss_mb(pid: int | None = None) -> float:
    import psutil

    return psutil.Process(pid or os.getpid()).memory_info().rss / 2**20


# ---- the two-model stack (one process per role) ----


def stack_role(role: str, model_dir: str, threads: int) -> dict:
    """Load one model of the stack with the HTTP framework imported, warm it up as the server is
    warmed up, report its RSS."""
    import fastapi  # noqa: F401  (the serving framework each process of the stack would run)
    import torch
    import uvicorn  # noqa: F401

    from megatron_gem.eval.corpora import held_out_pieces

    torch.set_num_threads(threads)
    texts = held_out_pieces(32, 320)
    if role == "chat":
        from megatron_gem.hf.summary_files import load_generation_model

        lm, tok = load_generation_model(model_dir)  # a summary-mode folder's generation model is its base
        prompt = tok(tok.apply_chat_template([{"role": "user", "content": texts[0]}], add_generation_prompt=True, tokenize=False), add_special_tokens=False)
        ids = torch.tensor([prompt["input_ids"]])
        with torch.no_grad():
            lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False, pad_token_id=tok.eos_token_id)
    else:
        from megatron_gem import GEMEmbedder

        emb = GEMEmbedder.from_pretrained(model_dir)
        emb.encode(texts, batch_size=32)
    return {"role": role, "rss_mb": rss_mb()}


def run_role(role: str, model_dir: str, threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=REPO, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--model", model_dir, "--threads", str(threads), "--role", role],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"stack role {role} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["rss_mb"]


# ---- the server ----


async def post_all(url: str, path: str, bodies: list[dict], concurrency: int, headers=None) -> list[dict]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=1800, headers=headers) as c:

        async def one(body):
            async with sem:
                r = await c.post(path, json=body)
                r.raise_for_status()
                return r.json()

        return await asyncio.gather(*(one(b) for b in bodies))


def server_throughput(url: str, texts: list[str], model: str = "gem", batch: int = 32, concurrency: int = 8) -> float:
    bodies = [{"model": model, "input": texts[i : i + batch]} for i in range(0, len(texts), batch)]
    t0 = time.perf_counter()
    answers = asyncio.run(post_all(url, "/v1/embeddings", bodies, concurrency))
    dt = time.perf_counter() - t0
    assert sum(len(a["data"]) for a in answers) == len(texts)
    return len(texts) / dt


def warm_up(url: str, texts: list[str]) -> None:
    asyncio.run(post_all(url, "/v1/embeddings", [{"input": texts[:32]}], 1))
    asyncio.run(post_all(url, "/v1/chat/completions", [{"messages": [{"role": "user", "content": texts[0]}], "max_tokens": 16, "temperature": 0}], 1))


def http_query_cost(url: str, messages: list[str], repeats: int) -> dict:
    """Median seconds: chat (max_tokens 1) without and with return_embedding, and a separate
    /v1/embeddings call of the same message; interleaved so that drift hits all three."""
    import httpx

    plain, prefill, separate = [], [], []
    with httpx.Client(base_url=url, timeout=600) as c:
        for i in range(repeats):
            m = messages[i % len(messages)]
            chat = {"messages": [{"role": "user", "content": m}], "max_tokens": 1, "temperature": 0}
            for bucket, path, body in (
                (plain, "/v1/chat/completions", chat),
                (prefill, "/v1/chat/completions", {**chat, "return_embedding": True}),
                (separate, "/v1/embeddings", {"input": m}),
            ):
                t0 = time.perf_counter()
                c.post(path, json=body).raise_for_status()
                bucket.append(time.perf_counter() - t0)
    p, q, s = statistics.median(plain), statistics.median(prefill), statistics.median(separate)
    return {"chat_s": p, "chat_with_embedding_s": q, "separate_embedding_call_s": s, "prefill_read_extra_s": q - p, "ratio": (q - p) / s}


def latency_under_load(url: str, texts: list[str], seconds: float, clients: int, chat_tokens: int) -> dict:
    import openai

    lat = {"embeddings": [], "chat": []}
    refused = {"429": 0, "503": 0}

    async def client_loop(i):
        deadline = time.monotonic() + seconds
        n = 0
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
            while time.monotonic() < deadline:
                n += 1
                t0 = time.perf_counter()
                try:
                    if (i + n) % 2:
                        await client.embeddings.create(model="gem", input=texts[(n * 4) % 200 : (n * 4) % 200 + 4])
                        lat["embeddings"].append(time.perf_counter() - t0)
                    else:
                        stream = await client.chat.completions.create(
                            model="gem", messages=[{"role": "user", "content": texts[n % len(texts)]}], max_tokens=chat_tokens, stream=True, temperature=0
                        )
                        async for _ in stream:
                            pass
                        lat["chat"].append(time.perf_counter() - t0)
                except openai.RateLimitError:
                    refused["429"] += 1
                except openai.InternalServerError:
                    refused["503"] += 1

    async def main():
        await asyncio.gather(*(client_loop(i) for i in range(clients)))

    asyncio.run(main())
    out = {"clients": clients, "seconds": seconds, **{f"refused_{k}": v for k, v in refused.items()}}
    for kind, xs in [*lat.items(), ("all", lat["embeddings"] + lat["chat"])]:
        xs = sorted(xs)
        out[kind] = {"n": len(xs), "p50_s": xs[len(xs) // 2] if xs else None, "p99_s": xs[min(len(xs) - 1, int(0.99 * len(xs)))] if xs else None}
    return out


# ---- in-process baselines ----


def timed(fn, n_texts: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n_texts / (time.perf_counter() - t0)


def in_process_figures(model_dir: str, texts: list[str], threads: int, repeats: int, skip) -> dict:
    import torch

    from megatron_gem import GEMEmbedder
    from megatron_gem.serve.engine import GEMEngine, prompt_cache

    torch.set_num_threads(threads)
    out = {}
    emb = GEMEmbedder.from_pretrained(model_dir)
    emb.encode(texts[:8])
    if "query" not in skip and emb.config.embed_template == "chat":
        engine = GEMEngine(emb, name="bench")
        read, separate = [], []
        tok = emb.tokenizer
        for i in range(repeats):
            wrapped = emb.text_tokens([texts[i % len(texts)]])[0]
            ids = torch.tensor([wrapped])
            with torch.no_grad():
                cache = emb.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=1,
                    do_sample=False,
                    return_dict_in_generate=True,
                    pad_token_id=tok.eos_token_id,
                )
            cache = cache.cache if hasattr(cache, "cache") else cache.past_key_values
            t0 = time.perf_counter()
            emb.embed_from_cache(prompt_cache(cache, ids.shape[1]))
            read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            engine.embed_batch([wrapped])
            separate.append(time.perf_counter() - t0)
        engine.stop()
        out["query_compute"] = {"prefill_read_s": statistics.median(read), "separate_embedding_s": statistics.median(separate)}
        out["query_compute"]["ratio"] = out["query_compute"]["prefill_read_s"] / out["query_compute"]["separate_embedding_s"]
    if "baselines" not in skip and "throughput" not in skip:
        from sentence_transformers import SentenceTransformer

        from megatron_gem.packaged_models import minilm_dir

        st = SentenceTransformer(model_dir, trust_remote_code=True, device="cpu")  # our own installed module (custom mode)
        st.encode(texts[:8])
        out["sentence_transformers_same_export_texts_per_s"] = timed(lambda: st.encode(texts, batch_size=32), len(texts))
        del st
        mini = SentenceTransformer(minilm_dir(), device="cpu")
        mini.encode(texts[:8])
        out["all_minilm_l6_v2_texts_per_s"] = timed(lambda: mini.encode(texts, batch_size=32), len(texts))
        log(
            f"sentence-transformers: {out['sentence_transformers_same_export_texts_per_s']:.2f}; all-MiniLM-L6-v2 {out['all_minilm_l6_v2_texts_per_s']:.2f} texts/s"
        )
    return out


def vllm_rounds(model_dir: str, texts: list[str], args) -> list[float]:
    """texts/s of the GEM vLLM plugin's /v1/embeddings (the same requests as our server's), one
    figure per --rounds: on a server started here on ``model_dir`` (--vllm) or at --vllm-url."""
    import httpx

    proc = None
    if args.vllm:
        from bench_vllm_plugin import start_plugin

        from megatron_gem.integrations.vllm_plugin.server import stop_vllm_server

        proc, url, startup, vllm_log = start_plugin(model_dir)
        log(f"vllm serve up in {startup:.0f} s")
    else:
        url = args.vllm_url
    try:
        model = args.vllm_model or httpx.get(url + "/v1/models", timeout=60).json()["data"][0]["id"]
        server_throughput(url, texts[:64], model=model)  # warm-up
        return [server_throughput(url, texts, model=model) for _ in range(args.rounds)]
    finally:
        if proc is not None:
            stop_vllm_server(proc)
            os.unlink(vllm_log)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = args.model or bench_model()
    if args.role:
        print(json.dumps(stack_role(args.role, model_dir, args.threads)))
        return 0
    load = os.getloadavg()[0]
    log(f"model {model_dir}; load average {load:.1f} on {os.cpu_count()} cores (figures taken beside other jobs are not measurements)")
    from megatron_gem.eval.corpora import held_out_pieces

    texts = held_out_pieces(args.texts, args.chars)
    result = {"model": model_dir, "threads": args.threads, "texts": len(texts), "mean_chars": sum(map(len, texts)) / len(texts), "load_average_at_start": load}

    from megatron_gem.serve.process import ServerProcess

    env = {"OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    flags = ["--served-model-name", "gem", "--log-level", "warning", "--max-queued-generations", 64, "--max-queued-texts", 4096, "--max-tokens-cap", 1024]
    server = ServerProcess(model_dir, *flags, env=env, cwd=REPO, timeout=900)
    try:
        warm_up(server.url, texts)
        result["server_rss_mb"] = rss_mb(server.pid)
        log(f"server up, RSS after warm-up {result['server_rss_mb']:.0f} MB")
        if "throughput" not in args.skip:
            # Server and GEMEmbedder.encode (in this process, the server idle meanwhile) in
            # alternating rounds: a change in the machine's load hits both alike.
            import torch

            from megatron_gem import GEMEmbedder

            torch.set_num_threads(args.threads)
            emb = GEMEmbedder.from_pretrained(model_dir)
            emb.encode(texts[:8])
            server_throughput(server.url, texts[:64])
            rounds = {"server": [], "encode": []}
            for _ in range(args.rounds):
                rounds["server"].append(server_throughput(server.url, texts))
                rounds["encode"].append(timed(lambda: emb.encode(texts, batch_size=32), len(texts)))
                log(f"round: server /v1/embeddings {rounds['server'][-1]:.2f} texts/s, GEMEmbedder.encode {rounds['encode'][-1]:.2f} texts/s")
            del emb
            result["throughput_rounds"] = rounds
            result["server_embedding_texts_per_s"] = statistics.median(rounds["server"])
            result["gem_embedder_encode_texts_per_s"] = statistics.median(rounds["encode"])
        if "query" not in args.skip:
            result["query_http"] = http_query_cost(server.url, texts[:8], args.repeats)
            log(f"query over HTTP: {result['query_http']}")
        if "load" not in args.skip:
            result["latency_under_load"] = latency_under_load(server.url, texts, args.seconds, args.clients, args.chat_tokens)
            log(f"latency under load: {result['latency_under_load']}")
        result["server_rss_mb_after_all"] = rss_mb(server.pid)
    finally:
        server.stop()

    if (args.vllm or args.vllm_url) and "throughput" not in args.skip:
        result["vllm_rounds"] = vllm_rounds(model_dir, texts, args)
        result["vllm_embedding_texts_per_s"] = statistics.median(result["vllm_rounds"])
        log(f"vLLM /v1/embeddings: {result['vllm_embedding_texts_per_s']:.2f} texts/s (median of {len(result['vllm_rounds'])})")
    result.update(in_process_figures(model_dir, texts, args.threads, args.repeats, args.skip))
    if "memory" not in args.skip:
        chat, embed = run_role("chat", model_dir, args.threads), run_role("embed", model_dir, args.threads)
        result["stack_rss_mb"] = {"chat_llm": chat, "embedder": embed, "total": chat + embed}
        result["rss_ratio"] = result["server_rss_mb"] / (chat + embed)
        log(f"RSS: server {result['server_rss_mb']:.0f} MB vs stack {chat:.0f} + {embed:.0f} MB")

    targets = {}
    if "rss_ratio" in result:
        targets["rss_le_0.55x_stack"] = {"figure": result["rss_ratio"], "met": result["rss_ratio"] <= 0.55}
    if "query_compute" in result:
        targets["prefill_read_le_0.1x_separate"] = {"figure": result["query_compute"]["ratio"], "met": result["query_compute"]["ratio"] <= 0.1}
    if "server_embedding_texts_per_s" in result and "gem_embedder_encode_texts_per_s" in result:
        r = result["server_embedding_texts_per_s"] / result["gem_embedder_encode_texts_per_s"]
        targets["server_ge_1.2x_encode"] = {"figure": r, "met": r >= 1.2}
    if "vllm_embedding_texts_per_s" in result and "server_embedding_texts_per_s" in result:
        r = result["server_embedding_texts_per_s"] / result["vllm_embedding_texts_per_s"]
        targets["server_above_vllm"] = {"figure": r, "met": r > 1.0}
    result["targets"] = targets
    result["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
