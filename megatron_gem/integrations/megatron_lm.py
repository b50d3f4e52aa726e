"""GEM for users' own megatron-core / Megatron-LM pretrain-style scripts.

Megatron-LM's ``pretrain(train_valid_test_datasets_provider, model_provider, ModelType.encoder_or_decoder,
forward_step)`` and megatron-core's ``get_forward_backward_func()`` both take a model provider and a
forward-step function. This module gives GEM versions of both, plus the batch they expect:

    provider = gem_model_provider("/path/to/hf-llama", GEMConfig())   # after parallel state exists
    model = provider(pre_process=True, post_process=True)             # this pipeline stage
    forward_step = GEMForwardStep(config, current_step=lambda: get_args().curr_iteration)
    batch = megatron_batch(collator(examples))                        # GEMDataCollator output

Batch contract (a dict of tensors on the model's device, what ``data_iterator`` yields):
  input_ids, position_ids, doc_ids, roles   int64 [B, L]: rows [:ntp_rows] are next-token rows,
                                            rows [ntp_rows:] the contrastive texts (doc ids 0..2N-1)
  labels       int64 [ntp_rows, L]   *aligned* (Megatron convention): labels[i] is the target of the
                                     prediction at i (gem.layout.next_token_labels), -100 = ignored
  ntp_rows     int                   number of next-token rows (0 in a pure contrastive batch)
  num_texts    int                   N contrastive pairs (anchor doc j, positive doc N + j; 0 = none)
  teacher      float32 [2N + M, d_t] optional: a teacher's rows of the same texts (e.g.
                                     distill.Teacher.embed of them); the contrastive term then mixes
                                     the teacher's KL in (config.teacher_weight, teacher_temperature)
Every pipeline stage needs the full batch (doc_ids/roles drive the mask in every layer).

The model is megatron_gem.mcore.llama's GEMGPTModel (Llama / Mistral family, GEM core attention
in the layer spec, RoPE by position_ids, logit scale on the last stage); weights come from an HF
checkpoint, with the GEM tokens added (mean rows) when it has none. Loss per micro-batch:
``w_ntp * (NTP token mean of the micro-batch) + w_cl * InfoNCE`` with ``(w_ntp, w_cl) =
gem.losses.loss_weights(step, config)``; megatron-core divides it by the number of micro-batches
and averages gradients over data-parallel ranks. Contrastive negatives are gathered across the
data-parallel group. (train.py's own megatron engine uses the same loss function, mcore/loss.py, normalising NTP by
the token count of the whole global batch instead.)
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch

from ..attention.megatron import gem_mask_info
from ..gem.config import GEMConfig
from ..gem.losses import Distillation, loss_weights
from ..gem.roles import IGNORE_INDEX
from ..mcore.batch import BATCH_KEYS, join_rows, unwrap_model
from ..mcore.loss import gem_micro_batch_loss
from .collator import CL_PREFIX


def gem_model_provider(
    hf_checkpoint: str,
    config: GEMConfig | None = None,
    *,
    tokenizer=None,
    backend: str = "auto",
    params_dtype: torch.dtype = torch.float32,
    make_vocab_size_divisible_by: int = 128,
    sequence_parallel: bool = False,
    recompute_granularity: str | None = None,
    seq_length: int | None = None,
) -> Callable:
    """A Megatron-LM style ``model_provider(pre_process=True, post_process=True, vp_stage=None)``.

    Call the returned function after megatron-core's parallel state is initialised (Megatron-LM's
    ``initialize_megatron`` or ``megatron_gem.mcore.runtime.init_model_parallel``); it reads TP/PP
    from there and returns this stage's GEMGPTModel with the checkpoint's weights (GEM tokens added
    to ``tokenizer`` / ``config`` if missing), built by the same ``build_gem_model`` as train.py's
    megatron engine. The provider exposes ``provider.arch``, ``provider.vocab_size`` and
    ``provider.config`` after its first call. ``seq_length`` (Megatron-LM's ``--seq-length``):
    refused when above the checkpoint's ``max_position_embeddings``.
    """
    from ..hf.model import load_tokenizer

    config = config if config is not None else GEMConfig()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(hf_checkpoint)

    def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None):
        from megatron.core import parallel_state

        from ..mcore.provider import build_gem_model

        if vp_stage is not None:
            raise ValueError("GEM model_provider does not support virtual pipeline stages")
        built = build_gem_model(
            hf_checkpoint,
            tokenizer,
            config,
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            dtype=params_dtype,
            backend=backend,
            sequence_parallel=sequence_parallel,
            recompute_granularity=recompute_granularity,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
            seq_length=seq_length,
            pre_process=pre_process,
            post_process=post_process,
        )
        model_provider.arch, model_provider.vocab_size, model_provider.config = built.arch, built.meta["vocab_size"], built.config
        return built.model

    model_provider.gem_config = config
    model_provider.tokenizer = tokenizer
    return model_provider


def megatron_batch(collated: dict | None = None, *, contrastive: dict | None = None, device=None) -> dict:
    """The batch contract above from GEMDataCollator output.

    ``collated``: the collator's batch (HF-convention labels, shifted here to aligned ones); its
    ``gem_cl_*`` fields, or ``contrastive`` (a dict with input_ids/position_ids/doc_ids/roles/
    num_texts), become the contrastive rows. Either part may be missing.
    """
    ntp = None
    if collated is not None and "input_ids" in collated:
        hf = collated["labels"]
        aligned = torch.full_like(hf, IGNORE_INDEX)
        aligned[:, :-1] = hf[:, 1:]  # HF's labels[j] is predicted at j-1
        ntp = {k: collated[k] for k in BATCH_KEYS}
        ntp["labels"] = aligned
    if contrastive is None and collated is not None and CL_PREFIX + "input_ids" in collated:
        contrastive = {k[len(CL_PREFIX) :]: v for k, v in collated.items() if k.startswith(CL_PREFIX)}
    if ntp is None and contrastive is None:
        raise ValueError("megatron_batch: neither next-token rows nor contrastive rows given")
    return join_rows(ntp, contrastive, device)


class GEMForwardStep:
    """``forward_step(data_iterator, model) -> (output, loss_func)`` for megatron-core schedules
    and Megatron-LM's ``pretrain``. ``current_step``: returns the optimizer step (0-based) that
    picks the phase weights; or set ``.step`` yourself each iteration."""

    def __init__(self, config: GEMConfig, *, current_step: Callable[[], int] | None = None, gather_keys="auto"):
        self.config = config
        self.current_step = current_step
        self.step = 0
        self._gather_keys = gather_keys

    def gather_keys(self):
        if self._gather_keys != "auto":
            return self._gather_keys
        from megatron.core import parallel_state

        from ..common.distributed import make_gather_keys

        return make_gather_keys(parallel_state.get_data_parallel_group())

    def __call__(self, data_iterator, model):
        batch = next(data_iterator)
        output = model(
            batch["input_ids"], batch["position_ids"], gem_mask_info(batch["doc_ids"], batch["roles"]), ntp_rows=batch["ntp_rows"], labels=batch["labels"]
        )
        step = self.current_step() if self.current_step is not None else self.step
        return output, partial(self.loss_func, batch, unwrap_model(model), loss_weights(int(step), self.config))

    def loss_func(self, batch: dict, model, weights: tuple[float, float], output):
        """Last pipeline stage: (loss, {"lm loss", "gem cl loss"}) in megatron-core's 2-tuple form
        (the loss is mcore.loss.gem_micro_batch_loss, train.py's own)."""
        w_ntp, w_cl = weights
        out = gem_micro_batch_loss(
            batch,
            model,
            output,
            w_ntp=w_ntp,
            w_cl=w_cl,
            gather_keys=self.gather_keys() if batch["num_texts"] and w_cl > 0 else None,
            distill=Distillation.from_config(self.config),
        )
        report = {}
        if out.ntp is not None:
            report["lm loss"] = out.ntp
        if out.cl is not None:
            report["gem cl loss"] = out.cl
        return out.total, report
