"""HiP rows' stable selections on the device inside the whole step (runtime/whole_stable.py).

References: after every step, each (layer, slot) buffer that the host records as holding a
row's last mask equals the host tier's K/V rows of that mask (read back and compared); a
layer whose last stage did not refresh leaves its buffer bit-identical, and rows past a
copy's count are never written (poisoned with NaN, checked); tokens equal each session
stepped alone, also with the fresh-row bound forced to 0 (every row read all in place, the
engine saying why). CPU: Triton through the interpreter."""

from __future__ import annotations

import pytest
import torch
from test_whole_step import HIP_HOST, LOGIT_TOL, _fed, _greedy_alone, _hip_state, _rel

from kvloft import Engine, load_model
from kvloft.runtime import whole_stable

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8  # four refreshes of the last stage (refresh_steps (4, 2)), staggered per layer


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _host_rows(be, layer, ids):
    """K, V [len(ids), H_kv, D] of host rows `ids` of one layer (the host tier's chunks)."""
    parts = list(be.cache.layers[layer].host_chunk_pairs())
    k = torch.cat([kc for _, kc, _ in parts])
    v = torch.cat([vc for _, _, vc in parts])
    return k[ids], v[ids]


def test_stable_buffers_hold_the_current_masks_and_rewrite_only_on_refresh(tiny):
    """One HiP row (keys read in place, 74+ host rows over a budget of 24), 8 whole steps."""
    alone, row = _fed(tiny, 110, 0, HIP_HOST), _fed(tiny, 110, 0, HIP_HOST)
    want = _greedy_alone(alone, STEPS)
    eng = Engine(tiny, graphs="whole")
    be, nl = row.backend, tiny.config.n_layers
    toks, held, stable_steps, tok = [], 0, 0, int(row.last_logits.argmax())
    for _ in range(STEPS):
        plan = eng.plan([(row, tok)])
        flags = [be.retriever.refresh_schedule(layer, be.rcfg.budget, int(plan.n_host[0]))[-1] for layer in range(nl)]
        stable = next(iter(eng._wholes.values())).exact.stable if eng._wholes else None
        before = None
        if stable is not None:
            for layer in range(nl):  # poison every slab past its mask's rows
                m = be.retriever.state[layer].masks[-1]
                n = 0 if m is None else min(m.numel(), stable.width)
                with torch.inference_mode():
                    stable.k[layer, 0, n:] = float("nan")
            before = stable.k.clone(), stable.v.clone()
        toks.append(tok)
        tok = int(eng.step([(row, tok)])[0].argmax())
        ex = next(iter(eng._wholes.values())).exact
        stable_steps += eng.last_read_why is None
        for layer in range(nl):
            st = be.retriever.state[layer]
            n = min(st.masks[-1].numel(), ex.stable.width)
            if not flags[layer] and before is not None:  # no refresh: the slab is untouched
                assert torch.equal(ex.stable.k[layer, 0].nan_to_num(7), before[0][layer, 0].nan_to_num(7))
                assert torch.equal(ex.stable.v[layer, 0].nan_to_num(7), before[1][layer, 0].nan_to_num(7))
            if flags[layer]:  # refreshed: it holds the new mask (and nothing past it was written)
                assert ex.stable.holds(0, layer, st)
                if before is not None:
                    assert torch.equal(ex.stable.k[layer, 0, n:].nan_to_num(7), before[0][layer, 0, n:].nan_to_num(7))
            if ex.stable.holds(0, layer, st):
                held += 1
                k, v = _host_rows(be, layer, st.masks[-1][:n].cpu())
                assert torch.equal(ex.stable.k[layer, 0, :n], k) and torch.equal(ex.stable.v[layer, 0, :n], v)
        assert int(ex.stable_meta[0][0, 4]) > 0 or eng.last_read_why is not None
    assert toks == want
    cfg = tiny.config  # the buffers' bytes: L x B x width x H_kv x D x 2 x itemsize (fp32)
    assert ex.stable.nbytes == nl * 1 * ex.stable.width * cfg.n_kv_heads * cfg.head_dim * 2 * 4
    assert held >= STEPS * nl - nl and stable_steps >= STEPS - 2  # the buffers served nearly every step
    assert _hip_state(row) == _hip_state(alone) and _rel(row.last_logits, alone.last_logits) < LOGIT_TOL


def test_fresh_rows_over_the_bound_read_the_selection_in_place(tiny, monkeypatch):
    """The bound forced to 0: every step with fresh rows reads its whole selection from the host
    tier (n_stable 0, the engine says why), tokens still those of the session alone."""
    monkeypatch.setattr(whole_stable, "FRESH_BOUND", 0)
    alone, row = _fed(tiny, 110, 0, HIP_HOST), _fed(tiny, 110, 0, HIP_HOST)
    want = _greedy_alone(alone, 4)
    eng = Engine(tiny, graphs="whole")
    whys, toks, tok = [], [], int(row.last_logits.argmax())
    for _ in range(4):
        toks.append(tok)
        tok = int(eng.step([(row, tok)])[0].argmax())
        whys.append(eng.last_read_why)
    assert toks == want and eng.route_counts["whole"] == 4 and eng.last_route_why is None
    assert sum(w is not None and "over the bound of 0" in w for w in whys) >= 2, whys
    assert _rel(row.last_logits, alone.last_logits) < LOGIT_TOL


def test_whole_steps_of_one_bucket_share_their_stable_buffers(tiny):
    """Two HiP shapes of one bucket and width (the capacity grew) share one set of stable
    buffers; another width or bucket keeps its own."""
    from kvloft.runtime.whole_hip import HipShape
    from kvloft.runtime.whole_step import WholeStep

    def step(batch, cap, width):
        return WholeStep(tiny.net, capture=False, batch=batch,
                         shape=HipShape(cap, width, cap // 64, cap // 64, (16, 4), (48, 24), "first"))

    a, b, c, d = step(2, 256, 32), step(2, 512, 32), step(2, 512, 64), step(1, 512, 32)
    assert b.share_buffers(a) and b.exact.stable is a.exact.stable
    assert not c.share_buffers(a) and not d.share_buffers(a) and c.exact.stable is not a.exact.stable
    assert a.buffer_bytes == a._flat.numel() * 8 + a.exact.masks.numel() * 8  # nothing allocated yet
    assert a.z_buffers is None  # no rank="z" row in these shapes


def test_whole_steps_of_one_bucket_share_their_z_statistics_buffers(tiny):
    """rank="z" steps of one bucket share one set of statistics buffers whatever their capacity or
    width; another bucket keeps its own; the set is counted in buffer_bytes once allocated."""
    from kvloft.runtime.whole_hip import HipShape
    from kvloft.runtime.whole_step import WholeStep

    def step(batch, cap, width):
        return WholeStep(tiny.net, capture=False, batch=batch,
                         shape=HipShape(cap, width, cap // 64, cap // 64, (16, 4), (48, 24), "first", True))

    a, b, c = step(2, 256, 32), step(2, 512, 64), step(1, 512, 32)
    b.share_buffers(a)
    c.share_buffers(a)
    assert b.z_buffers is a.z_buffers and c.z_buffers is not a.z_buffers
    before = a.buffer_bytes
    a.z_buffers.allocate(torch.empty(1, tiny.config.n_kv_heads, tiny.config.head_dim))
    cfg = tiny.config
    assert a.buffer_bytes - before == a.z_buffers.nbytes == 8 * cfg.n_layers * 2 * cfg.n_kv_heads * (
        cfg.head_dim**2 + cfg.head_dim)
