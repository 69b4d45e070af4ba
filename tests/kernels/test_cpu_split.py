"""kernels/cpu_split.py: the chunk protocol between the caller and the helper thread. A helper
that claimed a chunk and stalled never makes the caller wait and never writes the chunk once the
caller took it over; a helper that comes late finds nothing to do."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from kvloft.kernels import cpu_layer, cpu_split
from kvloft.kernels.cpu_split import CALLER, HELPER, claim, commit


def _call(ctl, out, w, x):
    return (x, np.ones(1, np.float32), np.float32(1e-5), False, w, cpu_layer._NONE, False, out, ctl)


def test_caller_takes_over_a_stalled_helpers_chunk():
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(200, 16, generator=gen), torch.randn(1, 16, generator=gen)
    ctl = cpu_split.new_ctl(cpu_layer._chunks(w.numpy()))  # 4 chunks of 64 rows
    assert claim(ctl, HELPER) == 0  # the helper claims chunk 0, then is descheduled
    out = np.full((1, 200), np.nan, np.float32)
    cpu_layer._linear(CALLER, *_call(ctl, out, w.numpy(), x.numpy()))  # returns: no waiting on the helper
    assert np.allclose(out, F.linear(x, w).numpy(), atol=1e-5)
    assert not commit(ctl, 0, HELPER)  # the helper, back: its chunk was taken over, it must not write
    assert claim(ctl, HELPER) == -1


def test_late_helper_writes_nothing():
    w, x = np.ones((130, 8), np.float32), np.ones((1, 8), np.float32)
    ctl = cpu_split.new_ctl(3)
    out = np.empty((1, 130), np.float32)
    cpu_layer._linear(CALLER, *_call(ctl, out, w, x))
    out[:] = -1.0
    cpu_layer._linear(HELPER, *_call(ctl, out, w, x))  # the call is over when the helper wakes
    assert (out == -1.0).all()


def test_helper_and_caller_share_chunks_exactly_once():
    ctl = cpu_split.new_ctl(1000)
    got = []
    c = claim(ctl, HELPER)
    while c >= 0 and len(got) < 10:
        got.append(c)
        assert commit(ctl, c, HELPER)
        cpu_split.done(ctl, c, HELPER)
        c = claim(ctl, HELPER)
    mine = []
    c = claim(ctl, CALLER)
    while c >= 0:
        mine.append(c)
        c = claim(ctl, CALLER)
    assert sorted(got + mine) == list(range(1000)) and got == list(range(10))


def test_helper_off_on_one_core(monkeypatch):
    assert cpu_split.helper(False) is None
    monkeypatch.setattr(cpu_split, "cores", lambda: 1)
    assert cpu_split.helper() is None


def test_forked_child_computes_alone():
    import multiprocessing as mp

    cpu_split.helper(True)
    ctx = mp.get_context("fork")
    with ctx.Pool(1) as pool:
        out = pool.apply(_child_head)
    assert out
    assert cpu_split.helper(True).alive


def _child_head() -> bool:
    old = cpu_split._helper
    x, w = torch.randn(1, 8), torch.randn(200, 8)
    got = cpu_layer.head(x, torch.ones(8), 1e-5, w, old)  # the parent's helper: no thread here
    fresh = cpu_split.helper(True)
    return (not old.alive) and fresh is not old and fresh.alive and torch.isfinite(got).all().item()


def _linear_job(seed: int = 1, rows: int = 640):  # (args, reference) of a 10-chunk split _linear call
    gen = torch.Generator().manual_seed(seed)
    w, x = torch.randn(rows, 32, generator=gen), torch.randn(1, 32, generator=gen)
    out = np.full((1, rows), np.nan, np.float32)
    args = _call(cpu_split.new_ctl(cpu_layer._chunks(w.numpy())), out, w.numpy(), x.numpy())
    return args, out, F.linear(x, w).numpy()


def test_post_never_blocks_on_a_held_lock():
    import threading
    import time

    h = cpu_split.Helper(start=False)  # a helper that never runs: descheduled for good
    h._sleeping = True
    held, release = threading.Event(), threading.Event()

    def hold():  # the helper's lock held by a thread that is not running
        with h._cv:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(10)
    try:
        args, out, ref = _linear_job()
        t0 = time.perf_counter()
        cpu_split.run(cpu_layer._linear, args, h)
        assert time.perf_counter() - t0 < 2.0  # blocking would wait the 10 s the lock is held
        assert h.posts == 1 and np.allclose(out, ref, atol=1e-5)
    finally:
        release.set()
        t.join()


def test_backoff_stops_posting_to_a_stalled_helper_then_probes():
    h = cpu_split.Helper(start=False)  # every post goes unserved: the helper writes no chunk
    for _ in range(h.WINDOW):
        args, out, ref = _linear_job()
        cpu_split.run(cpu_layer._linear, args, h)
        assert np.allclose(out, ref, atol=1e-5)
    assert h.posts == h.WINDOW and h.skipped == 0
    for _ in range(h.SKIP_MIN):  # the next SKIP_MIN calls are computed without a post
        cpu_split.run(cpu_layer._linear, _linear_job()[0], h)
    assert h.posts == h.WINDOW and h.skipped == h.SKIP_MIN
    for _ in range(h.WINDOW):  # then a probe window; it fails too: the skip doubles
        cpu_split.run(cpu_layer._linear, _linear_job()[0], h)
    assert h.posts == 2 * h.WINDOW and h._skip == 2 * h.SKIP_MIN


def test_backoff_keeps_posting_to_a_helper_that_helps():
    h = cpu_split.Helper(start=False)
    for _ in range(3 * h.WINDOW):
        h.post(cpu_layer._linear, ())
        h.record(3, 10)  # the helper wrote 3 of 10 chunks a call
    assert h.posts == 3 * h.WINDOW and h.skipped == 0
    for _ in range(h.WINDOW):
        assert h.post(cpu_layer._linear, ())
        h.record(0, 10)
    assert not h.post(cpu_layer._linear, ())  # a window without help: skipping


def test_result_bit_identical_with_the_live_helper():
    h = cpu_split.Helper()
    for seed in range(20):
        args, out, _ = _linear_job(seed, rows=64 * 40)
        cpu_split.run(cpu_layer._linear, args, h)
        alone = np.full_like(out, np.nan)
        a2 = args[:7] + (alone, cpu_split.new_ctl(args[-1].shape[0] - 1))
        cpu_layer._linear(CALLER, *a2)
        assert np.array_equal(out, alone)
