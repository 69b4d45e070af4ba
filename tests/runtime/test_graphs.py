"""Decode steps cut into graph segments (runtime/graphs.py) against Transformer.forward."""

import pytest
import torch

from kvloft import RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.runtime.graphs import DecodeGraphs


def _steps(session: Session, tokens: list[int]) -> torch.Tensor:
    return torch.stack([session.step(t).cpu() for t in tokens])  # [n, V]


@pytest.mark.parametrize("method", ["dense", "exact"])
def test_segmented_step_equals_forward(method):
    """Eager segments (the CPU path of the graphs) give forward()'s logits bit for bit, and
    leave the backend in the same state (the continuation agrees too)."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=3)
    rcfg = RetrievalConfig(method=method, budget=16, n_sink=4, n_window=8)
    prompt = torch.randint(1, model.config.vocab_size, (48,)).tolist()
    ref, seg = (Session(model, rcfg, RuntimeConfig(progress=False)) for _ in range(2))
    for s in (ref, seg):
        s.feed(prompt)
    graphs = DecodeGraphs(model.net, capture=False)
    seg.backend.decoding = True  # as Session.step sets it
    tokens = [5, 9, 11, 2, 7]
    want = _steps(ref, tokens)
    got = []
    for i, t in enumerate(tokens):
        pos = torch.tensor([len(prompt) + i])
        got.append(graphs.step(torch.tensor([t]), pos, seg.backend)[0].clone())
        seg.tokens.append(t)
    assert torch.equal(torch.stack(got), want)
    assert torch.equal(seg.step(3), ref.step(3))  # backends advanced alike


def test_capture_needs_cuda():
    model = load_model("tiny", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="capture=False"):
        DecodeGraphs(model.net, capture=True)


def test_cuda_graphs_flag_is_checked():
    with pytest.raises(TypeError, match="cuda_graphs"):
        RuntimeConfig(cuda_graphs="yes")


@pytest.mark.gpu
def test_failed_capture_falls_back_to_eager_steps(caplog):
    """A segment that cannot be captured (a host read inside it) leaves the step correct, eager."""
    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=3)
    s = Session(model, RetrievalConfig(method="dense"), RuntimeConfig(progress=False, cuda_graphs=False))
    s.feed(list(range(1, 40)))
    s.backend.decoding = True
    pos = torch.tensor([39], device="cuda")
    want = DecodeGraphs(model.net, capture=False).step(torch.tensor([5], device="cuda"), pos, s.backend).clone()
    graphs = DecodeGraphs(model.net, capture=True)
    first = graphs._segments[0]
    graphs._segments[0] = lambda: (first()[0].sum().item(), *first()) [1:]  # .item(): illegal in a capture
    s2 = Session(model, RetrievalConfig(method="dense"), RuntimeConfig(progress=False, cuda_graphs=False))
    s2.feed(list(range(1, 40)))
    s2.backend.decoding = True
    got = graphs.step(torch.tensor([5], device="cuda"), pos, s2.backend)
    assert not graphs.capture and not graphs._graphs
    assert "capture of the decode step failed" in caplog.text
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["dense", "exact", "hip", "hip:keys_on=host"])
def test_graphed_decode_matches_eager_on_cuda(method):
    """Graph replays give the eager step's logits (bf16, real kernels), step after step."""
    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=3)
    name, _, opt = method.partition(":")
    options = dict([opt.split("=")]) if opt else {}
    rcfg = RetrievalConfig(method=name, budget=64, n_sink=4, n_window=16, options=options)
    prompt = torch.randint(1, model.config.vocab_size, (300,)).tolist()
    runs = {}
    for graphs in (False, True):
        s = Session(model, rcfg, RuntimeConfig(progress=False, cuda_graphs=graphs))
        s.feed(prompt)
        runs[graphs] = _steps(s, list(range(1, 13)))
        assert (s._graphs is not None) == graphs
    torch.testing.assert_close(runs[True], runs[False], atol=2e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["exact", "hip:keys_on=host"])
def test_covering_budget_reads_rows_still_copying_down(method):
    """Every decode step evicts a row to pinned host memory asynchronously and a covering
    budget reads it in the same layer (zero-copy kernel, ordered by a stream wait, not a
    host sync): the logits stay dense attention's."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=4)
    name, _, opt = method.partition(":")
    options = dict([opt.split("=")]) if opt else {}
    prompt = torch.randint(1, model.config.vocab_size, (200,)).tolist()
    runs = {}
    for m in ("dense", name):
        rcfg = RetrievalConfig(method=m, budget=4096, n_sink=4, n_window=16,
                               options=options if m == name else {})
        s = Session(model, rcfg, RuntimeConfig(progress=False))
        s.feed(prompt)
        runs[m] = _steps(s, list(range(1, 17)))
    torch.testing.assert_close(runs[name], runs["dense"], atol=2e-3, rtol=0)
