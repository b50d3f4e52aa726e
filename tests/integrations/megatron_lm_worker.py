"""Subprocess side of test_integrations_megatron_lm.py (torchrun, 1 process; never imported by pytest).

    torchrun ... megatron_lm_worker.py HF_DIR OUT.json

Builds the GEM GPTModel with ``gem_model_provider`` from a tiny HF checkpoint, runs one
forward/backward through megatron-core's own schedule (get_forward_backward_func) with
``GEMForwardStep`` on a batch from GEMDataCollator + megatron_batch (NTP rows and contrastive
rows), in phase 1 and in phase 2, and writes losses, gradient norms and the HF model's loss on
the same NTP rows.
"""

import json
import sys

import torch


def main(hf_dir: str, out_path: str) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_gem.gem import GEMConfig
    from megatron_gem.integrations import GEMDataCollator, enable_gem
    from megatron_gem.integrations.megatron_lm import GEMForwardStep, gem_model_provider, megatron_batch
    from megatron_gem.mcore.runtime import destroy, init_model_parallel
    from megatron_gem.testing import sample_sentences

    init_model_parallel(1, 1, seed=1)
    config = GEMConfig(p_raw=0.5, contrastive_from_step=1, alpha=0.5)
    provider = gem_model_provider(hf_dir, config, backend="sdpa")
    model = provider(pre_process=True, post_process=True)
    tok = provider.tokenizer
    collator = GEMDataCollator.from_tokenizer(tok, config, packing=True, max_length=64, contrastive=True)
    examples = [{"input_ids": tok(t)["input_ids"]} for t in sample_sentences(6, seed=11, max_words=14)]
    batch = megatron_batch(collator(examples))

    forward_step = GEMForwardStep(config)
    fb = get_forward_backward_func()
    result = {"ntp_rows": batch["ntp_rows"], "num_texts": batch["num_texts"], "rows": int(batch["input_ids"].shape[0])}
    for step in (0, 1):  # phase 1, then phase 2 (contrastive_from_step=1)
        forward_step.step = step
        model.zero_grad(set_to_none=True)
        losses = fb(
            forward_step_func=forward_step,
            data_iterator=iter([batch]),
            model=[model],
            num_microbatches=1,
            seq_length=batch["input_ids"].shape[1],
            micro_batch_size=batch["input_ids"].shape[0],
            forward_only=False,
        )
        grads = {
            n: float(p.grad.norm()) if p.grad is not None else (float(p.main_grad.norm()) if getattr(p, "main_grad", None) is not None else 0.0)
            for n, p in model.named_parameters()
        }
        result[f"step{step}"] = {
            "reports": {k: float(v) for k, v in losses[0].items()},
            "grad_total": sum(grads.values()),
            "grad_logit_scale": grads.get("logit_scale.log_scale", 0.0),
            "grad_embedding": grads.get("embedding.word_embeddings.weight", 0.0),
        }

    # The same NTP rows through the HF model (GEM attention): the provider's weights are the checkpoint's.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    enable_gem(hf, AutoTokenizer.from_pretrained(hf_dir), GEMConfig(p_raw=0.5), backend="sdpa")
    n = batch["ntp_rows"]
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"][:n], position_ids=batch["position_ids"][:n], doc_ids=batch["doc_ids"][:n], roles=batch["roles"][:n]).logits
    labels = batch["labels"]
    result["hf_ntp_loss"] = float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100))
    destroy()
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
