#!/usr/bin/env python
"""GEM post-training entry point.

    deepspeed train.py --deepspeed ds_zero3.json --model PATH --data FILES --save DIR ...
    torchrun --nproc-per-node N train.py ...        python train.py ...   (one process)

`python train.py --help` lists every option. See README.md.
"""

import sys

from megatron_gem.training.deepspeed_engine import main

if __name__ == "__main__":
    sys.exit(main())
