#!/usr/bin/env python
"""GEM post-training entry point.

DeepSpeed (ZeRO-0/1/2/3), the default:
    deepspeed train.py --deepspeed ds_zero3.json --model PATH --data FILES --save DIR ...
    torchrun --nproc-per-node N train.py ...        python train.py ...   (one process)
megatron-core (tensor/pipeline/data parallel), selected by Megatron's parallelism flags:
    torchrun --nproc-per-node N train.py --tensor-model-parallel-size T --pipeline-model-parallel-size P ...

`python train.py --help` lists every option (add a parallelism flag for the megatron ones).
See README.md.
"""

import importlib
import sys

from megatron_gem.training.megatron_args import wants_megatron  # imports no megatron-core

if __name__ == "__main__":
    if "--exit-signal-handler" in sys.argv:
        # Before the heavy imports: a pre-emption signal during start-up is not lost.
        from megatron_gem.training.distributed import exit_signal_handler

        exit_signal_handler(True)
    # Import only the chosen engine: the DeepSpeed path never loads megatron-core.
    engine = "megatron_engine" if wants_megatron(sys.argv[1:]) else "deepspeed_engine"
    sys.exit(importlib.import_module(f"megatron_gem.training.{engine}").main())
