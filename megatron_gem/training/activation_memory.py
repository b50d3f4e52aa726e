"""The activation memory of one micro-batch's forward and backward, measured without a GPU:
the real HF model (GEM attention, the chunked next-token loss of gem/lm_head_loss.py) runs on
fake tensors (FakeTensorMode: shapes and dtypes, no data), and every storage the step
allocates is counted while it lives. The peak of the live bytes is the step's activation
peak; parameters exist before the count starts and are not in it.

Why fake *CPU* tensors and not fake CUDA ones: on a CPU-only PyTorch, autograd's backward
refuses CUDA fake tensors (it asks a CUDA device guard for every gradient's metadata). The
memory of a step does not depend on the device: the same operators allocate the same outputs.
What does depend on it is the attention backend, so the backend is named explicitly
(``triton``: what a CUDA run takes for packed rows; its ``register_fake`` implementation gives
the outputs, nothing launches).

Each allocation is labelled by where it happens: inside the attention operator (forward or
backward: the kernel's outputs o, lse, dq, dk, dv, or the dense path's mask and scores),
inside the LM-head loss (its forward or its backward node: logits blocks, log-sum-exp, the
hidden-state gradient), a parameter's gradient (AccumulateGrad), or anything else (the
activations the layers keep for backward and their gradients). ``ActivationPeak`` is the
composition of the live bytes at the moment of the peak.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

LABELS = ("activations", "attention", "logits_loss", "gradients")
_ATTENTION_OPS = ("gem_attention", "scaled_dot_product", "flex_attention")


@dataclass(frozen=True)
class Composition:
    """Bytes live at one moment, by label (see the module docstring)."""

    activations: int = 0
    attention: int = 0
    logits_loss: int = 0
    gradients: int = 0  # parameter gradients (0 when each is dropped as it is made)

    @property
    def total(self) -> int:
        return self.activations + self.attention + self.logits_loss + self.gradients


@dataclass(frozen=True)
class ActivationPeak:
    """The step's peak (``overall``) and the peak once the first parameter gradient is complete
    (``backward``: where ZeRO-2/3's gradient partition, allocated at the first reduction, adds
    to what is live). Without any gradient (nothing trains in the base) the two are equal."""

    overall: Composition
    backward: Composition


class StorageTracker(TorchDispatchMode):
    """Counts every storage an operator returns, once, until it is freed (a weakref finalizer
    on the storage: PyTorch keeps one Python object per live storage). ``peak`` and
    ``at_peak`` (bytes by label at that moment)."""

    def __init__(self, loss_module: torch.nn.Module | None = None):
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}
        self.by_label = dict.fromkeys(LABELS, 0)
        self.current = self.peak = 0
        self.at_peak = dict(self.by_label)
        self.backward_peak, self.at_backward_peak = 0, dict(self.by_label)
        self._grads_made = False
        self._in_loss = 0
        self.loss_nodes: set = set()  # backward nodes of a loss graph not made by LMHeadCrossEntropy (HF's full-logits loss)
        if loss_module is not None:  # the loss's forward, by its module's hooks
            loss_module.register_forward_pre_hook(lambda *_: self._enter_loss())
            loss_module.register_forward_hook(lambda *_: self._leave_loss())

    def _enter_loss(self):
        self._in_loss += 1

    def _leave_loss(self):
        self._in_loss -= 1

    def _label(self, func, node_name: str, node=None) -> str:
        name = str(func)
        if any(op in name for op in _ATTENTION_OPS):
            return "attention"
        if "AccumulateGrad" in node_name:
            return "gradients"
        if any(op in node_name for op in _ATTENTION_OPS):
            return "attention"
        if self._in_loss or "LMHeadCrossEntropy" in node_name or (node is not None and node in self.loss_nodes):
            return "logits_loss"
        return "activations"

    def run(self, func, args, kwargs):
        """Runs one operator (the next mode down: FakeTensorMode). A subclass may run some
        operators otherwise (training/contrastive_memory.py: a batch's real metadata)."""
        return func(*args, **kwargs)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self.run(func, args, kwargs or {})
        node = torch._C._current_autograd_node()  # the backward node running now, if any
        node_name = node.name() if node is not None else ""
        label = None
        inputs = {a.untyped_storage()._cdata for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self.live or key in inputs:
                continue  # a view or an in-place result (of a parameter, too): nothing new
            label = label or self._label(func, node_name, node)
            n = storage.nbytes()
            self.live[key] = (n, label)
            self.by_label[label] += n
            self.current += n
            weakref.finalize(storage, self._free, key)
            if self.current > self.peak:
                self.peak, self.at_peak = self.current, dict(self.by_label)
            if self._grads_made and self.current > self.backward_peak:
                self.backward_peak, self.at_backward_peak = self.current, dict(self.by_label)
        return out

    def gradient_made(self, param: torch.Tensor, keep: bool) -> None:
        """A parameter's post-accumulate-grad hook: its gradient counts as "gradients" from now
        on (autograd often hands over a tensor its backward made, labelled there), or is
        dropped (``keep`` False: ZeRO-2/3 move it into their buffers)."""
        self._grads_made = True
        key = param.grad.untyped_storage()._cdata
        if key in self.live and self.live[key][1] != "gradients":
            n, label = self.live[key]
            self.by_label[label] -= n
            self.by_label["gradients"] += n
            self.live[key] = (n, "gradients")
        if not keep:
            param.grad = None

    def _free(self, key: int) -> None:
        n, label = self.live.pop(key)
        self.by_label[label] -= n
        self.current -= n


def fake_model(hf_config, *, dtype: torch.dtype, vocab_size: int):
    """The HF causal LM of ``hf_config`` (vocabulary ``vocab_size``: with the GEM tokens and
    the training-time padding) with fake parameters. Built on the meta device (no memory, no
    init), then given fake CPU storage inside the caller's FakeTensorMode."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(hf_config)
    cfg.vocab_size = vocab_size
    cfg.use_cache = False
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return lm


def measure_step_activations(
    hf_config,
    *,
    micro_batch_size: int,
    seq_length: int,
    vocab_size: int,
    dtype: torch.dtype = torch.bfloat16,
    train_mode: str = "full",
    gradient_checkpointing: bool = False,
    keep_grads: bool = False,
    backend: str = "triton",
    loss: str = "chunked",
) -> ActivationPeak:
    """Peak bytes of one micro-batch of packed NTP rows [micro_batch_size, seq_length]: the
    GEM model's ``ntp_losses`` forward (GEM attention, chunked LM-head loss), the loss summed,
    backward. ``keep_grads``: parameter gradients stay (ZeRO-0/1 keep full gradients until the
    step); else each is dropped once accumulated (ZeRO-2/3 reduce-scatter them in buckets into
    a partition, which the caller counts by the sharding rule).

    ``train_mode="summary"``: the base is frozen; what trains are low-rank deltas at the
    summary tokens, whose own tensors are a few rows per document. The backward still runs
    from the loss down to the first layer's input (the deltas act in every layer), so it is
    measured as the frozen base's backward to the embedding output: no weight gradients, and
    no linear layer keeps its input for one.

    ``loss``: "chunked" (gem/lm_head_loss.py through hf/head_loss.py: the training path) or "hf"
    (before it: transformers' own causal-LM forward with labels, i.e. the full logits
    [tokens, vocab] from the LM head, upcast to fp32 by its loss_function, then cross-entropy).
    ``backend``: the GEM attention backend; "sdpa" is the dense-mask path the Triton kernel
    replaced on GPU (a [b, 1, s, s] boolean mask and SDPA).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ..attention.hf import use_gem_attention
    from ..hf.head_loss import LMHeadLosses

    if train_mode not in ("full", "summary"):
        raise ValueError(f"train_mode must be 'full' or 'summary', got {train_mode!r}")
    if loss not in ("chunked", "hf"):
        raise ValueError(f"loss must be 'chunked' or 'hf', got {loss!r}")
    lm = fake_model(hf_config, dtype=dtype, vocab_size=vocab_size)
    with FakeTensorMode(allow_non_fake_inputs=True):
        lm.to_empty(device="cpu")
        use_gem_attention(lm, backend=backend)
        if gradient_checkpointing:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.train()
        if train_mode == "summary":
            lm.requires_grad_(False)
            lm.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_(True))
        head = LMHeadLosses(lm)
        tracker = StorageTracker(loss_module=head)
        for p in lm.parameters():
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(lambda p: tracker.gradient_made(p, keep_grads))
        shape = (micro_batch_size, seq_length)
        ids = torch.zeros(shape, dtype=torch.long)
        with tracker:
            if loss == "hf":
                total = _hf_full_logits_loss(lm, ids, tracker)
            else:
                hidden = lm.base_model(input_ids=ids, position_ids=ids, doc_ids=ids, roles=ids, use_cache=False).last_hidden_state
                total = head(hidden, ids).sum()
                del hidden
            total.backward()
            tracker.loss_nodes.clear()
    backward = tracker.at_backward_peak if tracker.backward_peak else tracker.at_peak
    return ActivationPeak(overall=Composition(**tracker.at_peak), backward=Composition(**backward))


def _hf_full_logits_loss(lm, ids: torch.Tensor, tracker: StorageTracker) -> torch.Tensor:
    """transformers' causal-LM forward with labels (its LM head on every position, its
    loss_function: logits upcast to fp32, shifted, cross-entropy), labelled for the tracker: from
    the LM head's forward to the loss in forward, and the backward nodes between the loss and
    the last hidden state in backward, count as logits/loss."""
    seen = {}
    hooks = [
        lm.base_model.register_forward_hook(lambda m, i, out: seen.__setitem__("hidden", out.last_hidden_state)),
        lm.get_output_embeddings().register_forward_pre_hook(lambda *_: tracker._enter_loss()),
    ]
    try:
        out = lm(input_ids=ids, position_ids=ids, doc_ids=ids, roles=ids, labels=ids, use_cache=False)
        tracker._leave_loss()
    finally:
        for h in hooks:
            h.remove()
    stop, todo = seen["hidden"].grad_fn, [out.loss.grad_fn]
    while todo:  # the loss's graph down to the hidden state
        node = todo.pop()
        if node is None or node is stop or node in tracker.loss_nodes:
            continue
        tracker.loss_nodes.add(node)
        todo += [n for n, _ in node.next_functions]
    return out.loss


def measure_optimizer_step(numels: list[int], *, dtype: torch.dtype = torch.float32) -> int:
    """Peak bytes of temporaries of a steady-state torch AdamW step (state already made) over
    parameters of these sizes, on fake tensors: what the CPU engine's optimizer (torch AdamW,
    not foreach on CPU) allocates beyond the parameters, gradients and moments. (On GPU the
    engine's FusedAdam updates in place: no such temporaries.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.empty(n, dtype=dtype)) for n in numels]
        for p in params:
            p.grad = torch.empty_like(p)
        opt = torch.optim.AdamW(params, lr=1e-4)
        opt.step()  # makes the moments
        tracker = StorageTracker()
        with tracker:
            opt.step()
    return tracker.peak
