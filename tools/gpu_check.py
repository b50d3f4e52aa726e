#!/usr/bin/env python
"""GPU check of the GEM attention kernel and of train.py: the command line (docs/kernel.md,
"GPU check"). The parts live in the gpu_check package beside this file (tools/gpu_check/):

    environment.py   the machine, versions, the card's bf16 matmul rate
    correctness.py   a: kernel, sdpa and flex against the fp32 reference
    speed.py         b: the kernel against compiled FlexAttention and SDPA flash / cuDNN
    tuning.py        c: a sweep of the kernel's launch settings
    train_step.py    d: one transformers training step, triton vs sdpa vs plain causal
    train_e2e.py     e: train.py end to end through torchrun (NCCL on a GPU), both engines and
                        modes, stop (NaN guard / SIGUSR1) and exact resume; opt-in: --parts e
    report.py        targets, markdown, the last stdout line
    main.py          the command line, one subprocess per part, the budget
    workload.py      document lengths of a real corpus and packed rows (shared by a-d)
    common.py        clock, log, timer, FLOP conventions

    python tools/gpu_check.py [--parts a,b,c,d] [--output DIR] [--time-budget-s 300] [--quick]
    python tools/gpu_check.py --parts e [--wheels DIR] [--train-combos deepspeed:full,...] [--cpu]
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(HERE), HERE):  # the repository (megatron_gem) and tools/ (gpu_check)
    if path not in sys.path:
        sys.path.insert(0, path)

from gpu_check.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
