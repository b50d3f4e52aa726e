"""The examples in docs/integrations.md marked `<!-- example: NAME -->` run verbatim on a tiny model."""

import os
import re

import torch

from megatron_gem.embedder import GEMEmbedder
from megatron_gem.testing import make_tiny_llama, make_tiny_tokenizer, sample_sentences

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "integrations.md")


def _examples() -> dict[str, str]:
    text = open(DOC).read()
    return dict(re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, flags=re.S))


def test_documented_examples_run(tmp_path):
    from datasets import Dataset
    from transformers import TrainingArguments
    from trl import SFTConfig

    examples = _examples()
    assert set(examples) == {"trainer", "trl", "export", "summary_adapter", "summary_trainer"}
    tok = make_tiny_tokenizer()
    common = dict(per_device_train_batch_size=4, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=3e-3)
    s = sample_sentences(16, seed=3, max_words=12)
    ns = {
        "model": make_tiny_llama(len(tok)),
        "tokenizer": tok,
        "texts": sample_sentences(16, seed=1, max_words=12),
        "training_args": TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, **common),
    }
    exec(examples["trainer"], ns)
    phases = [r["gem_phase"] for r in ns["trainer"].state.log_history if "loss" in r]
    assert phases == [1, 1, 1, 1, 2, 2]

    # TRL on the model the Trainer example produced (enable_gem is idempotent).
    ns["sft_config"] = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=2, max_length=64, **common)
    ns["sft_dataset"] = Dataset.from_dict({"prompt": s[:8], "completion": [" " + x for x in s[8:]]})
    exec(examples["trl"], ns)
    assert ns["trainer"].state.global_step == 2

    ns["export_dir"] = str(tmp_path / "export")
    exec(examples["export"], ns)
    ref = GEMEmbedder.from_pretrained(ns["export_dir"], backend="sdpa").encode(["a text", "another"])
    assert torch.allclose(torch.as_tensor(ns["embeddings"]), ref, atol=1e-5)


def test_summary_adapter_example_runs(tmp_path):
    from megatron_gem.testing import save_tiny_reserved_base, tiny_summary_model

    base_dir = save_tiny_reserved_base(tmp_path / "base")
    lm, tokenizer, config, adapter = tiny_summary_model(base_dir, 2)
    ns = {"lm": lm, "adapter": adapter, "tokenizer": tokenizer, "config": config, "base_dir": base_dir, "adapter_dir": str(tmp_path / "adapter")}
    exec(_examples()["summary_adapter"], ns)
    ref = GEMEmbedder(lm, tokenizer, config, adapter=adapter).encode(["a text", "another"])
    assert torch.allclose(ns["embeddings"], ref, atol=1e-6)
    assert torch.allclose(ns["vector"][0], ref[0], atol=1e-5)
    assert type(ns["peft_model"]).__name__ == "PeftModelForCausalLM"


def test_summary_trainer_example_runs(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from megatron_gem.testing import save_tiny_reserved_base

    base_dir = save_tiny_reserved_base(tmp_path / "base")
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=6,
        per_device_train_batch_size=4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    ns = {
        "AutoModelForCausalLM": AutoModelForCausalLM,
        "base_dir": base_dir,
        "tokenizer": AutoTokenizer.from_pretrained(base_dir),
        "texts": sample_sentences(16, seed=1, min_words=8, max_words=12),
        "training_args": args,
        "adapter_dir": str(tmp_path / "adapter"),
    }
    exec(_examples()["summary_trainer"], ns)
    phases = [r["gem_phase"] for r in ns["trainer"].state.log_history if "loss" in r]
    assert phases == [1, 1, 1, 1, 2, 2]
    model = ns["model"]
    live = GEMEmbedder(model, ns["tokenizer"], ns["config"], adapter=model.gem_adapter, backend="sdpa").encode(["a text", "another"])
    assert torch.allclose(ns["embeddings"], live, atol=1e-5)  # the example's loader uses the default backend
