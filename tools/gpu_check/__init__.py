"""GPU check of the GEM attention kernel (issue 16) and of train.py (issue 26): correctness, speed,
tuning, a training step, train.py end to end.

    python tools/gpu_check.py [--parts a,b,c,d] [--output DIR] [--time-budget-s 300] [--quick]

One command for one H200 (about 5 minutes with the default budget). Parts:
  a  correctness: the Triton kernel, sdpa and flex against the fp32 reference of the kernel
     tests (megatron_gem.kernels.reference), bf16 and fp16, outputs and dQ/dK/dV, several layouts
     incl. GQA/MQA and suffix_sees_bos; error bound = 2 x the low-precision reference's own
     error + slack (flash-attention style, the same bound as tests/kernels).
  b  speed: bf16, Hq:Hkv 32:8, head dims 128 and 64, 8k/16k/32k tokens in one row; masks dense
     causal, document-causal and the full GEM rule (K=1, p_raw 0.8, split, laid out by
     megatron_gem.gem.layout) on two packings: document lengths drawn from a real corpus, and
     FlashMask-style (3-7 documents at 8k, 6-10 at 16k, 10-14 at 32k); forward, backward and
     forward+backward ms (triton.testing.do_bench, median) and TFLOP/s on allowed pairs and on
     visited tiles; against torch.compile'd FlexAttention with the same mask_mod
     (megatron_gem.gem.mask.flex_mask_mod; BlockMask built once, build time reported) and, on
     dense causal, SDPA's flash and cuDNN backends. Block table build time reported separately.
  c  tuning: a small sweep of what default_launch_config exposes (tiles, warps and stages per
     kernel, the dK/dV query slice sub_m) for head dims 64 and 128 on the GEM mask at 16k, each
     candidate checked against the default config's results; prints the change to make.
  d  a mixed-NTP training step with transformers: Llama-3.2-1B-shaped LlamaConfig (random
     weights, bf16), packed rows of 4096 (megatron_gem.data.packing), attention through the
     project's HF adapter (megatron_gem.attention.hf): triton vs sdpa (dense mask) vs plain
     causal (SDPA flash); tokens/s, MFU, peak memory.
  e  (opt-in: --parts e) train.py end to end through torchrun with NCCL, DeepSpeed and
     megatron-core, full and summary mode: a run, the same run stopped (NaN guard / SIGUSR1
     with --exit-signal-handler) and resumed, compared with the uninterrupted one; the
     frameworks from a folder of wheels when the machine lacks them (train_e2e.py).
Targets (reported met / missed): GEM-mask fwd+bwd time <= FlexAttention's on the same mask;
dense-causal forward >= 0.9x SDPA-flash; GEM triton training step >= 0.95x plain causal tokens/s.

Each part runs in its own subprocess with its share of --time-budget-s (unused time passes on),
so a crash or a sticky CUDA error in one part loses no other part's figures. Every part's
failure is caught and recorded. Files in --output (default $OUT if set, else ./gpu_check_out):
gpu_check.json (everything), gpu_check.md (tables), gpu_check.log (progress), part_X.json
(each part's own results, written as it goes). The last stdout line is one JSON object with the
figures. Without CUDA (--quick on CPU, for tests) the kernel runs in the Triton interpreter,
timings are interpreter times (no performance meaning) and CUDA-only measurements are skipped
with their reason. Imports only torch, numpy, triton, transformers (part d) and megatron_gem's
gem / attention / kernels / data.packing modules: no deepspeed, no megatron-core (part e's
train.py processes import them).
"""
