"""Part d: one mixed-NTP GEM training step with transformers (Llama-3.2-1B shape, random
weights, bf16): triton vs sdpa vs plain causal attention; tokens/s, MFU, peak memory."""

from __future__ import annotations

import math
import statistics
import time
import traceback

import numpy as np
import torch

from .common import PEAK_BF16_TFLOPS, Clock, attention_flops, error_text, log
from .workload import document_lengths

LLAMA_3_2_1B = dict(  # the published Llama-3.2-1B shape (random weights here, built from config)
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
TINY_LLAMA = dict(
    vocab_size=512,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)


def training_batch(rows: int, L: int, vocab: int, table: np.ndarray, seed: int) -> dict:
    """A mixed-NTP micro-batch in the project's contract: documents with corpus lengths and random
    token ids, each laid out by draw_layout / build_layout (K=1, p_raw 0.8, split; the special
    token is the last vocabulary id), packed best-fit into rows of L (data.packing)."""
    from megatron_gem.data.packing import assemble_row, collate_rows, pack_lengths
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.layout import build_layout, draw_layout

    config = GEMConfig(num_special_tokens=1, p_raw=0.8, layout="split")
    special = [vocab - 1]
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    while total < rows * L:
        n = int(min(rng.choice(table), L - 1))
        tokens = rng.integers(0, vocab - 1, size=n)
        layout, cut = draw_layout(n, config, rng)
        piece = build_layout(tokens, layout, special, cut=cut)
        pieces.append(piece)
        total += len(piece[0])
    offsets, order = pack_lengths([len(p[0]) for p in pieces], L)
    built = [assemble_row([pieces[i] for i in order[offsets[r] : offsets[r + 1]]], L) for r in range(len(offsets) - 1)]
    built.sort(key=lambda r: -int((r[2] >= 0).sum()))  # the fullest rows
    return collate_rows(built[:rows])


def count_matmul_params(model) -> int:
    """Parameters that take part in matmuls per token: every nn.Linear weight (the tied LM head
    included once as a matmul), not the embedding lookup or the norms."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def part_d(ctx: dict, clock: Clock, res: dict, save) -> None:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.gem.losses import ntp_loss
    from megatron_gem.kernels import allowed_pair_count

    cuda, dev, quick = ctx["cuda"], ctx["device"], ctx["quick"]
    shape = TINY_LLAMA if quick else LLAMA_3_2_1B
    L = 96 if quick else 4096
    rows = 2 if quick else int(ctx.get("train_rows", 4))
    warmup, steps = (0, 1) if quick else (2, 4)
    dtype = torch.bfloat16
    table, source = document_lengths()
    res.update(
        model="tiny Llama (CPU quick mode)" if quick else "Llama-3.2-1B shape (random init)",
        config=shape,
        seq_len=L,
        rows=rows,
        dtype="bf16",
        optimizer="AdamW (fused on CUDA), lr 1e-5",
        transformers=transformers.__version__,
        corpus=source,
        rope="the config's default RoPE (speed-neutral)",
        variants={},
        skipped=[],
    )
    config = LlamaConfig(**shape, attention_dropout=0.0, use_cache=False)
    torch.manual_seed(0)
    with torch.device(dev):
        model = LlamaForCausalLM(config).to(dtype)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = count_matmul_params(model)
    res.update(params=n_params, matmul_params=n_matmul)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    batch = {k: v.to(dev) for k, v in training_batch(rows, L, shape["vocab_size"], table, seed=7).items()}
    tokens = batch["input_ids"].numel()
    gem_pairs = int(allowed_pair_count(batch["doc_ids"], batch["roles"]).sum())
    causal_pairs = rows * L * (L + 1) // 2
    res.update(
        tokens_per_step=tokens,
        trained_tokens=int((batch["labels"] != -100).sum()),
        documents=len(torch.unique(batch["doc_ids"][batch["doc_ids"] >= 0])),
        gem_documents=len(torch.unique(batch["doc_ids"][batch["roles"] == 1])),
        allowed_pairs=gem_pairs,
        causal_pairs=causal_pairs,
    )
    save()
    D, Hq, layers = shape["head_dim"], shape["num_attention_heads"], shape["num_hidden_layers"]

    def step(variant):
        opt.zero_grad(set_to_none=True)
        kwargs = dict(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
        if variant != "causal_flash":
            kwargs.update(doc_ids=batch["doc_ids"], roles=batch["roles"])
        logits = model(**kwargs).logits
        loss = ntp_loss(logits, batch["labels"])
        loss.backward()
        opt.step()
        return loss.detach()

    variants = [("causal_flash", "sdpa"), ("gem_triton", "triton"), ("gem_sdpa", "sdpa")]
    for vi, (variant, backend) in enumerate(variants):
        if clock.out(reserve_s=2):
            res["skipped"].append({"variant": variant, "why": "part time budget spent"})
            continue
        out = {"attention_backend": backend}
        res["variants"][variant] = out
        try:
            use_gem_attention(model, backend=backend)
            ctxm = None
            if variant == "causal_flash" and cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                ctxm = SDPBackend.FLASH_ATTENTION
                out["sdpa_backend"] = "FLASH_ATTENTION (forced)"
            elif variant == "causal_flash":
                out["sdpa_backend"] = "default selection (CPU)"
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            if ctxm is not None:
                try:
                    t0 = time.perf_counter()
                    with sdpa_kernel(ctxm):
                        step(variant)
                    torch.cuda.synchronize()
                    out["first_step_s"] = time.perf_counter() - t0
                except RuntimeError as e:
                    ctxm = None
                    out["sdpa_backend"] = f"default selection (forced flash failed: {error_text(e)[:200]})"
            times, losses = [], []
            for i in range(warmup + steps):
                t0 = time.perf_counter()
                if ctxm is not None:
                    with sdpa_kernel(ctxm):
                        loss = step(variant)
                else:
                    loss = step(variant)
                if cuda:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t0
                losses.append(float(loss))
                if i >= warmup:
                    times.append(dt)
                elif i == 0:
                    out.setdefault("first_step_s", dt)  # includes compiling the kernels
                if clock.out() and times:
                    out["note"] = f"budget: {len(times)} timed steps"
                    break
            pairs = causal_pairs if variant == "causal_flash" else gem_pairs
            step_s = statistics.median(times)
            model_flops = 6 * n_matmul * tokens + 3 * attention_flops(D, Hq, pairs) * layers
            out.update(
                step_s=step_s,
                step_times_s=times,
                tokens_per_s=tokens / step_s,
                losses=losses,
                loss_finite=all(math.isfinite(x) for x in losses),
                attention_pairs=pairs,
                model_flops_per_step=model_flops,
                achieved_tflops=model_flops / step_s / 1e12,
            )
            if cuda:
                out["mfu"] = out["achieved_tflops"] / PEAK_BF16_TFLOPS
                out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
            else:
                out["mfu"] = None
                out["note"] = "CPU quick mode: MFU and memory have no meaning here"
            log(
                f"  d: {variant}: {out['tokens_per_s']:.0f} tokens/s, step {step_s * 1e3:.1f} ms"
                + (f", MFU {out['mfu']:.3f}, peak {out['peak_memory_gib']:.1f} GiB" if cuda else "")
            )
        except Exception as e:  # noqa: BLE001
            out["error"] = error_text(e)
            log(traceback.format_exc())
            if cuda:
                torch.cuda.empty_cache()
        save()
    res["mfu_convention"] = (
        f"(6 * matmul params * tokens + 3 * 4 * D * Hq * attention pairs * layers) / step time / {PEAK_BF16_TFLOPS} TFLOP/s (dense bf16 datasheet peak); attention pairs: causal for causal_flash, allowed GEM pairs otherwise"
    )
