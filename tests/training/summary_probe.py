#!/usr/bin/env python
"""train.py that, after its HF export, also writes what the summary-mode tests inspect (never
used in production). Into $MG_PROBE_OUT (rank 0 writes; gathering is collective under ZeRO-3):
    lm_state.safetensors   the trained run's base model (lm) parameters, gathered
    plain_logits.safetensors  the lm's logits on $MG_PROBE_TEXT_IDS (comma-separated ids), no GEM
                           metadata: what generation computes
    optimizer.json         the names of the parameters the optimizer holds
Then train.py runs as ``__main__`` exactly as a user launches it.
"""

import json
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from megatron_gem.common import distributed as D  # noqa: E402
from megatron_gem.hf.export import _full_state_dict  # noqa: E402
from megatron_gem.training import deepspeed_engine  # noqa: E402

OUT = os.environ["MG_PROBE_OUT"]
IDS = [int(x) for x in os.environ["MG_PROBE_TEXT_IDS"].split(",")]
export_hf = deepspeed_engine.DeepSpeedEngine.export_hf


def optimized_names(engine) -> list[str]:
    opt = engine.optimizer
    groups = getattr(opt, "fp16_groups", None) or getattr(opt, "bit16_groups", None) or [g["params"] for g in opt.param_groups]
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return sorted(names[id(p)] for group in groups for p in group)


def probed_export(self, out_dir, extra):
    export_hf(self, out_dir, extra)
    from safetensors.torch import save_file

    lm = self.engine.module.lm
    state = _full_state_dict(lm)  # collective under ZeRO-3
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([IDS], device=self.device), use_cache=False).logits  # collective under ZeRO-3
    if D.is_main():
        os.makedirs(OUT, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(OUT, "lm_state.safetensors"))
        save_file({"logits": logits.detach().cpu().contiguous()}, os.path.join(OUT, "plain_logits.safetensors"))
        with open(os.path.join(OUT, "optimizer.json"), "w") as f:
            json.dump(optimized_names(self.engine), f)
    D.barrier()


deepspeed_engine.DeepSpeedEngine.export_hf = probed_export
sys.argv = [os.path.join(REPO, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
