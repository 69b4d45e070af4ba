"""The CPU decode route (runtime/exact_decode.py, kernels/cpu_decode.py): the static tier and the
selection in one softmax, the selected logits read from the exact search over the host tier in
place (with the group-max ranking: one compiled pass, runtime/batch_host.py), against the route
it replaces (static and retrieved partials merged, keys gathered)."""

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.runtime import batch_host, exact_decode


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=7)


def _run(model, rcfg, fused: bool, prompt, steps):
    s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False), CacheConfig(host_chunk_tokens=96))
    s.backend.fused_cpu = fused
    s.feed(prompt)
    return torch.stack([s.step(int(t)).clone() for t in steps]), s


@pytest.mark.parametrize("options,max_similar", [
    ({}, 0),                        # the host tier searched in place: logits handed over
    ({"keys_on": "device"}, 0),     # a copy of the keys: the selected keys gathered
    ({"rank": "prob"}, 0),          # ranked by probability, logits still handed over
    ({}, 2),                        # capped top-k: -1 pads in the selection
])
def test_one_softmax_equals_merged_partials(tiny, monkeypatch, options, max_similar):
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, tiny.config.vocab_size, (330,), generator=g)
    steps = torch.randint(0, tiny.config.vocab_size, (6,), generator=g)
    rcfg = RetrievalConfig(method="exact", budget=40, n_sink=4, n_window=32, options=options,
                           max_similar=max_similar)
    seen = []
    real = exact_decode.select_attend

    def spy(*a, **k):
        seen.append((k["logits"] is not None, k["padded"], len(a[3])))
        return real(*a, **k)

    monkeypatch.setattr(exact_decode, "select_attend", spy)
    passes = []
    real_group = batch_host._run_group
    monkeypatch.setattr(batch_host, "_run_group", lambda rows: passes.append(len(rows)) or real_group(rows))
    fused, s = _run(tiny, rcfg, True, prompt, steps)
    merged, _ = _run(tiny, rcfg, False, prompt, steps)
    torch.testing.assert_close(fused, merged, rtol=1e-5, atol=1e-5)
    with_logits = "keys_on" not in options
    in_place = with_logits and options.get("rank") != "prob" and not max_similar  # runtime/batch_host.py
    assert len(seen) + len(passes) == len(steps) * tiny.config.n_layers
    assert passes == [1] * len(passes) and bool(passes) == in_place and bool(seen) != in_place
    assert {x[0] for x in seen} <= {with_logits} and {x[1] for x in seen} <= {max_similar > 0}
    assert {x[2] for x in seen} <= {4}  # 294 host rows in chunks of 96
    assert (s.backend.attached == set(range(tiny.config.n_layers))) == with_logits
    if with_logits:
        assert not s.backend.retriever.keys  # no second copy of the host keys


def test_covering_budget_equals_dense(tiny):
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, tiny.config.vocab_size, (250,), generator=g)
    steps = torch.randint(0, tiny.config.vocab_size, (8,), generator=g)
    rcfg = RetrievalConfig(method="exact", budget=10_000, n_sink=4, n_window=32)
    got, _ = _run(tiny, rcfg, True, prompt, steps)
    dense, _ = _run(tiny, RetrievalConfig(method="dense"), True, prompt, steps)
    err = (got.double() - dense.double()).norm() / dense.double().norm()
    assert err < 1e-5, err


def test_keys_on_host_refused_off_the_cpu():
    from kvloft.config import ModelConfig
    from kvloft.index.base import make_retriever

    with pytest.raises(ValueError, match="keys_on"):
        make_retriever(RetrievalConfig(method="exact", options={"keys_on": "disk"}), ModelConfig.from_name("tiny"), "cpu")
    with pytest.raises(ValueError, match="keys_on"):
        make_retriever(RetrievalConfig(method="exact", options={"keys_on": "host"}), ModelConfig.from_name("tiny"),
                       "meta")
