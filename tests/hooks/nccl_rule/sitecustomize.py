"""Test-only: NCCL's device rule reproduced on gloo, in every process of a test's train.py run
(tests/training/test_collective_device.py). Never used in production.

Python imports this file at start-up (``sitecustomize``) when its folder is on PYTHONPATH; it
does anything only when GEM_TEST_NCCL_RULE names a folder for its reports. Then:

* the project's rule (megatron_gem.common.distributed.BACKEND_DEVICE) is told that gloo groups
  communicate on a declared device that is not the CPU (DECLARED), as NCCL groups communicate
  on CUDA while the trainer's bookkeeping tensors are host tensors;
* ``Tensor.to(DECLARED)`` gives a copy that stands on the declared device: an ``OnDeclared``
  tensor (CPU memory underneath, so gloo can still move it) whose ``.device`` is DECLARED;
  ``.to`` anything else, or ``.cpu()``, gives a plain host copy again; an op that mixes it
  with a host tensor of one or more dimensions is refused, as CUDA refuses;
* torch.distributed's tensor collectives, when called from the project's code (megatron_gem/,
  tools/, train.py; the frameworks' own collectives keep their own rules), refuse
  any tensor not on DECLARED, the way NCCL refuses a host tensor ("No backend type associated
  with device type cpu"), then run on gloo with the host memory underneath;
* at exit, each process that imported the rule's module writes ``rank{RANK}-{pid}.json`` into
  the report folder: how many project collectives were checked, from which call sites (the
  first project function outside common/distributed.py), what was refused, and whether the
  rule took the declaration (helper processes, such as torchrun's or a checkpoint writer's,
  write none).
"""

import os

if os.environ.get("GEM_TEST_NCCL_RULE"):
    import atexit
    import importlib.abc
    import json
    import sys
    from collections import Counter

    import torch
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d
    from torch.utils import _pytree as pytree

    REPORT_DIR = os.environ["GEM_TEST_NCCL_RULE"]
    REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    PROJECT = tuple(os.path.join(REPO, p) for p in ("megatron_gem" + os.sep, "tools" + os.sep, "train.py"))
    RULE_FILE = os.path.join(REPO, "megatron_gem", "common", "distributed.py")
    RULE_MODULE = "megatron_gem.common.distributed"
    DECLARED = torch.device("privateuseone")  # any device type that is not the CPU
    TENSOR_COLLECTIVES = (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "broadcast",
        "reduce",
        "gather",
        "scatter",
        "all_to_all",
        "all_to_all_single",
        "send",
        "recv",
        "isend",
        "irecv",
    )
    report = {"declared": str(DECLARED), "rule_imported": False, "rule_declared": False, "checked": Counter(), "sites": Counter(), "refused": []}

    class OnDeclared(torch.Tensor):
        """A host tensor standing on the declared communication device."""

        @property
        def device(self):
            return DECLARED

        def cpu(self, *args, **kwargs):
            return self.as_subclass(torch.Tensor).clone()

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            mixed = [t for t in pytree.tree_leaves((args, kwargs)) if type(t) is torch.Tensor and t.dim() > 0]
            if mixed:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, cpu and {DECLARED}! ({func})")
            return super().__torch_function__(func, types, args, kwargs)

    _to = torch.Tensor.to

    def _moved(self, *args, **kwargs):
        """Tensor.to with the declared device: onto it (a copy standing there) or off it."""
        copy = kwargs.pop("copy", False)
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        on = isinstance(self, OnDeclared)
        plain = self.as_subclass(torch.Tensor) if on else self
        fmt = {} if memory_format is None else {"memory_format": memory_format}
        if device == DECLARED or (on and device is None):
            if on and not copy and (dtype is None or dtype == self.dtype) and memory_format is None:
                return self
            return _to(plain, dtype=dtype or self.dtype, copy=True, **fmt).as_subclass(OnDeclared)
        if on:  # leaving the declared device: a copy, as a device move is
            return _to(plain, device, dtype or self.dtype, copy=True, **fmt)
        return _to(self, *args, copy=copy, **kwargs)

    torch.Tensor.to = _moved

    def _project(frame) -> bool:
        return frame.f_code.co_filename.startswith(PROJECT)

    def _where(frame) -> str:
        path = os.path.relpath(frame.f_code.co_filename, REPO)
        return f"{path}:{frame.f_code.co_name}"

    def _site(frame) -> str:
        """The first project function outside the rule's own module, outward from ``frame``."""
        f = frame
        while f is not None and (f.f_code.co_filename == RULE_FILE or not _project(f)):
            f = f.f_back
        return _where(f) if f is not None else _where(frame)

    def _checked(name, original):
        def collective(*args, **kwargs):
            caller = sys._getframe(1)
            if not _project(caller):
                return original(*args, **kwargs)
            tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            site = _site(caller)
            wrong = [t for t in tensors if not isinstance(t, OnDeclared)]
            if wrong:
                message = (
                    f"[nccl rule] {name} called from {_where(caller)} (site {site}) with a tensor on {wrong[0].device}; "
                    f"this group communicates on {DECLARED} only (NCCL: No backend type associated with device type {wrong[0].device.type})"
                )
                report["refused"].append(message)
                raise RuntimeError(message)
            report["checked"][name] += 1
            report["sites"][f"{name} {site}"] += 1
            unwrap = lambda x: x.as_subclass(torch.Tensor) if isinstance(x, OnDeclared) else x  # noqa: E731
            return original(*pytree.tree_map(unwrap, args), **pytree.tree_map(unwrap, kwargs))

        collective.__name__ = name
        return collective

    for _name in TENSOR_COLLECTIVES:
        _wrapped = _checked(_name, getattr(c10d, _name))
        setattr(c10d, _name, _wrapped)  # torch's object collectives call these module globals
        setattr(dist, _name, _wrapped)

    def _declare(module) -> None:
        report["rule_imported"] = True
        table = getattr(module, "BACKEND_DEVICE", None)
        if isinstance(table, dict):
            table["gloo"] = DECLARED.type
            report["rule_declared"] = True

    class _DeclareOnImport(importlib.abc.MetaPathFinder):
        """Declares DECLARED in the rule's table as soon as the rule's module is executed."""

        def find_spec(self, name, path=None, target=None):
            if name != RULE_MODULE:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    break
            else:
                return None
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                _declare(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _DeclareOnImport())

    @atexit.register
    def _write_report() -> None:
        if not report["rule_imported"]:
            return
        os.makedirs(REPORT_DIR, exist_ok=True)
        out = dict(report, rank=os.environ.get("RANK"), pid=os.getpid(), argv=sys.argv)
        with open(os.path.join(REPORT_DIR, f"rank{os.environ.get('RANK', 'none')}-{os.getpid()}.json"), "w") as f:
            json.dump(out, f, indent=1)
