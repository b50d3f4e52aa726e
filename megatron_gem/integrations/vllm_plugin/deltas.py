"""A summary-mode adapter's deltas on vLLM's linear layers (model.py hooks them on): torch only,
no vLLM import, so the row finding and the fused-layer slicing are tested without vLLM.

vLLM fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (the model class's
``packed_modules_mapping``); a layer's ``output_partition_sizes`` are its parts' output widths on
this rank, in that order. The adapter folder's PEFT keys name the unfused HF layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ...common.errors import ModelLoadError
from ...hf.summary_files import PEFT_PREFIX


def summary_rows(input_ids: torch.Tensor, positions: torch.Tensor, summary_id: int) -> torch.Tensor:
    """Indices [n] of the flattened batch's summary tokens: the last token of each prompt (the
    next token starts another prompt at position 0, or there is none) that is the summary token."""
    last = torch.ones_like(positions, dtype=torch.bool)
    last[:-1] = positions[1:] == 0
    return torch.nonzero(last & (input_ids == summary_id)).flatten()


class SummaryDeltas(nn.Module):
    """The adapter's deltas on a vLLM model's linear layers, added at ``rows`` (set per forward).

    ``slices[module name]``: (first, end) output columns and the delta's ``lora_A`` [r, in] /
    ``lora_B`` [end - first, r], as buffers (not parameters: vLLM's loader fills parameters from
    the base checkpoint and checks that each one was)."""

    def __init__(self, model: nn.Module, state: dict[str, torch.Tensor], scaling: float, packed: dict[str, list[str]], source: str):
        super().__init__()
        self.scaling = scaling
        self.rows: torch.Tensor | None = None
        modules = dict(model.named_modules())
        fused = {part: (name, i) for name, parts in packed.items() for i, part in enumerate(parts)}
        self.slices: dict[str, list[tuple[int, int, str, str]]] = {}
        names = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0] for k in state})
        for n, hf_name in enumerate(names):
            parent, leaf = hf_name.rsplit(".", 1)
            target, shard = fused.get(leaf, (leaf, 0))
            module_name = f"{parent}.{target}"
            module = modules.get(module_name)
            if module is None or not hasattr(module, "output_partition_sizes"):
                raise ModelLoadError(f"{source}: adapter layer {hf_name} has no linear layer {module_name} in vLLM's model")
            sizes = list(module.output_partition_sizes)
            first = sum(sizes[:shard])
            a, b = state[f"{PEFT_PREFIX}{hf_name}.lora_A.weight"], state[f"{PEFT_PREFIX}{hf_name}.lora_B.weight"]
            if a.shape[1] != module.input_size_per_partition or b.shape[0] != sizes[shard] or a.shape[0] != b.shape[1]:
                raise ModelLoadError(
                    f"{source}: adapter layer {hf_name} (lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}) does not fit {module_name} "
                    f"(input {module.input_size_per_partition}, output slice {sizes[shard]})"
                )
            weight = next(module.parameters())
            self.register_buffer(f"a{n}", a.to(weight.device, weight.dtype), persistent=False)
            self.register_buffer(f"b{n}", b.to(weight.device, weight.dtype), persistent=False)
            self.slices.setdefault(module_name, []).append((first, first + sizes[shard], f"a{n}", f"b{n}"))
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.slices]

    def _hook(self, name: str):
        def add_deltas(module, args, output):
            rows = self.rows
            if rows is None or rows.numel() == 0:
                return output
            out = output[0] if isinstance(output, tuple) else output
            x = args[0].index_select(0, rows)
            for first, end, a, b in self.slices[name]:
                out[rows, first:end] += (x @ getattr(self, a).t()) @ getattr(self, b).t() * self.scaling
            return output

        return add_deltas
