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

import sys

if __name__ == "__main__":
    if "--exit-signal-handler" in sys.argv:
        # Before the heavy imports: a pre-emption signal during start-up is not lost.
        from megatron_gem.training.process_setup import exit_signal_handler

        exit_signal_handler(True)
    from megatron_gem.training.main import exit_process, main

    exit_process(main())
