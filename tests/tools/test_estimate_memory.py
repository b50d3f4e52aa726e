"""tools/estimate_memory.py and its measurement: the storage tracker counts what is alive and
not its inputs' storage; fake tensors count what real ones allocate for the same step; the
command line's table and last-line JSON; a bad recipe name is a usage error."""

import json

import pytest
import torch

from tests.launch import load_tool


def test_tracker_counts_live_storage_once_and_not_the_inputs():
    from megatron_gem.training.activation_memory import StorageTracker

    x = torch.ones(100)
    tracker = StorageTracker()
    with tracker:
        a = x * 2  # 400 bytes
        view = x.view(10, 10)  # the input's storage: not counted
        b = a.view(4, 25) + 1  # 400: peak 800
        a.mul_(3)  # in place: nothing new
        del a
        c = b[:2] * 1  # 200
    assert (tracker.peak, tracker.current) == (800, 600)
    del view, b, c


def test_fake_measurement_equals_real_tensors():
    """One micro-batch's forward and backward of a small Llama (CPU SDPA backend): the fake
    measurement against the same tracker over real tensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.hf.head_loss import LMHeadLosses
    from megatron_gem.training.activation_memory import StorageTracker, measure_step_activations

    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    B, L = 2, 128
    fake = measure_step_activations(cfg, micro_batch_size=B, seq_length=L, vocab_size=512, dtype=torch.float32, backend="sdpa")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    use_gem_attention(lm, backend="sdpa")
    for p in lm.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    head = LMHeadLosses(lm)
    ids = torch.randint(4, 512, (B, L))
    doc = (torch.arange(L) // 32).expand(B, L).contiguous()  # packed: the dense-mask path, as the fake run takes
    tracker = StorageTracker(loss_module=head)
    with tracker:
        hidden = lm.base_model(input_ids=ids, position_ids=torch.arange(L).expand(B, L), doc_ids=doc, roles=torch.zeros_like(ids)).last_hidden_state
        loss = head(hidden, ids).sum()
        del hidden
        loss.backward()
    assert fake.overall.total == pytest.approx(tracker.peak, rel=0.02)
    assert fake.overall.activations > 0 and fake.overall.attention > 0


def test_command_line_table_and_json(capsys):
    tool = load_tool("estimate_memory")
    figures = tool.main(["--model", "llama3.2-1b", "--zero-stage", "2", "--seq-length", "256", "--micro-batch-size", "1"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| recipe | parameters | gradients | optimizer | activations | logits_loss | attention | peak GB |")
    last = json.loads(out[-1])
    assert last == json.loads(json.dumps(figures))
    (fig,) = last.values()
    mem = fig["memory_gb"]
    assert mem["parameters"] == pytest.approx(2 * 1.2358e9 / 1e9, rel=0.01)  # bf16 weights, whole under ZeRO-2
    assert mem["peak"] == pytest.approx(sum(v for k, v in mem.items() if k != "peak"), abs=0.01)
    assert fig["fits"] and fig["tokens_per_gpu_per_step"] == 256
    mem2 = fig["phase2_memory_gb"]  # 8 pairs x 256 tokens (train.py's defaults capped by the row), ZeRO-2 alike
    assert mem2["parameters"] == mem["parameters"] and mem2["activations"] > 0
    assert fig["peak_gb"] == max(mem["peak"], mem2["peak"])


def test_unknown_recipe_is_a_usage_error(capsys):
    tool = load_tool("estimate_memory")
    with pytest.raises(SystemExit) as e:
        tool.main(["--recipe", "nope"])
    assert e.value.code == 2 and "--recipe nope: unknown" in capsys.readouterr().err


def test_fake_hf_loss_measurement_equals_real_tensors():
    """The path before the chunked loss (transformers' causal-LM forward with labels: full logits,
    fp32 cross-entropy) measured on fake tensors against the same tracker over real ones, and its
    logits/loss part larger than the chunked loss's at a vocabulary the chunks split."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_gem.attention.hf import use_gem_attention
    from megatron_gem.training.activation_memory import StorageTracker, _hf_full_logits_loss, measure_step_activations

    cfg = LlamaConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, use_cache=False
    )
    B, L = 2, 128
    fake = measure_step_activations(cfg, micro_batch_size=B, seq_length=L, vocab_size=4096, dtype=torch.float32, backend="sdpa", loss="hf")
    chunked = measure_step_activations(cfg, micro_batch_size=B, seq_length=L, vocab_size=4096, dtype=torch.float32, backend="sdpa")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    use_gem_attention(lm, backend="sdpa")
    for p in lm.parameters():
        p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
    ids = torch.zeros(B, L, dtype=torch.long)  # what the fake run feeds: one document per row
    tracker = StorageTracker()
    with tracker:
        loss = _hf_full_logits_loss(lm, ids, tracker)
        loss.backward()
    assert fake.overall.total == pytest.approx(tracker.peak, rel=0.02)
    assert fake.overall.logits_loss == pytest.approx(tracker.at_peak["logits_loss"], rel=0.02)
    assert fake.overall.logits_loss > chunked.overall.logits_loss > 0


def test_before_after_table(capsys):
    tool = load_tool("estimate_memory")
    figures = tool.main(["--model", "llama3.2-1b", "--seq-length", "4096", "--micro-batch-size", "1", "--before-after"])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("| recipe | path | parameters |") and json.loads(out[-1]) == json.loads(json.dumps(figures))
    (fig,) = figures.values()
    before, after = fig["before"], fig["after"]
    assert before["phase1_gb"]["logits_loss"] > after["phase1_gb"]["logits_loss"] > 0  # 4096 tokens: the backward outweighs the optimizer step
    assert before["phase1_gb"]["peak"] > after["phase1_gb"]["peak"]
    assert before["refused_on_cuda"] == (before["dense_scores_gb"] > 20)
