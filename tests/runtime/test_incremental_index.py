"""An index that builds incrementally (attention_graph) is fed prefill chunk by chunk.

The session's first feed hands each chunk's new host rows and sampled queries to
retriever.extend() (IndexBook.feed); no build() runs after prefill. The graph then holds the
host tier's keys row for row, every row reachable, and with a search pool covering every
key its selections (hence the logits) equal the exact retriever's. A feed that fails after
rows were fed is rolled back and the layer is built whole at the end of the next feed.
"""

from __future__ import annotations

import pytest
import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _prompt(tiny, n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, tiny.config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def _session(tiny, method: str, **options) -> Session:
    rcfg = RetrievalConfig(method=method, budget=40, n_sink=8, n_window=32, options=options)
    return Session(tiny, rcfg, RuntimeConfig(prefill_chunk=64, progress=False))


def _spy(s: Session) -> dict[str, list[int]]:
    """Counts the retriever's build and extend calls per layer (the calls still run)."""
    r, calls = s.backend.retriever, {"build": [], "extend": []}
    for name in calls:
        real = getattr(r, name)

        def wrapped(layer, *args, _real=real, _name=name):
            calls[_name].append(layer)
            return _real(layer, *args)

        setattr(r, name, wrapped)
    return calls


def _graph_holds_host_tier(s: Session) -> None:
    for layer in range(s.model.config.n_layers):
        keys = s.backend.index_keys(layer)  # [H_kv, N, D]
        for h, g in enumerate(s.backend.retriever.graphs[layer]):
            assert g.n == keys.shape[1] > 200
            assert g.reachable() == g.n
            torch.testing.assert_close(torch.from_numpy(g.keys[: g.n]), keys[h].float(), rtol=0, atol=0)


def _logits(s: Session, prompt: torch.Tensor, steps: list[int]) -> torch.Tensor:
    s.feed(prompt)
    return torch.stack([s.step(t).clone() for t in steps])


def test_prefill_feeds_the_graph_chunk_by_chunk(tiny):
    s = _session(tiny, "attention_graph")
    calls = _spy(s)
    s.feed(_prompt(tiny, 300, 0))  # 5 chunks of 64; 40 tokens stay static, 24 reach the host tier in chunk 0
    assert calls["build"] == []
    assert calls["extend"] == list(range(tiny.config.n_layers)) * 5
    _graph_holds_host_tier(s)
    assert s.backend.retriever.stats()["graph_s"] > 0


@pytest.mark.parametrize("incremental", [True, False])
def test_pool_covering_every_key_equals_exact(tiny, incremental):
    # ef above the host tier: each search scores every key, so the graph's top-40 is exact's
    prompt, steps = _prompt(tiny, 300, 1), [3, 1, 4, 1, 5]
    want = _logits(_session(tiny, "exact"), prompt, steps)
    s = _session(tiny, "attention_graph", ef=10_000, incremental=incremental)
    calls = _spy(s)
    got = _logits(s, prompt, steps)
    assert bool(calls["extend"]) == incremental and bool(calls["build"]) != incremental
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_failed_feed_rolls_back_and_builds_whole(tiny):
    prompt, steps = _prompt(tiny, 300, 2), [2, 7, 1]
    s = _session(tiny, "attention_graph", ef=10_000)
    r = s.backend.retriever
    real, seen = r.extend, []

    def failing(layer, keys, queries):
        seen.append(layer)
        if len(seen) == 2:  # layer 1 of the first chunk: layer 0 was fed it
            raise RuntimeError("extend failed")
        return real(layer, keys, queries)

    r.extend = failing
    with pytest.raises(RuntimeError, match="extend failed"):
        s.feed(prompt)
    assert len(s.tokens) == 0 and s.backend.indexes.stale == {0}
    r.extend = real
    calls = _spy(s)
    got = _logits(s, prompt, steps)
    assert calls["build"] == [0] and 0 not in calls["extend"] and 1 in calls["extend"]
    _graph_holds_host_tier(s)
    want = _logits(_session(tiny, "exact"), prompt, steps)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
