"""Subprocess side of tests/mcore (launched with torchrun; never imported by pytest).

torchrun ... worker.py equivalence OUT.json
    One process: HF Llama/Mistral logits under GEM attention vs the megatron-core GEM model
    after state-dict conversion, for several configurations; writes max |difference|.
torchrun --nproc-per-node T*P ... worker.py load_logits MEGATRON_DIR BATCH.pt OUT.pt T P
    Loads a converted dist checkpoint at TP=T x PP=P and runs one packed batch through
    megatron-core's pipeline schedule (forward only); the last stage saves its logits.
torchrun ... worker.py convert_layouts PLAN.json / torchrun --nproc-per-node 4 ... worker.py load_logits_layouts PLAN.json
    The same for several layouts in one process / one 4-process launch (parallel state rebuilt per layout).
torchrun ... worker.py stream_vs_reference HF_DIR WORK_DIR
    The streaming converter against an in-memory model saved by dist_checkpointing.
"""

import json
import os
import sys

import torch


def packed_batch(vocab: int, seed: int = 0):
    """Two rows, each packing a split document (prefix / special / suffix) and a plain one."""
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 48
    ids = torch.randint(4, vocab, (B, L), generator=g)
    doc = torch.zeros(B, L, dtype=torch.long)
    doc[:, 28:] = 1
    doc[1, 44:] = -1  # padding at the end of row 1
    pos = torch.cat([torch.arange(28), torch.arange(20)]).repeat(B, 1)
    roles = torch.zeros(B, L, dtype=torch.long)
    roles[:, 12] = 1
    roles[:, 13:28] = 2
    return ids, pos, doc, roles


def hf_logits(hf, ids, pos, doc, roles):
    from megatron_gem.attention.hf import use_gem_attention

    use_gem_attention(hf, backend="sdpa")
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=pos, doc_ids=doc, roles=roles, use_cache=False).logits


def megatron_logits(hf, arch=None, padded_extra=0):
    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.mcore.gpt_model import build_gem_gpt_model
    from megatron_gem.mcore.hf_mapping import dict_getter, load_hf_into_model
    from megatron_gem.mcore.llama import arch_from_hf_config, padded_vocab_size, transformer_config

    arch = arch or arch_from_hf_config(hf.config)
    model = build_gem_gpt_model(
        arch, transformer_config(arch), vocab_size=arch.vocab_size, padded_vocab=padded_vocab_size(arch.vocab_size, 1) + padded_extra, backend="sdpa"
    )
    load_hf_into_model(model, dict_getter(hf.state_dict()), arch, tp_rank=0, tp_size=1)
    model.eval()
    ids, pos, doc, roles = packed_batch(arch.vocab_size)
    with torch.no_grad():
        logits, _ = model(ids, pos, gem_mask_info(doc, roles))
    return logits, (ids, pos, doc, roles)


def equivalence(out_path):
    from megatron_gem.mcore.llama import arch_from_hf_config
    from megatron_gem.mcore.runtime import init_model_parallel
    from megatron_gem.testing import make_tiny_llama

    init_model_parallel(1, 1)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    configs = {
        "untied_gqa": dict(),
        "tied": dict(tie_word_embeddings=True),
        "llama3_rope_scaling": dict(rope_scaling=llama3, rope_theta=500000.0, max_position_embeddings=256),
        "mha_3layers": dict(num_key_value_heads=4, num_hidden_layers=3),
    }
    result = {}
    for name, over in configs.items():
        hf = make_tiny_llama(301, seed=len(name), **over)
        logits, batch = megatron_logits(hf)
        ref = hf_logits(hf, *batch)
        V = ref.shape[-1]
        result[name] = {
            "max_abs_diff": float((logits[..., :V] - ref).abs().max()),
            "ref_scale": float(ref.abs().max()),
            "padding_is_masked": bool(torch.isinf(logits[..., V:]).all()) and logits.shape[-1] > V,
        }
        if name == "llama3_rope_scaling":  # the same model with the scaling dropped must differ
            arch = arch_from_hf_config(hf.config)
            arch.rope_scaling = None
            wrong, _ = megatron_logits(hf, arch)
            result["llama3_without_scaling_diff"] = float((wrong[..., :V] - ref).abs().max())
    # Mistral: its own HF class (sliding window far beyond the batch length).
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(3)
    mistral = MistralForCausalLM(
        MistralConfig(
            vocab_size=301,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_theta=1e6,
            use_cache=False,
            architectures=["MistralForCausalLM"],
        )
    )
    logits, batch = megatron_logits(mistral)
    ref = hf_logits(mistral, *batch)
    result["mistral"] = {"max_abs_diff": float((logits[..., :301] - ref).abs().max()), "ref_scale": float(ref.abs().max()), "padding_is_masked": True}
    # Mistral with a window shorter than the packed documents: megatron-core gets it through the spec.
    mistral.config.sliding_window = 8
    logits, batch = megatron_logits(mistral)
    ref = hf_logits(mistral, *batch)
    arch = arch_from_hf_config(mistral.config)
    arch.sliding_window = None
    windowless, _ = megatron_logits(mistral, arch)
    result["mistral_window"] = {
        "max_abs_diff": float((logits[..., :301] - ref).abs().max()),
        "ref_scale": float(ref.abs().max()),
        "padding_is_masked": True,
        "windowless_diff": float((windowless[..., :301] - ref).abs().max()),
    }
    result.update(summary_equivalence())
    result["summary_syncs"] = summary_host_syncs()
    result.update(fused_layers_equivalence())
    with open(out_path, "w") as f:
        json.dump(result, f)


def fused_layers_equivalence():
    """The apex layer implementation (mcore/fused.py), which needs a GPU, built on CPU with apex's
    kernel replaced at its seam (fused.apex_rms_norm) by a stand-in computing that kernel's
    contract (RMSNorm statistics in fp32, the weight applied before the one rounding): the model
    has the local spec's state-dict names (checkpoints interchange), loads HF weights by them and
    gives the HF logits. Also the local spec's dist-checkpoint keys: TransformerEngine's names."""
    import megatron_gem.mcore.fused as fused
    from megatron_gem.mcore.gpt_model import build_gem_gpt_model
    from megatron_gem.mcore.llama import FusedRMSNorm, arch_from_hf_config, padded_vocab_size, transformer_config
    from megatron_gem.testing import make_tiny_llama

    calls = []

    def kernel(x, weight, shape, eps):
        calls.append((tuple(shape), eps))
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)

    fused.apex_rms_norm = lambda: kernel
    hf = make_tiny_llama(301, seed=5)
    arch = arch_from_hf_config(hf.config)

    def build(impl):
        return build_gem_gpt_model(
            arch, transformer_config(arch, layer_impl=impl), vocab_size=301, padded_vocab=padded_vocab_size(301, 1), backend="sdpa", layer_impl=impl
        )

    local, apex = build("local"), build("apex")
    logits, batch = megatron_logits(hf)  # the local spec, HF weights loaded
    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.mcore.hf_mapping import dict_getter, load_hf_into_model

    load_hf_into_model(apex, dict_getter(hf.state_dict()), arch, tp_rank=0, tp_size=1)
    apex.eval()
    ids, pos, doc, roles = batch
    with torch.no_grad():
        got, _ = apex(ids, pos, gem_mask_info(doc, roles))
    ref = hf_logits(hf, *batch)
    V = ref.shape[-1]
    sharded = {sh.key for sh in local.sharded_state_dict().values() if hasattr(sh, "key")}
    return {
        "apex": {
            "norms": sorted({type(m).__name__ for m in apex.modules() if isinstance(m, FusedRMSNorm)}),
            "kernel_calls": len(calls),
            "kernel_eps": sorted({e for _, e in calls}),
            "same_state_dict_names": list(apex.state_dict()) == list(local.state_dict()),
            "max_abs_diff": float((got[..., :V] - ref).abs().max()),
            "local_max_abs_diff": float((logits[..., :V] - ref).abs().max()),
            "ref_scale": float(ref.abs().max()),
        },
        "local_sharded_norm_keys": sorted(k for k in sharded if "norm" in k),
        "rms_norm_eps": arch.rms_norm_eps,
        "num_layers": arch.num_layers,
    }


def summary_equivalence():
    """Summary mode: the megatron-core adapter (random non-zero deltas on the fused linear_qkv /
    linear_fc1 and on linear_proj / linear_fc2), mapped to HF names by hf_adapter_state and
    loaded into the HF model's adapter, gives the HF logits; positions the deltas never reach
    keep the base model's logits bit for bit."""
    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.gem.roles import Role
    from megatron_gem.hf.summary import attach_summary_adapter as attach_hf
    from megatron_gem.hf.summary import detach_summary_adapter as detach_hf
    from megatron_gem.mcore.gpt_model import build_gem_gpt_model
    from megatron_gem.mcore.hf_mapping import dict_getter, load_hf_into_model
    from megatron_gem.mcore.llama import arch_from_hf_config, padded_vocab_size, transformer_config
    from megatron_gem.mcore.summary import attach_summary_adapter, detach_summary_adapter, hf_adapter_state, load_hf_adapter_state
    from megatron_gem.testing import make_tiny_llama

    hf = make_tiny_llama(301, seed=11)
    arch = arch_from_hf_config(hf.config)
    model = build_gem_gpt_model(arch, transformer_config(arch), vocab_size=301, padded_vocab=padded_vocab_size(301, 1), backend="sdpa")
    load_hf_into_model(model, dict_getter(hf.state_dict()), arch, tp_rank=0, tp_size=1)
    model.eval()
    ids, pos, doc, roles = packed_batch(301)
    untouched = ((roles == Role.PREFIX) | (doc != 0)).transpose(0, 1)  # no delta reaches these (causal, per document)
    with torch.no_grad():
        base, _ = model(ids, pos, gem_mask_info(doc, roles))
    out = {}
    g = torch.Generator().manual_seed(0)
    for positions in ("special", "special+suffix"):
        cfg = GEMConfig(train_mode="summary", adapter_rank=4, adapter_alpha=8.0, adapter_positions=positions)
        adapter = attach_summary_adapter(model, cfg, seed=3)
        with torch.no_grad():
            fresh, _ = model(ids, pos, gem_mask_info(doc, roles))
            for d in adapter.deltas.values():
                d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.05)
            logits, _ = model(ids, pos, gem_mask_info(doc, roles))
        state = hf_adapter_state(model, arch)
        hf_adapter = attach_hf(hf, cfg)
        load_hf_adapter_state(hf_adapter, state)
        ref = hf_logits(hf, ids, pos, doc, roles)
        trainable = sorted({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
        detach_hf(hf_adapter)
        detach_summary_adapter(model)
        V = ref.shape[-1]
        lt, bt = logits.transpose(0, 1), base.transpose(0, 1)  # [L, B, V]: index by the [L, B] mask
        out[f"summary_{positions}"] = {
            "max_abs_diff": float((logits[..., :V] - ref).abs().max()),
            "ref_scale": float(ref.abs().max()),
            "fresh_equals_base": bool(torch.equal(fresh, base)),
            "untouched_equal_base": bool(torch.equal(lt[untouched], bt[untouched])),
            "changed_by_delta": float((logits - base)[..., :V].abs().max()),
            "hf_keys": sorted(state)[:3] + [len(state)],
            "trainable": trainable,
        }
    return out


def summary_host_syncs():
    """Summary mode's device-to-host syncs (tests/host_syncs.py) in one training micro-batch of
    megatron-core GEM models of 1, 2 and 3 layers: forward and backward, every layer recomputed
    (--recompute-granularity full), so the layers' pre-hooks run again on recompute's detached
    copy of the mask; and which adapted linears took their delta into their own output."""
    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.gem.config import GEMConfig
    from megatron_gem.mcore.gpt_model import build_gem_gpt_model
    from megatron_gem.mcore.hf_mapping import dict_getter, load_hf_into_model
    from megatron_gem.mcore.llama import arch_from_hf_config, padded_vocab_size, transformer_config
    from megatron_gem.mcore.summary import TARGETS, attach_summary_adapter, detach_summary_adapter
    from megatron_gem.testing import make_tiny_llama
    from tests.host_syncs import HostSyncCounter

    out = {}
    for layers in (1, 2, 3):
        hf = make_tiny_llama(301, seed=5, num_hidden_layers=layers)
        arch = arch_from_hf_config(hf.config)
        model = build_gem_gpt_model(
            arch, transformer_config(arch, recompute_granularity="full"), vocab_size=301, padded_vocab=padded_vocab_size(301, 1), backend="sdpa"
        )
        load_hf_into_model(model, dict_getter(hf.state_dict()), arch, tp_rank=0, tp_size=1)
        adapter = attach_summary_adapter(model, GEMConfig(train_mode="summary", adapter_rank=4, adapter_alpha=8.0), seed=3)
        g = torch.Generator().manual_seed(layers)
        with torch.no_grad():
            for d in adapter.deltas.values():
                d.lora_B.copy_(torch.randn(d.lora_B.shape, generator=g) * 0.05)
        model.train()
        seen, kept = {}, {kind: [] for kind in ("column", "row")}
        modules = dict(model.named_modules())  # one stage: global layer names are the local ones
        for name in adapter.names:  # one hook before the adapter's, one after it
            module = modules[name]
            kind = TARGETS[name.split(".", 3)[3]][0]
            module.register_forward_hook(lambda m, a, o, n=name: seen.__setitem__(n, o[0]), prepend=True)
            module.register_forward_hook(lambda m, a, o, n=name, k=kind: kept[k].append(o[0] is seen[n]))
        ids, pos, doc, roles = packed_batch(301)
        with HostSyncCounter() as syncs:
            logits, _ = model(ids, pos, gem_mask_info(doc, roles))
            logits[..., :301].float().square().mean().backward()
        out[layers] = {
            "total": syncs.total,
            "ops": dict(syncs.ops),
            "from_summary": syncs.from_files("gem/adapter.py", "mcore/summary.py"),
            "column_outputs_kept": kept["column"],
            "row_outputs_kept": kept["row"],
            "lora_grads": all(float(p.grad.abs().sum()) > 0 for n, p in adapter.named_parameters() if "lora_A" in n),
        }
        detach_summary_adapter(model)
    return out


def load_logits(megatron_dir, batch_path, out_path, tp="2", pp="2"):
    from megatron_gem.mcore.runtime import destroy

    _load_logits_at(megatron_dir, batch_path, out_path, int(tp), int(pp))
    destroy()


def load_logits_layouts(plan_path):
    """Every (megatron_dir, batch, out, tp, pp) of the JSON plan in one launch: megatron-core's
    parallel state is rebuilt for each layout (ranks beyond TP x PP are data-parallel replicas)."""
    from megatron_gem.mcore.runtime import destroy

    with open(plan_path) as f:
        for item in json.load(f):
            _load_logits_at(item["dir"], item["batch"], item["out"], int(item["tp"]), int(item["pp"]))
    destroy()


def convert_layouts(plan_path):
    """hf-to-megatron (convert.hf_to_megatron, what the command line runs) for every
    (src, dir, tp, pp) of the JSON plan, in one process."""
    from megatron_gem.mcore import convert
    from megatron_gem.mcore.runtime import destroy, init_model_parallel

    init_model_parallel(1, 1)
    with open(plan_path) as f:
        for item in json.load(f):
            convert.hf_to_megatron(item["src"], item["dir"], tp=int(item["tp"]), pp=int(item["pp"]), progress=False, log=lambda *a: None)
    destroy()


def _load_logits_at(megatron_dir, batch_path, out_path, tp, pp):
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gem.attention.megatron import gem_mask_info
    from megatron_gem.mcore import checkpoint_io as io
    from megatron_gem.mcore.convert import build_from_meta
    from megatron_gem.mcore.runtime import init_model_parallel

    init_model_parallel(tp, pp)
    meta = io.read_meta(megatron_dir)
    _, model = build_from_meta(meta, tp=tp, pp=pp)
    io.load_model(model, megatron_dir)
    model.eval()
    ids, pos, doc, roles = torch.load(batch_path)
    out = {}

    def keep(o):
        out["logits"] = o[0]
        return torch.zeros(()), {}

    def step2(it, m):
        b = next(it)
        return m(b[0], b[1], gem_mask_info(b[2], b[3])), keep

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step2,
            data_iterator=iter([(ids, pos, doc, roles)]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=True,
        )
    # The next-token loss the training path computes (labels: no logits, vocabulary-parallel).
    labels = torch.randint(0, meta["vocab_size"], ids.shape, generator=torch.Generator().manual_seed(4))
    labels[:, ::5] = -100

    def keep_losses(o):
        out["losses"] = o[0]
        return torch.zeros(()), {}

    def step_losses(it, m):
        b = next(it)
        return m(b[0], b[1], gem_mask_info(b[2], b[3]), labels=labels), keep_losses

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=step_losses,
            data_iterator=iter([(ids, pos, doc, roles)]),
            model=[model],
            num_microbatches=1,
            seq_length=ids.shape[1],
            micro_batch_size=ids.shape[0],
            forward_only=True,
        )
    report = {"function": vocab_parallel_loss_check(meta["vocab_size"])}
    if parallel_state.is_pipeline_last_stage():
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        full = gather_from_tensor_model_parallel_region(out["logits"].contiguous())
        ref = torch.nn.functional.cross_entropy(full[..., : meta["vocab_size"]].flatten(0, 1).float(), labels.flatten(), reduction="none").view(labels.shape)
        report["model_loss_max_abs_diff"] = float((out["losses"] - ref).abs().max())
        report["model_loss_scale"] = float(ref.abs().max())
        if parallel_state.get_tensor_model_parallel_rank() == 0 and parallel_state.get_data_parallel_rank() == 0:
            torch.save(full, out_path)
            with open(out_path + ".loss.json", "w") as f:
                json.dump(report, f)
    dist.barrier()


def vocab_parallel_loss_check(vocab: int) -> dict:
    """mcore.loss.vocab_parallel_token_losses on this tensor-parallel group (the output layer's
    vocabulary shards, several blocks per shard, with and without sequence parallelism) against
    the one-process full-logits reference: losses, the states' gradient (after the region
    function's reduction) and the weight gradient (shards gathered). Max |differences|."""
    from megatron.core import parallel_state

    from megatron_gem.gem.lm_head_loss import reference_lm_head_token_losses
    from megatron_gem.mcore.llama import padded_vocab_size
    from megatron_gem.mcore.loss import vocab_parallel_token_losses

    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    padded = padded_vocab_size(vocab, tp)
    g = torch.Generator().manual_seed(11)
    L, n, H = 8, 3, 16
    hidden = torch.randn(L, n, H, generator=g)
    weight = torch.randn(padded, H, generator=g) * 0.5
    labels = torch.randint(0, vocab, (n, L), generator=g)
    labels[0, ::3] = -100
    upstream = torch.rand(n, L, generator=g)
    want_h, want_w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    want = reference_lm_head_token_losses(want_h, want_w, labels.t(), vocab_limit=vocab).t()
    (want * upstream).sum().backward()
    part = padded // tp
    out = {}
    for sp in (False, True):
        if sp and tp == 1:
            continue
        rows = slice(rank * L // tp, (rank + 1) * L // tp) if sp else slice(None)
        h = hidden[rows].clone().requires_grad_(True)
        w = weight[rank * part : (rank + 1) * part].clone().requires_grad_(True)
        got = vocab_parallel_token_losses(h, w, labels, true_vocab_size=vocab, sequence_parallel=sp, chunk_tokens=5, chunk_vocab=37)
        (got * upstream).sum().backward()
        shards = [torch.empty_like(w.grad) for _ in range(tp)]
        torch.distributed.all_gather(shards, w.grad, group=group)
        out["sp" if sp else "tp"] = {
            "loss": float((got - want).abs().max()),
            "grad_hidden": float((h.grad - want_h.grad[rows]).abs().max()),
            "grad_weight": float((torch.cat(shards) - want_w.grad).abs().max()),
            "scale": max(float(want.abs().max()), float(want_h.grad.abs().max()), float(want_w.grad.abs().max())),
        }
    return out


def stream_vs_reference(hf_dir, work_dir):
    """The streaming converter (tensor by tensor, meta-device layout) against the obvious
    reference: a real model filled with load_hf_into_model and saved by dist_checkpointing.save.
    Both checkpoints hold the same chunks, and load to bit-equal models."""
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_gem.mcore import checkpoint_io as io
    from megatron_gem.mcore import convert
    from megatron_gem.mcore.hf_mapping import HFWeights, load_hf_into_model
    from megatron_gem.mcore.runtime import destroy, init_model_parallel

    init_model_parallel(1, 1)
    streamed, reference = os.path.join(work_dir, "streamed"), os.path.join(work_dir, "reference")
    meta = convert.hf_to_megatron(hf_dir, streamed, tp=2, pp=1, progress=False)
    arch, ref_model = convert.build_from_meta(meta)
    load_hf_into_model(ref_model, HFWeights(hf_dir), arch, tp_rank=0, tp_size=1)
    io.save_model(ref_model, reference)
    md_s, md_r = FileSystemReader(streamed).read_metadata(), FileSystemReader(reference).read_metadata()
    layout = lambda md: {
        k: (tuple(v.size), sorted((tuple(c.offsets), tuple(c.sizes)) for c in v.chunks)) for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")
    }  # noqa: E731
    assert layout(md_s) == layout(md_r), "streamed checkpoint has a different chunk layout"
    _, got = convert.build_from_meta(meta)
    io.load_model(got, streamed)
    a, b = ref_model.state_dict(), got.state_dict()
    bad = [k for k, v in a.items() if isinstance(v, torch.Tensor) and not torch.equal(v, b[k])]
    assert not bad, f"streamed checkpoint differs from the reference in {bad}"
    # Reading back group by group keeps only the current group alive (no cycles holding the
    # previous layers: the 8B conversion's peak memory depends on it).
    import weakref

    from megatron_gem.mcore import lazy_checkpoint_io

    meta_model = convert._meta_gem_model(arch, vocab=meta["vocab_size"], padded=meta["padded_vocab_size"], dtype=torch.float32)
    previous, groups = [], 0
    for group in lazy_checkpoint_io.iter_dist_checkpoint_groups(meta_model, streamed, progress=False):
        assert all(r() is None for r in previous), "a previous group is still alive"
        for name, t in group.items():
            assert torch.equal(t, a[name]), name
        previous = [weakref.ref(t) for t in group.values()]
        groups += 1
        del group, t
    print(json.dumps({"tensors": len(layout(md_s)), "groups": groups, "equal": True}))
    destroy()


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "equivalence":
        equivalence(sys.argv[2])
    elif cmd == "load_logits":
        load_logits(*sys.argv[2:])
    elif cmd == "load_logits_layouts":
        load_logits_layouts(*sys.argv[2:])
    elif cmd == "convert_layouts":
        convert_layouts(*sys.argv[2:])
    elif cmd == "stream_vs_reference":
        stream_vs_reference(*sys.argv[2:])
    else:
        raise SystemExit(f"unknown command {cmd}")
    from tests.launch import exit_worker

    exit_worker()
