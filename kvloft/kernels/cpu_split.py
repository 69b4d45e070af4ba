"""Work split between the calling thread and one helper thread that never makes the caller wait
for a thread that is not running.

A compiled CPU kernel that supports the split cuts its work into chunks (a head of q, 64 rows of
a weight, 256 keys). The caller posts the call to the helper (`Helper.post`) and runs the same
kernel itself; both take chunks from one counter (`claim`). When the counter is spent the
caller takes over every chunk the helper claimed and has not finished (`steal`), computing it
again itself, so it waits only on a helper caught inside the few stores that copy a finished
chunk out (`commit` .. `done`, 64-256 floats), never on one the OS has descheduled. The helper
computes into its own scratch and copies out only after winning the chunk's state
(`commit`), so a chunk taken over is written by the caller alone; a helper that wakes after
the call is over finds the counter spent and returns. An OpenMP parallel region instead waits
at its end for every thread of the team: on this shared 2-core machine, under load, that made
dense decode 7x slower than one thread (kernels/cpu_gemv.py has the figures).

The caller still shares the GIL with the helper, held by it in numba's dispatch of each call (a
few us): a helper descheduled there (another job on its core, nice 19) stalls the caller for a
time slice. So a post never blocks (`Helper.post`), and a helper that writes out (nearly) no
chunks over a window of posts is not posted to for a while (`Helper.record`), then probed again.

Chunk states (int64, ctl[1 + c]; ctl[0] is the claim counter):
    FREE 0 -> HELPER 1 (claimed by the helper) -> COPYING 2 (it won: copying out) -> DONE 3
    FREE or HELPER -> CALLER 4 (the caller computes it; terminal)
Every transition is an atomic compare-and-swap (seq_cst), so stores made before DONE are seen
by the caller that reads DONE.
"""

from __future__ import annotations

import logging
import os
import threading

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

log = logging.getLogger(__name__)

CALLER, HELPER = 0, 1  # the `role` argument of a split kernel
# The helper thread's nice value. With another job on one of the 2 cores a helper at the
# caller's priority took time slices from the caller, the step's critical path: a decode step
# (SmolLM2, 6K) took 137 ms against 110 on the caller alone; at nice 19, 118 (load ~2.3). On
# two idle cores nice changes nothing (the helper has a core of its own).
NICE = 19
_FREE, _HELPER, _COPYING, _DONE, _CALLER = 0, 1, 2, 3, 4


def _slot(context, builder, aryty, ary, idx, idxty):
    arr = context.make_array(aryty)(context, builder, ary)
    i = context.cast(builder, idx, idxty, types.intp)
    return cgutils.get_item_pointer(context, builder, aryty, arr, [i], wraparound=False)


@intrinsic
def _cas(typingctx, a, i, old, new):  # a int64[:]: atomically a[i] = new if a[i] == old; returns the old a[i]
    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        o = context.cast(builder, args[2], sig.args[2], types.int64)
        n = context.cast(builder, args[3], sig.args[3], types.int64)
        return builder.extract_value(builder.cmpxchg(ptr, o, n, "seq_cst", "seq_cst"), 0)
    return types.int64(a, i, old, new), codegen


@intrinsic
def _fetch_add(typingctx, a, i, inc):  # a int64[:]: atomically a[i] += inc; returns the old a[i]
    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.atomic_rmw("add", ptr, context.cast(builder, args[2], sig.args[2], types.int64), "seq_cst")
    return types.int64(a, i, inc), codegen


@intrinsic
def _load(typingctx, a, i):  # a int64[:]: an atomic read of a[i]
    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)
    return types.int64(a, i), codegen


@intrinsic
def _store(typingctx, a, i, v):  # a int64[:]: an atomic a[i] = v
    def codegen(context, builder, sig, args):
        ptr = _slot(context, builder, sig.args[0], args[0], args[1], sig.args[1])
        builder.store_atomic(context.cast(builder, args[2], sig.args[2], types.int64), ptr, "seq_cst", 8)
        return context.get_dummy_value()
    return types.void(a, i, v), codegen


@njit(nogil=True, cache=True)
def claim(ctl, role):  # ctl int64 [1 + n] -> the next chunk this role computes, or -1 when none is left
    n = ctl.shape[0] - 1
    while True:
        c = _fetch_add(ctl, 0, 1)
        if c < n:
            if _cas(ctl, 1 + c, _FREE, _CALLER if role == CALLER else _HELPER) == _FREE:
                return c
            continue  # the caller took it over between the counter and the state
        if role != CALLER:
            return -1
        return steal(ctl)


@njit(nogil=True, cache=True)
def steal(ctl):  # the caller, counter spent: a chunk the helper has not finished, taken over, or -1
    for c in range(ctl.shape[0] - 1):
        s = _load(ctl, 1 + c)
        while s == _FREE or s == _HELPER:
            if _cas(ctl, 1 + c, s, _CALLER) == s:
                return c
            s = _load(ctl, 1 + c)
    return -1


@njit(nogil=True, cache=True)
def commit(ctl, c, role):  # chunk c computed: may this role write it out? (the helper: unless taken over)
    return role == CALLER or _cas(ctl, 1 + c, _HELPER, _COPYING) == _HELPER


@njit(nogil=True, cache=True)
def done(ctl, c, role):  # chunk c written out
    if role != CALLER:
        _store(ctl, 1 + c, _DONE)


@njit(nogil=True, cache=True)
def settle(ctl, role):  # the caller, last: wait for the helper's copies in flight (a few stores each)
    if role == CALLER:
        for c in range(ctl.shape[0] - 1):
            while _load(ctl, 1 + c) == _COPYING:  # a spin: numba's JIT takes no inline `pause`
                pass


@njit(nogil=True, cache=True)
def _spin(posted, seen, n):  # up to n reads (~n ns) of posted[0] until it moves past `seen`
    for _ in range(n):
        if _load(posted, 0) != seen:
            return True
    return False


@njit(nogil=True, cache=True)
def helped(ctl):  # ctl int64 [1 + n], the call over: how many chunks the helper wrote out
    k = 0
    for c in range(ctl.shape[0] - 1):
        if ctl[1 + c] == _DONE:
            k += 1
    return k


def new_ctl(n_chunks: int) -> np.ndarray:
    """The control block of one split call: int64 [1 + n_chunks], all FREE."""
    return np.zeros(1 + n_chunks, dtype=np.int64)


class Helper:
    """One daemon thread that runs the split kernels posted to it, the latest post first.

    `post(kernel, args)` is called by the thread that then runs kernel(CALLER, *args) itself; the
    helper runs kernel(HELPER, *args) once it is scheduled. A post the helper has not begun is
    replaced by the next one (it would find its counter spent). Between posts the helper spins
    for up to SPIN reads (~0.15 ms here, without the GIL) before it sleeps: a decode step posts every
    0.05-0.5 ms, and a wake from sleep took longer than the small calls themselves.

    The caller never blocks here: the job is one attribute store and a counter bump (under the
    GIL, which the caller holds anyway); the lock is taken only to wake a sleeping helper, and
    only if free (acquire(blocking=False)): a helper holding it is awake and sees the post.
    Backoff: `record` is told how many chunks the helper wrote out of each posted call; when over
    WINDOW posts it wrote fewer than 1/IDLE_SHARE of their chunks (another job has its core: it is
    descheduled, and every post risks the caller waiting on the GIL it holds in numba's dispatch),
    the next `skip` calls are not posted (the caller computes alone), then WINDOW posts probe
    again; `skip` doubles from SKIP_MIN to SKIP_MAX while the probes fail, and resets on a good one."""

    SPIN = 200_000
    WINDOW = 8
    IDLE_SHARE = 8
    SKIP_MIN, SKIP_MAX = 32, 2048

    def __init__(self, start: bool = True) -> None:
        self._cv = threading.Condition(threading.Lock())  # not reentrant: acquire(blocking=False) means it
        self._job: tuple | None = None
        self._posted = np.zeros(1, dtype=np.int64)  # posts so far, read by the spin without the GIL
        self._sleeping = False
        self._skip = 0  # calls left to compute without posting
        self._skip_next = self.SKIP_MIN
        self._win = [0, 0, 0]  # this window's posts, chunks the helper wrote, chunks posted
        self.posts = self.skipped = 0  # counts, for tests and measurements
        self.alive = True  # False in a forked child: the thread is not there (the caller computes alone)
        self.thread = threading.Thread(target=self._run, name="kvloft-cpu-split", daemon=True)
        if start:
            self.thread.start()

    def post(self, kernel, args: tuple) -> bool:
        """Hand kernel(HELPER, *args) to the helper; False where it was not (the caller computes alone)."""
        if not self.alive:
            return False
        if self._skip > 0:
            self._skip -= 1
            self.skipped += 1
            return False
        self._job = (kernel, args)
        self._posted[0] += 1  # one writer (the caller, under the GIL); the spin's aligned load sees it whole
        self.posts += 1
        if self._sleeping and self._cv.acquire(blocking=False):
            try:
                self._cv.notify()
            finally:
                self._cv.release()
        return True

    def record(self, done: int, chunks: int) -> None:
        """A posted call is over: the helper wrote `done` of its `chunks` chunks."""
        w = self._win
        w[0] += 1
        w[1] += done
        w[2] += chunks
        if w[0] < self.WINDOW:
            return
        if w[1] * self.IDLE_SHARE < w[2]:
            self._skip = self._skip_next
            self._skip_next = min(2 * self._skip_next, self.SKIP_MAX)
        else:
            self._skip_next = self.SKIP_MIN
        w[0] = w[1] = w[2] = 0

    def _run(self) -> None:
        if hasattr(os, "setpriority"):  # nice 19, this thread only (Linux): it yields to anything else runnable
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
        seen = 0
        while True:
            if not _spin(self._posted, seen, self.SPIN):
                with self._cv:
                    self._sleeping = True  # before the check: a post after it sees the flag and wakes us
                    while self._posted[0] == seen:
                        self._cv.wait()
                    self._sleeping = False
            seen = int(self._posted[0])
            job = self._job
            if job is None:
                continue
            if self._job is job:
                self._job = None  # the arrays are not kept past the call (a newer post may land between: lost)
            try:
                job[0](HELPER, *job[1])
            except Exception:  # the caller computes every chunk the helper leaves; keep serving
                log.exception("split kernel %s failed on the helper thread", getattr(job[0], "__name__", job[0]))
            job = None


_helper: Helper | None = None
_helper_lock = threading.Lock()


def _forked() -> None:  # in a child process: its copy of the helper has no thread (and maybe a held lock)
    if _helper is not None:
        _helper.alive = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forked)


def cores() -> int:
    """CPU cores this process may run on (its affinity mask)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def helper(on: bool | None = None) -> Helper | None:
    """The process's helper thread, started at the first call with `on` (None: on where
    `cores()` >= 2); `on=False` or one core -> None (split kernels run on the caller alone)."""
    global _helper
    if _helper is not None and not _helper.alive:
        _helper = None  # a forked child starts its own
    if on is None:
        on = cores() >= 2
    if not on:
        return None
    with _helper_lock:
        if _helper is None:
            _helper = Helper()
        return _helper


def run(kernel, args: tuple, split: Helper | None) -> None:
    """Run a split kernel: posted to `split` and run by the caller (None: the caller alone).
    The kernel's last argument is its control block (`new_ctl`)."""
    if split is None or not split.post(kernel, args):
        kernel(CALLER, *args)
        return
    kernel(CALLER, *args)
    ctl = args[-1]
    split.record(helped(ctl), ctl.shape[0] - 1)
