"""train.py's main: the command line becomes a JobConfig here (and nowhere further down), the
engine the flags select runs it through the shared trainer, and errors become one line."""

from __future__ import annotations

import os

from ..common import distributed as D
from ..common.errors import ModelLoadError
from ..common.manifest import CheckpointError
from ..data import DataError
from .args import ArgumentError, job_config, parse_args
from .checkpoint import CheckpointWriteError
from .guard import NonFiniteError


def make_engine(job):
    """Import only the chosen engine: the DeepSpeed path never loads megatron-core."""
    if job.parallel.engine == "megatron":
        from .megatron_engine import MegatronEngine

        return MegatronEngine()
    from .deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine()


def main(argv=None) -> int:
    from .trainer import train

    args = parse_args(argv)
    D.ensure_launcher_env()  # a plain `python train.py` is a one-process job
    engine = None
    try:
        job = job_config(args, world_size=int(os.environ["WORLD_SIZE"]))  # before any process group: bad flags fail fast
        engine = make_engine(job)
        summary = train(job, engine)
    except (ArgumentError, ModelLoadError, DataError) as e:  # the user's input: one clear line
        print(f"train.py: error: {e}", flush=True)
        shutdown(engine)
        return 2
    except (NonFiniteError, CheckpointError, CheckpointWriteError) as e:
        # The run cannot go on. Every rank raised the same error (they agree collectively), so
        # one of them says it.
        D.print_main(f"train.py: error: {e}")
        shutdown(engine)
        return 1
    D.print_main(f"[megatron-gem] done: {summary}")
    shutdown(engine)
    return 0


def shutdown(engine) -> None:
    """Process groups go down before the interpreter does (see Engine.shutdown). An unexpected
    exception skips this on purpose: its traceback matters more than a clean exit."""
    if engine is not None:
        engine.shutdown()
