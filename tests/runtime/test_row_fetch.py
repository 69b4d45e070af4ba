"""The decode path's pluggable row source (scheduler/fetch.py RowFetch): a fetch plugged into a
TieredAttention gets every decode step's search and retrieved attention, and one that hands
back the in-place partials yields the default's logits exactly (same kernels, same merge)."""

import pytest
import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.host_rows import InPlaceRows
from kvloft.scheduler.fetch import Retrieved

STEPS = 3


class RecordingFetch:
    """Delegates to InPlaceRows, recording what each call got."""

    def __init__(self, inner: InPlaceRows) -> None:
        self.inner, self.starts, self.budgets, self.resets = inner, [], [], 0

    def start(self, layer, tiers, q, evicted, budget, index_add):
        self.starts.append((layer, evicted is not None, index_add))
        self.q_shape = tuple(q.shape)
        return self.inner.start(layer, tiers, q, evicted, budget, index_add)

    def attend(self, layer, tiers, q, budget, pending) -> Retrieved:
        self.budgets.append(budget)
        got = self.inner.attend(layer, tiers, q, budget, pending)
        assert len(got.outs) == len(got.lses) == (1 if budget else 0)
        return got

    def reset(self):
        self.resets += 1

    def bytes(self):
        return {"recorded": 0}

    def close(self):
        pass


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _decode(model, rcfg, plug: bool, fused_cpu: bool = True):
    g = torch.Generator().manual_seed(1)
    prompt, steps = torch.randint(0, 512, (150,), generator=g), torch.randint(0, 512, (STEPS,), generator=g)
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False))
    s.backend.fused_cpu = fused_cpu
    s.feed(prompt)
    fetch = None
    if plug:
        fetch = s.backend.fetch = RecordingFetch(s.backend.host_rows)
    return torch.stack([s.step(int(t)).clone() for t in steps]), s, fetch


@pytest.mark.parametrize("budget", [0, 16])
def test_plugged_fetch_serves_every_decode_step(tiny, budget):
    # the index keeps its own copy of the keys, so that every evicted row is added through the fetch
    rcfg = RetrievalConfig(method="exact", budget=budget, n_sink=4, n_window=32, options={"keys_on": "device"})
    want, base, _ = _decode(tiny, rcfg, plug=False, fused_cpu=False)  # static + retrieved partials, merged
    got, s, fetch = _decode(tiny, rcfg, plug=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    fused, _, _ = _decode(tiny, rcfg, plug=False)  # the default CPU route: one softmax
    torch.testing.assert_close(fused, want, rtol=1e-5, atol=1e-5)
    n_layers = tiny.config.n_layers
    assert [layer for layer, _, _ in fetch.starts] == list(range(n_layers)) * STEPS
    assert all(ev and index_add for _, ev, index_add in fetch.starts)  # one token leaves the window per step
    assert fetch.budgets == [budget] * (STEPS * n_layers)
    assert fetch.q_shape == (tiny.config.n_heads, tiny.config.head_dim)  # q [H_q, D]
    assert s.backend.scanned == base.backend.scanned and s.stats()["bytes"]["recorded"] == 0
    mark = s.backend.mark()
    s.backend.rollback(mark)
    assert fetch.resets == 1


def test_default_fetch_reads_rows_in_place(tiny):
    s = Session(tiny, RetrievalConfig(method="exact", budget=8), RuntimeConfig(progress=False))
    assert isinstance(s.backend, TieredAttention) and s.backend.fetch is s.backend.host_rows


def test_a_swapped_retriever_reaches_every_room(tiny):
    """Setting backend.retriever (eval's counting wrapper does) is what every decode step then calls."""
    from kvloft import RetrievalConfig, RuntimeConfig, Session

    s = Session(tiny, RetrievalConfig(method="exact", budget=8, n_sink=4, n_window=8),
                RuntimeConfig(progress=False, kernels="reference"))
    s.feed(list(range(1, 60)))
    calls = []
    inner = s.backend.retriever

    class Counting:
        def __getattr__(self, name):
            return getattr(inner, name)

        def select(self, layer, q, budget):
            calls.append(layer)
            return inner.select(layer, q, budget)

    s.backend.retriever = Counting()
    s.step(3)
    assert sorted(calls) == list(range(tiny.config.n_layers))
