"""train.py's main: the command line becomes a JobConfig here (and nowhere further down), the
engine the flags select runs it through the shared trainer, and errors become one line on
stderr (common/entry_point.py): exit 2 for the input (flags, paths, data, model folders), 1 for a
failure during the run (a damaged checkpoint, a failed write, a non-finite step); the
traceback only with --debug."""

from __future__ import annotations

import atexit
import os
import sys

import torch.distributed as dist

from ..common import distributed as D
from ..common.entry_point import exit_code_of, message_of, report
from ..common.manifest import CheckpointError
from .args import job_config, parse_args
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
    args = parse_args(argv)
    D.ensure_launcher_env()  # a plain `python train.py` is a one-process job
    engine = None
    try:
        job = job_config(args, world_size=int(os.environ["WORLD_SIZE"]))  # before any process group: bad flags fail fast
        from .run import train

        engine = make_engine(job)
        result = train(job, engine)
    except Exception as e:
        code = exit_code_of(e)
        if code is None or args.debug:
            raise  # a true bug, or --debug: the traceback
        # Errors the ranks agree on collectively are said once, by rank 0; any other is said by
        # the rank that met it (it may be the only one).
        if D.is_main() or not isinstance(e, (NonFiniteError, CheckpointError, CheckpointWriteError)):
            report("train.py", message_of(e), stream=sys.stderr)
        shutdown(engine)
        return code
    D.print_main(f"[megatron-gem] done: {result}")
    D.barrier()  # no rank tears its groups down while another still finishes its last collective
    shutdown(engine)
    return 0


_HAD_PROCESS_GROUP = False  # set by shutdown(): exit_process then skips interpreter finalisation


def shutdown(engine) -> None:
    """Process groups go down before the interpreter does (see Engine.shutdown). An unexpected
    exception skips this on purpose: its traceback matters more than a clean exit."""
    global _HAD_PROCESS_GROUP
    _HAD_PROCESS_GROUP = _HAD_PROCESS_GROUP or (dist.is_available() and dist.is_initialized())
    if engine is not None:
        engine.shutdown()


def exit_process(code: int):
    """train.py's last act. After a run that held process groups, the streams are flushed and the
    process leaves with os._exit: interpreter finalisation then destroys C++ objects that
    outlive Python's references (gloo and DeepSpeed worker threads, work objects holding
    tensors) without the GIL they need, and aborts a finished run ("terminate called without an
    active exception", exit -6), which destroy_process_group alone did not prevent (CI, a 2-rank
    ZeRO-3 run). By then every output is committed: checkpoints and exports are written
    atomically and the loggers closed (Trainer's log.close())."""
    if not _HAD_PROCESS_GROUP:
        sys.exit(code)
    # What a normal exit runs before finalisation still runs: the atexit handlers (multiprocessing
    # ends its daemonic children and managers, e.g. megatron-core's checkpoint writers, whose
    # inherited stdout would otherwise keep a launcher's pipe open; logging flushes).
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
            pass
    os._exit(code)
