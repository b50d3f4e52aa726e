"""ModelWorker: the one thread that runs every forward of the served model.

Why one thread: the model is one copy of the weights, and summary mode's adapter keeps per-forward
state (the rows its deltas act on, set by a pre-hook from the forward's roles: hf/summary.py), so
two forwards at once on two threads would race. transformers serve runs ``model.generate`` on a
persistent inference thread for the same kind of reason (its ``InferenceThread``); this is that
design with two queues: embedding batches are *urgent* and also run between the decode steps of a
running generation (``drain_urgent``, called from the generation's streamer), so a long answer
delays an embedding by one decode step, not by the whole answer.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import threading
from concurrent.futures import Future
from typing import Callable


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()  # glibc: give freed heap back to the system after each job (None elsewhere)
_M_ARENA_MAX = -8


def bound_malloc_arenas(n: int = 2) -> None:
    """glibc gives each thread that allocates its own heap arena, which keeps the memory freed
    in it; the worker and the HTTP threads would each hold the peak of the batches they ran.
    Call before threads start (the server's command line does)."""
    if _LIBC is not None and hasattr(_LIBC, "mallopt"):
        _LIBC.mallopt(_M_ARENA_MAX, n)


class ModelWorker:
    def __init__(self, name: str = "gem-model"):
        self._urgent: collections.deque = collections.deque()
        self._normal: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def submit(self, fn: Callable, *args, urgent: bool = False) -> Future:
        """Run ``fn(*args)`` on the worker thread; its result (or exception) lands in the Future."""
        future: Future = Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the model worker is stopped")
            (self._urgent if urgent else self._normal).append((fn, args, future))
            self._cv.notify()
        return future

    def on_worker_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def drain_urgent(self) -> None:
        """Run every queued urgent job now (only on the worker thread, between two forwards)."""
        if not self.on_worker_thread():
            raise RuntimeError("drain_urgent runs on the model worker's thread only")
        while True:
            with self._cv:
                if not self._urgent:
                    return
                job = self._urgent.popleft()
            _run(*job)

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._urgent or self._normal or self._stopped):
                    self._cv.wait()
                if self._stopped and not (self._urgent or self._normal):
                    return
                job = self._urgent.popleft() if self._urgent else self._normal.popleft()
            _run(*job)
            if _LIBC is not None:  # a batch's or an answer's activations go back to the system
                _LIBC.malloc_trim(0)

    def stop(self, timeout: float | None = 5.0) -> None:
        """Finish the queued jobs, then end the thread."""
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout)


def _run(fn, args, future: Future) -> None:
    if not future.set_running_or_notify_cancel():
        return
    try:
        future.set_result(fn(*args))
    except BaseException as e:  # the caller sees it; the worker keeps serving
        future.set_exception(e)
