"""The summary-mode deltas as the vLLM plugin applies them (megatron_gem/integrations/vllm_plugin/
deltas.py), without vLLM: the rows it finds in a flattened batch, and its hooks on a fused layer
against the unfused layers with the LoRA formula applied at those rows by hand."""

import pytest
import torch
from torch import nn

from megatron_gem.common.errors import ModelLoadError
from megatron_gem.hf.summary_files import PEFT_PREFIX
from megatron_gem.integrations.vllm_plugin.deltas import SummaryDeltas, summary_rows

S = 9  # the summary token's id
PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}


def test_rows_are_the_prompts_last_tokens_when_summary_tokens():
    # Four prompts flattened as vLLM's runner lays them out: positions restart at 0 per prompt.
    ids = torch.tensor([5, S, 7, S, S, 4, 6, S, S])
    pos = torch.tensor([0, 1, 2, 3, 0, 0, 1, 0, 1])
    # [5 S 7 S] ends with S (row 3; the S inside is text), [S] alone (4), [4 6] has none, [S S] (8).
    assert summary_rows(ids, pos, S).tolist() == [3, 4, 8]


class FusedLinear(nn.Module):
    """What the hooks see of vLLM's QKVParallelLinear on one rank: the parts' weights stacked,
    their widths, and a (output, bias) result."""

    def __init__(self, *weights):
        super().__init__()
        self.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
        self.output_partition_sizes = [w.shape[0] for w in weights]
        self.input_size_per_partition = weights[0].shape[1]

    def forward(self, x):
        return x @ self.weight.t(), None


def _model_and_state(rank=2, b_rows=None):
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(o, 8, generator=g) for n, o in (("q_proj", 8), ("k_proj", 4), ("v_proj", 4))}
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.qkv_proj = FusedLinear(*weights.values())
    # k_proj not adapted: its slice must stay the base's everywhere.
    lora = {n: (torch.randn(rank, 8, generator=g), torch.randn(b_rows or weights[n].shape[0], rank, generator=g)) for n in ("q_proj", "v_proj")}
    state = {}
    for n, (a, b) in lora.items():
        state[f"{PEFT_PREFIX}layer.{n}.lora_A.weight"], state[f"{PEFT_PREFIX}layer.{n}.lora_B.weight"] = a, b
    return model, weights, lora, state


def test_deltas_on_a_fused_layer_equal_the_unfused_layers_with_deltas_at_the_rows():
    model, weights, lora, state = _model_and_state()
    deltas = SummaryDeltas(model, state, 0.5, PACKED, "test")
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(1))
    at = torch.zeros(6, dtype=torch.bool)
    at[[1, 4]] = True

    def unfused(name):
        y = x @ weights[name].t()
        if name in lora:
            a, b = lora[name]
            y = torch.where(at[:, None], y + (x @ a.t()) @ b.t() * 0.5, y)
        return y

    deltas.rows = torch.tensor([1, 4])
    got, _ = model.layer.qkv_proj(x)
    torch.testing.assert_close(got, torch.cat([unfused(n) for n in ("q_proj", "k_proj", "v_proj")], dim=-1))
    deltas.rows = None  # no rows (a forward outside summary mode): the base layer exactly
    assert torch.equal(model.layer.qkv_proj(x)[0], x @ model.layer.qkv_proj.weight.t())


def test_an_adapter_that_does_not_fit_the_layer_is_refused():
    model, _, _, state = _model_and_state(b_rows=5)
    with pytest.raises(ModelLoadError, match="does not fit layer.qkv_proj"):
        SummaryDeltas(model, state, 0.5, PACKED, "test")
    state = {k.replace("layer.", "other."): v for k, v in _model_and_state()[3].items()}
    with pytest.raises(ModelLoadError, match="no linear layer other.qkv_proj"):
        SummaryDeltas(model, state, 0.5, PACKED, "test")
