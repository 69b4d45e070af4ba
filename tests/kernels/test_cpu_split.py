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
