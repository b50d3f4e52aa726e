"""Part b: speed of the Triton kernel against torch.compile'd FlexAttention (same mask_mod) and,
on dense causal, SDPA's flash and cuDNN backends; ms and TFLOP/s at 8k / 16k / 32k."""

from __future__ import annotations

import time
import traceback

import torch

from .common import BWD_FACTOR, Clock, Timer, attention_flops, error_text, log
from .workload import document_lengths, flashmask_doc_range, make_mask

MASKS = ("gem_corpus", "causal", "doc_corpus", "gem_flashmask", "doc_flashmask")


class FlexRunner:
    """torch.compile'd flex_attention with ONE mask_mod (flex_mask_mod over fixed buffers of the
    longest row, refilled per mask), so masks of one shape share one compiled graph."""

    def __init__(self, L_max: int, device, cuda: bool):
        from torch.nn.attention.flex_attention import flex_attention

        from megatron_gem.gem.mask import flex_mask_mod

        self.cuda = cuda
        self.doc = torch.zeros(1, L_max, dtype=torch.int64, device=device)
        self.role = torch.zeros(1, L_max, dtype=torch.int64, device=device)
        # suffix_sees_bos=False: the doc-start tensor flex_mask_mod derives once is never read.
        self.mask_mod = flex_mask_mod(self.doc, self.role, suffix_sees_bos=False)
        self.device = device
        if cuda:
            import torch._dynamo as dynamo

            for name in ("recompile_limit", "cache_size_limit"):  # the name moved across torch versions
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, max(64, getattr(dynamo.config, name)))
                    break
            self.fn = torch.compile(flex_attention)
        else:
            self.fn = flex_attention  # eager (forward only on CPU)

    def block_mask(self, doc, role):
        from torch.nn.attention.flex_attention import create_block_mask

        L = doc.shape[1]
        self.doc[:, :L].copy_(doc)
        self.role[:, :L].copy_(role)
        return create_block_mask(self.mask_mod, 1, None, L, L, device=self.device)

    def __call__(self, q, k, v, block_mask, scale):
        return self.fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _flex_tiles(bm) -> int:
    n = int(bm.kv_num_blocks.sum())
    if bm.full_kv_num_blocks is not None:
        n += int(bm.full_kv_num_blocks.sum())
    return n


def time_fwd_bwd(timer: Timer, f, q, k, v, do, fwd_flops: int, tile_flops: int | None) -> dict:
    """fwd, bwd (backward of one retained forward) and fwd+bwd ms, and TFLOP/s on allowed pairs
    (and on visited tiles when ``tile_flops`` is given)."""
    out = {}
    with torch.no_grad():
        out["fwd_ms"] = timer.ms(lambda: f(q, k, v))
    o = f(q, k, v)
    out["bwd_ms"] = timer.ms(lambda: o.backward(do, retain_graph=True), grad_to_none=[q, k, v])
    o = None
    out["fwd_bwd_ms"] = timer.ms(lambda: f(q, k, v).backward(do), grad_to_none=[q, k, v])
    total = (1 + BWD_FACTOR) * fwd_flops
    out["fwd_tflops"] = fwd_flops / out["fwd_ms"] / 1e9
    out["bwd_tflops"] = BWD_FACTOR * fwd_flops / out["bwd_ms"] / 1e9
    out["fwd_bwd_tflops"] = total / out["fwd_bwd_ms"] / 1e9
    if tile_flops is not None:
        out["fwd_tflops_tiles"] = tile_flops / out["fwd_ms"] / 1e9
        out["fwd_bwd_tflops_tiles"] = (1 + BWD_FACTOR) * tile_flops / out["fwd_bwd_ms"] / 1e9
    return out


def sdpa_causal(timer: Timer, q, k, v, do, backend_name: str, fwd_flops: int) -> dict:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)
    kk, vv, gqa = k, v, "enable_gqa"

    def f(q, k, v):
        with sdpa_kernel(backend):
            if gqa == "enable_gqa":
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    try:
        out = time_fwd_bwd(timer, f, q, kk, vv, do, fwd_flops, None)
    except RuntimeError:
        # This backend refuses enable_gqa: give it K/V already repeated to Hq heads (outside the
        # timing; the same FLOPs, more K/V bytes read).
        group = q.shape[1] // k.shape[1]
        kk = k.detach().repeat_interleave(group, 1).requires_grad_()
        vv = v.detach().repeat_interleave(group, 1).requires_grad_()
        gqa = "repeated K/V"
        out = time_fwd_bwd(timer, f, q, kk, vv, do, fwd_flops, None)
    out["gqa"] = gqa
    return out


def part_b(ctx: dict, clock: Clock, res: dict, save) -> None:
    from megatron_gem.kernels import allowed_pair_count, build_block_table, default_launch_config, triton_gem_attention

    cuda, dev, quick = ctx["cuda"], ctx["device"], ctx["quick"]
    timer = Timer(cuda, quick)
    table, source = document_lengths()
    Ls = [64] if quick else [8192, 16384, 32768]
    Ds = [16] if quick else [128, 64]
    Hq, Hkv = (2, 1) if quick else (32, 8)
    dtype = torch.bfloat16
    res.update(
        corpus=source,
        dtype="bf16",
        heads=[Hq, Hkv],
        batch=1,
        seq_lens=Ls,
        head_dims=Ds,
        masks=list(MASKS),
        flops_convention=f"forward = 4 * D * Hq * allowed pairs; backward = {BWD_FACTOR} x forward; tiles: the same per visited tile element",
        flashmask_docs={str(L): flashmask_doc_range(L) for L in Ls},
        runs=[],
        skipped=[],
    )
    flex = None
    try:
        flex = FlexRunner(max(Ls), dev, cuda)
    except Exception as e:  # noqa: BLE001
        res["skipped"].append({"what": "flex", "why": f"FlexAttention unavailable: {error_text(e)}"})
    # Target-relevant masks for every shape first, then the rest.
    order = [(m, D, L) for group in (MASKS[:2], MASKS[2:]) for D in Ds for L in Ls for m in group]
    for mask_kind, D, L in order:
        tag = f"{mask_kind} L={L} D={D}"
        if clock.out(reserve_s=3):
            res["skipped"].append({"what": tag, "why": "part time budget spent"})
            continue
        log(f"  b: {tag}")
        run = {"mask": mask_kind, "L": L, "D": D}
        res["runs"].append(run)
        try:
            doc, role, info = make_mask(mask_kind, L, table, seed=20260 + D)
            run.update(info)
            doc, role = doc.to(dev), role.to(dev)
            cfg = default_launch_config(D, torch.device(dev))
            bm, bn = cfg["block_m"], cfg["block_n"]
            run["block_table_build_ms"] = timer.host_ms(lambda: build_block_table(doc, role, block_m=bm, block_n=bn), reps=3 if quick else 5)
            bt = build_block_table(doc, role, block_m=bm, block_n=bn)
            pairs = int(allowed_pair_count(doc, role).sum())
            partial, full = int(bt.kv_num_blocks.sum()), int(bt.full_kv_num_blocks.sum())
            nq = bt.num_q_blocks
            fwd_flops = attention_flops(D, Hq, pairs)
            run.update(
                allowed_pairs=pairs,
                causal_pairs=L * (L + 1) // 2,
                tiles=[bm, bn],
                tiles_partial=partial,
                tiles_full=full,
                tiles_causal=nq * (nq + 1) // 2,
                fwd_flops=fwd_flops,
                fwd_flops_tiles=attention_flops(D, Hq, bm * bn * (partial + full)),
            )
            g = torch.Generator().manual_seed(L + D)
            q = torch.randn(1, Hq, L, D, generator=g).to(dev, dtype).requires_grad_()
            k = torch.randn(1, Hkv, L, D, generator=g).to(dev, dtype).requires_grad_()
            v = torch.randn(1, Hkv, L, D, generator=g).to(dev, dtype).requires_grad_()
            do = torch.randn(1, Hq, L, D, generator=g).to(dev, dtype)
            scale = D**-0.5

            def tri(q, k, v):
                return triton_gem_attention(q, k, v, doc, role, scale=scale, block_table=bt)

            try:
                run["triton"] = time_fwd_bwd(timer, tri, q, k, v, do, fwd_flops, run["fwd_flops_tiles"])
                log(f"     triton: fwd {run['triton']['fwd_ms']:.3f} ms, fwd+bwd {run['triton']['fwd_bwd_ms']:.3f} ms")
            except Exception as e:  # noqa: BLE001
                run["triton"] = {"error": error_text(e)}
                log(traceback.format_exc())
            save()
            if flex is not None:
                run["flex"] = {}
                try:
                    run["flex"]["block_mask_build_ms"] = timer.host_ms(lambda: flex.block_mask(doc, role), reps=3)
                    bmask = flex.block_mask(doc, role)
                    run["flex"]["block_mask_tiles"] = _flex_tiles(bmask)
                    run["flex"]["block_size"] = list(bmask.BLOCK_SIZE)
                    tile_flops = attention_flops(D, Hq, bmask.BLOCK_SIZE[0] * bmask.BLOCK_SIZE[1] * run["flex"]["block_mask_tiles"])

                    def fx(q, k, v):
                        if not cuda:  # CPU flex refuses inputs that require grad, even without grad mode
                            q, k, v = q.detach(), k.detach(), v.detach()
                        return flex(q, k, v, bmask, scale)

                    t0 = time.perf_counter()
                    with torch.no_grad():
                        o_flex = fx(q, k, v)
                    timer.sync()
                    run["flex"]["first_fwd_s"] = time.perf_counter() - t0  # includes compiling
                    with torch.no_grad():
                        o_tri = tri(q, k, v)
                    run["flex"]["max_abs_diff_vs_triton"] = (o_flex.float() - o_tri.float()).abs().max().item()
                    o_flex = o_tri = None
                    if cuda:
                        t0 = time.perf_counter()
                        fx(q, k, v).backward(do)
                        timer.sync()
                        run["flex"]["first_fwd_bwd_s"] = time.perf_counter() - t0  # includes compiling the backward
                        run["flex"].update(time_fwd_bwd(timer, fx, q, k, v, do, fwd_flops, tile_flops))
                        log(f"     flex:   fwd {run['flex']['fwd_ms']:.3f} ms, fwd+bwd {run['flex']['fwd_bwd_ms']:.3f} ms")
                    else:
                        with torch.no_grad():
                            run["flex"]["fwd_ms"] = timer.ms(lambda: fx(q, k, v))
                        run["flex"]["note"] = "CPU: eager forward only (no FlexAttention backward on CPU; torch.compile'd flex is the CUDA path)"
                except Exception as e:  # noqa: BLE001
                    run["flex"]["error"] = error_text(e)
                    log(traceback.format_exc())
                save()
            if mask_kind == "causal":
                backends = ("FLASH_ATTENTION", "CUDNN_ATTENTION") if cuda else ("MATH",)
                for name in backends:
                    key = "sdpa_" + name.split("_")[0].lower()
                    try:
                        run[key] = sdpa_causal(timer, q, k, v, do, name, fwd_flops)
                        log(f"     {key}: fwd {run[key]['fwd_ms']:.3f} ms, fwd+bwd {run[key]['fwd_bwd_ms']:.3f} ms")
                    except Exception as e:  # noqa: BLE001
                        run[key] = {"error": error_text(e)}
                if not cuda:
                    run["note"] = "CPU: sdpa_math stands in for SDPA flash / cuDNN (CUDA only)"
            q = k = v = do = None
            if cuda:
                torch.cuda.empty_cache()
        except Exception as e:  # noqa: BLE001
            run["error"] = error_text(e)
            log(traceback.format_exc())
        save()
