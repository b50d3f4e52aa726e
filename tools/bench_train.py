#!/usr/bin/env python
"""Training step time of GEM vs plain causal LM on the same model and tokens (CPU or GPU).

Modes (each measured in its own subprocess, so peak memory is per mode):
  causal        plain causal LM step: HF model with its stock sdpa attention, labels = the
                packed rows' own next tokens, position ids restarting per document (HF then
                keeps packed documents apart, as a user's packed SFT/CPT run does)
  gem_ntp       GEM phase-1 step: the same rows with GEM layouts (p_raw of them plain), GEM
                attention (auto backend), GEM labels
  gem_contrast  GEM phase-2 step: InfoNCE over --contrastive-batch-size texts + their views
  summary_contrast           the same phase-2 step in summary mode (--gem-train summary: base
                frozen, adapter at the summary tokens) with its fast path: the text without
                autograd (a prefill keeping the KV cache), then only the summary tokens with it
  summary_contrast_full_row  summary mode without the fast path (the full rows with autograd,
                the fast path's reference): what the fast path itself saves
Each step = forward + backward + AdamW step (over the trainable parameters). Reports median
seconds per step, tokens/s, the GEM/causal ratio (target <= 1.05), the summary/full phase-2
ratio (target <= 0.5) and peak RSS (CPU) or peak CUDA memory. Last line: JSON.

``--memory-sweep N1 N2 ...`` instead measures the memory of one phase-2 forward + backward per
contrastive batch size N, unchunked and with GradCache chunks of ``--contrastive-micro-batch-size``
(training/grad_cache.py, what ``train.py --contrastive-micro-batch-size`` runs), each in a fresh
subprocess: on GPU the peak CUDA memory allocated during the step above what was allocated
before it; on CPU the rise of the process's peak RSS during the step (ru_maxrss after - RSS
before; ``saturated`` when the step did not raise the process peak set by loading, so the rise
is a lower bound).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODES = ("causal", "gem_ntp", "gem_contrast", "summary_contrast", "summary_contrast_full_row")
SUMMARY_MODES = ("summary_contrast", "summary_contrast_full_row")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default="smollm2",
        help="HF checkpoint dir, 'smollm2' (packaged SmolLM2-135M), 'tiny' (2 layers, hidden 64) or 'small' (random Llama: 8 layers, hidden 512, GQA 8/4)",
    )
    p.add_argument("--seq-length", type=int, default=512)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--contrastive-batch-size", type=int, default=16)
    p.add_argument("--contrastive-max-length", type=int, default=64)
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--p-raw", type=float, default=0.8)
    p.add_argument(
        "--summary-tokens",
        nargs="+",
        default=None,
        help="summary mode: existing tokens serving as summary tokens (default: unused special tokens; '<unk>' for tiny)",
    )
    p.add_argument("--adapter-rank", type=int, default=16, help="summary mode: rank of each delta")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="modes to measure (default: all)")
    p.add_argument(
        "--memory-sweep", type=int, nargs="+", default=None, metavar="N", help="measure phase-2 step memory at these contrastive batch sizes (see above)"
    )
    p.add_argument("--contrastive-micro-batch-size", type=int, default=8, help="GradCache chunk of --memory-sweep's chunked runs")
    p.add_argument("--mode", choices=MODES, default=None, help=argparse.SUPPRESS)  # internal: one mode
    p.add_argument("--memory-point", type=int, nargs=2, default=None, help=argparse.SUPPRESS)  # internal: N, chunk (0: none)
    return p.parse_args(argv)


def load(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.model == "tiny":
        from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        return make_tiny_llama(len(tok), max_position_embeddings=4096), tok, "tiny random Llama"
    if args.model == "small":
        from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        shape = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4)
        return make_tiny_llama(len(tok), max_position_embeddings=4096, **shape), tok, "small random Llama (8 layers, hidden 512, GQA 8/4)"
    path = args.model
    if path == "smollm2":
        from megatron_gem.packaged_models import smollm2_135m_dir

        path = smollm2_135m_dir()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tok, path


def corpus_texts() -> tuple[list[str], str]:
    try:
        from megatron_gem.eval.corpora import python_doc_paragraphs

        return python_doc_paragraphs(part="library"), "python3.11-doc library paragraphs"
    except Exception as e:  # noqa: BLE001 - any missing corpus: say so, fall back
        from megatron_gem.testing import sample_sentences

        print(f"bench_train: no Python docs ({e}); using generated sentences", file=sys.stderr)
        return sample_sentences(4000, seed=0, min_words=10, max_words=120), "generated sentences"


def run_mode(args) -> dict:
    import torch

    from megatron_gem.data import ContrastiveDataset, GEMDataLoader, InMemoryCorpus, make_ntp_loader
    from megatron_gem.gem import GEMConfig
    from megatron_gem.hf.model import GEMModel, prepare_gem_lm
    from megatron_gem.training.step import contrastive_micro_loss, ntp_loss_scale, ntp_micro_loss

    torch.manual_seed(0)
    lm, tok, model_name = load(args)
    texts, corpus_name = corpus_texts()
    summary = args.mode in SUMMARY_MODES
    tokens = args.summary_tokens or (["<unk>"] if args.model in ("tiny", "small") else [])
    cfg = GEMConfig(p_raw=args.p_raw, train_mode="summary", summary_tokens=tokens, adapter_rank=args.adapter_rank) if summary else GEMConfig(p_raw=args.p_raw)
    prepare_gem_lm(lm, tok, cfg, backend="auto", gradient_checkpointing=False)
    corpus = InMemoryCorpus.from_texts(texts, tok)
    model = GEMModel(lm, cfg, fast_summary=args.mode != "summary_contrast_full_row")
    if summary:  # the adapter starts as the base model (B = 0); give it a value so the step is a real one
        torch.nn.init.normal_(next(iter(model.adapter.deltas.values())).lora_B, std=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-5)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(device)
    if args.mode in ("gem_contrast", *SUMMARY_MODES):
        ds = ContrastiveDataset(corpus, cfg, max_text_len=args.contrastive_max_length, seq_length=args.seq_length, pad_id=tok.pad_token_id)
        loader = GEMDataLoader(ds, micro_batch_size=args.contrastive_batch_size, data_parallel_rank=0, data_parallel_size=1)
    else:
        loader = make_ntp_loader(
            corpus, cfg, args.seq_length, micro_batch_size=args.micro_batch_size, tokenizer=tok, data_parallel_rank=0, data_parallel_size=1
        )
    if args.mode == "causal":
        lm.set_attn_implementation("sdpa")  # the stock path over the same rows and token count
    it = iter(loader)
    times, tokens = [], 0
    for i in range(args.warmup + args.steps):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(it).items()}
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if args.mode == "causal":
            out = lm(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["input_ids"].masked_fill(batch["doc_ids"] < 0, -100))
            loss = out.loss
        elif args.mode == "gem_ntp":
            loss = ntp_micro_loss(model, batch, scale=ntp_loss_scale(1.0, dp_size=1, accum_steps=1, global_tokens=int((batch["labels"] != -100).sum()))).loss
        else:
            loss = contrastive_micro_loss(model, batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens += int((batch["doc_ids"] >= 0).sum())
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "mode": args.mode,
        "median_step_s": statistics.median(times),
        "tokens_per_s": tokens / sum(times),
        "peak_memory_mb": peak_mb,
        "model": model_name,
        "corpus": corpus_name,
        "device": device.type,
        "trainable_parameters": sum(p.numel() for p in trainable),
    }


def _ratio(results, a, b):
    return results[a]["median_step_s"] / results[b]["median_step_s"] if a in results and b in results else None


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_memory_point(args) -> dict:
    """One phase-2 forward + backward of a contrastive batch of N texts, chunked or not."""
    import torch

    from megatron_gem.data import ContrastiveDataset, GEMDataLoader, InMemoryCorpus
    from megatron_gem.gem import GEMConfig
    from megatron_gem.hf.model import GEMModel, prepare_gem_lm
    from megatron_gem.training.step import contrastive_micro_loss
    from megatron_gem.training.step_plan import cached_backward

    n, chunk = args.memory_point
    torch.manual_seed(0)
    lm, tok, model_name = load(args)
    texts, corpus_name = corpus_texts()
    cfg = GEMConfig(p_raw=args.p_raw)
    prepare_gem_lm(lm, tok, cfg, backend="auto", gradient_checkpointing=False)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model = GEMModel(lm, cfg).to(device)
    ds = ContrastiveDataset(
        InMemoryCorpus.from_texts(texts[: 4 * n], tok),
        cfg,
        max_text_len=args.contrastive_max_length,
        seq_length=args.seq_length,
        pad_id=tok.pad_token_id,
        chunk_size=chunk or None,
    )
    batch = next(iter(GEMDataLoader(ds, micro_batch_size=n, data_parallel_rank=0, data_parallel_size=1)))

    def move(b):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else [move(c) for c in v] if k == "chunks" else v) for k, v in b.items()}

    batch = move(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    before_rss, peak_before = _rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    if chunk:
        loss = cached_backward(lambda c: model(c, "embed"), lambda l, last: l.backward(), batch, weight=1.0)
    else:
        part = contrastive_micro_loss(model, batch)
        part.loss.backward()
        loss = part.cl_loss
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {
        "contrastive_batch_size": n,
        "chunk": chunk or None,
        "loss": loss,
        "step_s": seconds,
        "device": device.type,
        "model": model_name,
        "corpus": corpus_name,
    }
    if device.type == "cuda":
        out["step_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20 - before
    else:
        out["step_peak_mb"] = peak_after - before_rss
        out["saturated"] = peak_after <= peak_before
    return out


def memory_sweep(args, argv) -> dict:
    base = [sys.executable, os.path.abspath(__file__), *argv]
    points = []
    for n in args.memory_sweep:
        for chunk in (0, args.contrastive_micro_batch_size):
            if chunk >= n:
                continue  # a chunk as large as the batch is the unchunked run
            print(f"bench_train: memory of a contrastive step, N={n}, chunk={chunk or 'none'} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(
                [*base, "--memory-point", str(n), str(chunk)], check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")
            )
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            points.append(r)
            flag = " (saturated: lower bound)" if r.get("saturated") else ""
            print(
                f"  N={n:4d} chunk={str(r['chunk']):4s} step peak {r['step_peak_mb']:8.1f} MB{flag}  {r['step_s']:.2f} s  loss {r['loss']:.5f}", file=sys.stderr
            )
    return {
        "model": points[0]["model"],
        "corpus": points[0]["corpus"],
        "device": points[0]["device"],
        "seq_length": args.seq_length,
        "contrastive_max_length": args.contrastive_max_length,
        "contrastive_micro_batch_size": args.contrastive_micro_batch_size,
        "memory": points,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.mode:
        print(json.dumps(run_mode(args)))
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    if args.memory_point:
        print(json.dumps(run_memory_point(args)))
        return 0
    if args.memory_sweep:
        print(json.dumps(memory_sweep(args, argv)))
        return 0
    results = {}
    for mode in args.modes:
        print(f"bench_train: measuring {mode} ({args.warmup}+{args.steps} steps) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--mode", mode]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONWARNINGS="ignore")).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"  {mode:25s} {r['median_step_s']:.3f} s/step  {r['tokens_per_s']:.0f} tokens/s  peak {r['peak_memory_mb']:.0f} MB", file=sys.stderr, flush=True)
    first = results[args.modes[0]]
    ratio = _ratio(results, "gem_ntp", "causal")
    frozen = _ratio(results, "summary_contrast", "gem_contrast")
    summary = {
        "model": first["model"],
        "corpus": first["corpus"],
        "device": first["device"],
        "seq_length": args.seq_length,
        "micro_batch_size": args.micro_batch_size,
        "contrastive_batch_size": args.contrastive_batch_size,
        "contrastive_max_length": args.contrastive_max_length,
        "step_s": {m: r["median_step_s"] for m, r in results.items()},
        **{
            f"{m}_step_s": results[k]["median_step_s"]
            for m, k in (("causal", "causal"), ("gem_ntp", "gem_ntp"), ("gem_contrastive", "gem_contrast"))
            if k in results
        },
        "summary_contrastive_step_s": results["summary_contrast"]["median_step_s"] if "summary_contrast" in results else None,
        "gem_ntp_over_causal": ratio,
        "target_ratio": 1.05,
        "meets_target": ratio <= 1.05 if ratio is not None else None,
        "summary_over_full_contrastive": frozen,
        "summary_full_row_over_full_contrastive": _ratio(results, "summary_contrast_full_row", "gem_contrast"),
        "summary_target_ratio": 0.5,
        "summary_meets_target": frozen <= 0.5 if frozen is not None else None,
        "peak_memory_mb": {m: r["peak_memory_mb"] for m, r in results.items()},
        "tokens_per_s": {m: r["tokens_per_s"] for m, r in results.items()},
        "trainable_parameters": {m: r["trainable_parameters"] for m, r in results.items()},
    }
    if ratio is not None:
        print(f"GEM mixed-NTP step / causal step = {ratio:.3f} (target <= 1.05)")
    if frozen is not None:
        print(f"summary-mode phase-2 step / full-mode phase-2 step = {frozen:.3f} (target <= 0.5)")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
