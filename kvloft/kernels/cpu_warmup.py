"""Load the compiled CPU kernels off the decode path, in a background thread.

numba compiles a kernel at its first call, or loads it from its on-disk cache (`cache=True`);
either way the first call of a process pays: ~0.75 s for the first kernel loaded from the
cache (numba's code generator starting up), 0.4-10 s for one compiled (a parallel kernel on
this 2-core machine: ~9 s). Left to the first decode step, that lands on a token's latency
(`kvloft demo`: ~80 ms on each of exact's 12 tokens). A CPU model starts this thread when it
is declared (runtime/model.py Transformer.declare_kernels), so the kernels are ready by the
time its prompt is prefilled; a call made before the thread is done waits on numba's compile
lock, as it would have compiled anyway.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_started: threading.Thread | None = None
_lock = threading.Lock()


def _warm_all() -> None:
    from kvloft.kernels import cpu_attend, cpu_decode, cpu_gemv, cpu_layer, cpu_rank, cpu_rows, cpu_score

    for kernel in (cpu_layer, cpu_attend, cpu_gemv, cpu_score, cpu_decode, cpu_rank, cpu_rows):
        try:
            kernel.warm()
        except Exception:  # a kernel that cannot compile fails again, loudly, at its first real call
            log.exception("compiling %s in the background failed", kernel.__name__)


def start() -> threading.Thread:
    """Start loading the compiled CPU kernels in a daemon thread, once per process; returns the
    thread (join it to wait). Later calls return the same thread."""
    global _started
    # numba's argument typing reads np.ma, which numpy imports lazily: a first import from this
    # thread and the caller's at once recursed in numpy's __getattr__ (RecursionError in a feed)
    import numpy.ma  # noqa: F401

    with _lock:
        if _started is None:
            _started = threading.Thread(target=_warm_all, name="kvloft-cpu-kernels", daemon=True)
            _started.start()
        return _started
