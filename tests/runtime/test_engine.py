"""The batched decode engine: B sessions in one forward pass equal each session decoded alone.

Greedy tokens token for token, logits to fp32 rounding (batched projections block their GEMMs
differently from one-row ones), stats and tier state exactly; sessions joining and leaving;
a failed step rolls every session back; the step plan against what the tiers then hold."""

import copy
import dataclasses
from contextlib import contextmanager

import pytest
import torch
from torch import Tensor

from kvloft import CacheConfig, Engine, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.kernels import kernel_set
from kvloft.runtime.graphs import DecodeGraphs
from kvloft.runtime.numerics import NonFiniteError
from kvloft.runtime.step_plan import decode_append

RUNTIME = RuntimeConfig(prefill_chunk=256, progress=False)
HIP = {"chunk_sizes": [16, 4], "kept_tokens": [64, 24], "refresh_steps": [4, 2], "chunk_rows": 64}
CONFIGS = {
    "dense": RetrievalConfig(method="dense"),
    "exact": RetrievalConfig(method="exact", budget=24, n_sink=4, n_window=32),
    "hip": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options=HIP),
    # the host tier searched in place (attach_host_tier): one search key with "hip" on the CPU
    "hip-host": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options={**HIP, "keys_on": "host"}),
    # and with the Triton stage kernels (interpreted on the CPU): 8-bit tiers' codes read in place
    "hip-host-triton": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32,
                                       options={**HIP, "keys_on": "host", "kernel": "triton"}),
    # z-scored logits (HiP's rank="z"): searched in one select_batch with logit rows
    "hip-z": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options={**HIP, "rank": "z"}),
    "hip-z-host": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32,
                                  options={**HIP, "rank": "z", "keys_on": "host"}),
    # a mask per KV head (heads="kv"): ids [H_kv, k], searched alone (search_key() None)
    "hip-kv": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options={**HIP, "heads": "kv"}),
    # stage 2 scores every row of its chunks (scan_stages): searched with rows of its own scan_stages
    "hip-scan": RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options={**HIP, "scan_stages": [1]}),
    "tokenselect": RetrievalConfig(method="tokenselect", budget=24, n_sink=4, n_window=32),
    "recycled": RetrievalConfig(method="recycled", budget=24, n_sink=4, n_window=32, options={"stride": 3}),
    # extrapolate mode: select() is asked for budget // (2 * neighbor_radius + 1) keys
    "hip-extrapolate": RetrievalConfig(method="hip", budget=40, n_sink=4, n_window=32, position_mode="extrapolate",
                                       neighbor_radius=1, options=HIP),
}
LOGIT_TOL = 1e-5  # relative (norm) error of a batched step's logits against the same step alone
POISON = 7  # a token id whose embedding row is made NaN


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _prompt(n, seed):
    return torch.randint(8, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _session(model, method, n, seed, evict_batch=0, host_dtype=None):
    cache = CacheConfig(host_chunk_tokens=64, evict_batch=evict_batch, host_dtype=host_dtype)
    s = Session(model, CONFIGS[method], RUNTIME, cache)
    s.feed(_prompt(n, seed))
    return s


def _count_launches(monkeypatch) -> dict:
    """Counts attention launches from here on: {"batched": [rows of each shared launch], "row":
    launches of one row's own}."""
    from kvloft.kernels import batched_decode, sparse_decode

    calls = {"batched": [], "row": 0}
    real_batched, real_row = batched_decode.gather_attend_table_batched, sparse_decode.gather_attend_table

    def spy_batched(q, *args, **kw):
        calls["batched"].append(q.shape[0])
        return real_batched(q, *args, **kw)

    def spy_row(*args, **kw):
        calls["row"] += 1
        return real_row(*args, **kw)

    monkeypatch.setattr(batched_decode, "gather_attend_table_batched", spy_batched)
    monkeypatch.setattr(sparse_decode, "gather_attend_table", spy_row)
    return calls


def _count_searches(monkeypatch) -> dict:
    """Counts HiP searches from here on: {"batched": [rows of each select_batch], "row": select()
    calls (a row searching alone)}."""
    from kvloft.index.hip import HipRetriever

    calls = {"batched": [], "row": 0}
    real_batch, real_row = HipRetriever.select_batch.__func__, HipRetriever.select

    def spy_batch(cls, retrievers, *args, **kw):
        calls["batched"].append(len(retrievers))
        return real_batch(cls, retrievers, *args, **kw)

    def spy_row(self, *args, **kw):
        calls["row"] += 1
        return real_row(self, *args, **kw)

    monkeypatch.setattr(HipRetriever, "select_batch", classmethod(spy_batch))
    monkeypatch.setattr(HipRetriever, "select", spy_row)
    return calls


def _twins(model, specs, tmp_path):
    """Two identical sets of fed sessions, one per (method, prompt length[, host_dtype]) in specs:
    each fed once and its twin restored from a save (kvloft.runtime.persist), which is cheaper
    than a second prefill and holds the same tiers, index state and counters."""
    first, second = [], []
    for seed, (method, n, *host_dtype) in enumerate(specs):
        s = _session(model, method, n, seed, host_dtype=host_dtype[0] if host_dtype else None)
        s.save(tmp_path / f"twin{seed}")
        first.append(s)
        second.append(Session.load(tmp_path / f"twin{seed}", model, runtime=RUNTIME))
    assert [_state(s) for s in first] == [_state(s) for s in second]
    return first, second


def _state(s: Session):
    """Everything a step changes, timings aside: tokens, counters, tiers, retriever state."""
    st = copy.deepcopy(s.stats())
    st.pop("timings_s")
    st.pop("decode_ms_per_tok", None)
    st.pop("prefill_tok_per_s", None)
    mark = s._mark()["backend"]
    layers = mark if isinstance(mark, int) else [{k: v for k, v in m.items() if k != "summary"}
                                                 for m in mark["layers"]]
    return s.tokens[:], s._times["decode_tokens"], st, layers


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _greedy_alone(s: Session, n: int) -> list[int]:
    out = []
    for _ in range(n):
        t = int(s.last_logits.argmax())
        s.step(t)
        out.append(t)
    return out


@pytest.mark.parametrize("specs", [
    [("dense", 300), ("exact", 700), ("hip", 1100)],
    [("tokenselect", 300), ("exact", 700), ("dense", 1100)],
], ids=["dense-exact-hip", "tokenselect-exact-dense"])
def test_batched_decode_equals_each_session_alone(tiny, specs, tmp_path):
    alone, batched = _twins(tiny, specs, tmp_path)
    assert all(s.stats()["tier_tokens"]["host"] > 200 for s in batched if s.retrieval.method != "dense")
    want = [_greedy_alone(s, 8) for s in alone]
    got = Engine(tiny).generate(batched, max_new_tokens=8, stop_at_eos=False)
    assert got == want
    # teacher-forced steps: each batched row's logits against the same step alone
    for step in range(4):
        toks = [(step * 37 + 11 * b) % 512 for b in range(len(specs))]
        logits = Engine(tiny).step(list(zip(batched, toks, strict=True)))
        assert logits.shape == (len(specs), tiny.config.vocab_size) and logits.dtype == torch.float32
        for b, (s, t) in enumerate(zip(alone, toks, strict=True)):
            ref = s.step(t)
            assert _rel(logits[b], ref) < LOGIT_TOL, (step, b, _rel(logits[b], ref))
            assert torch.equal(batched[b].last_logits, logits[b])
    for a, b in zip(alone, batched, strict=True):
        assert _state(b) == _state(a)


def test_sessions_on_the_overlap_scheduler_batch_like_alone(tiny):
    """ScheduledAttention (scheduler/overlap.py: GPU row cache, planned fetches) is a session's
    decode route too: rows through it equal the same sessions stepped alone."""
    rt = RuntimeConfig(prefill_chunk=256, progress=False, scheduler="overlap")
    cache = CacheConfig(host_chunk_tokens=64)
    twins = []
    for _ in range(2):
        pair = [Session(tiny, CONFIGS["exact"], rt, cache), Session(tiny, CONFIGS["hip"], rt, cache)]
        for seed, (s, n) in enumerate(zip(pair, (300, 420), strict=True)):
            s.feed(_prompt(n, seed))
        twins.append(pair)
    alone, batched = twins
    assert type(batched[0].backend).__name__ == "ScheduledAttention"
    assert Engine(tiny).generate(batched, 6, stop_at_eos=False) == [_greedy_alone(s, 6) for s in alone]
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)


def _one_launch_route(sessions):
    """Decode as a CUDA session's would, on the CPU: Triton kernels (interpreted) reading the
    host chunks in place, so exact and hip rows take the one-launch route (runtime/rowspace.py)."""
    for s in sessions:
        if s.retrieval.method != "dense":
            s.backend.ops = kernel_set("triton", "cpu")
            for t in s.backend.cache.layers:
                t._host_k.pin = t._host_v.pin = True


def test_one_launch_rows_share_one_launch_per_layer_and_equal_alone(tiny, monkeypatch, tmp_path):
    """Three one-launch rows of different lengths (exact, hip, exact) and a dense row: the
    batched step runs the three in ONE launch per layer (gather_attend_table_batched, no
    per-row launch) and every session equals its own steps alone: 2 greedy tokens, logits to fp32
    rounding, counters, tiers, HiP's state and the selection-cache fills, layer by layer."""
    specs = [("exact", 300), ("hip", 410), ("dense", 120), ("exact", 200)]
    alone, batched = _twins(tiny, specs, tmp_path)
    # host chunks of 64 rows: each last chunk has room for the 4 steps' rows (a chunk can't be
    # allocated pinned on the CPU)
    assert all(0 < s.backend.cache[0].n_host % 64 <= 64 - 4 for s in batched if s.retrieval.method != "dense")
    _one_launch_route(alone + batched)
    want = [_greedy_alone(s, 2) for s in alone]
    calls = _count_launches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=2, stop_at_eos=False)
    assert got == want
    assert calls == {"batched": [3] * (2 * tiny.config.n_layers), "row": 0}  # 2 steps x layers, 3 rows each
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        if a.retrieval.method != "dense":
            assert sorted(b.backend._spaces) == list(range(tiny.config.n_layers))
            assert [sp.fills for sp in b.backend._spaces.values()] == [sp.fills for sp in a.backend._spaces.values()]
            assert b.backend.timers.seconds["attention"] > 0
    assert batched[1].backend._spaces[0].fills > 0  # hip's stable rows read from the device cache
    # one one-launch row (and a dense one): a group of one runs the row's own launch
    calls["batched"].clear()
    Engine(tiny).step([(batched[0], 5), (batched[2], 6)])
    assert calls == {"batched": [], "row": tiny.config.n_layers}
    Engine(tiny, shared_attention=False).step([(s, 7) for s in batched])  # the per-row path, on request
    assert calls == {"batched": [], "row": 4 * tiny.config.n_layers}


def test_cpu_exact_rows_share_one_host_pass_per_layer_and_equal_alone(tiny, monkeypatch, tmp_path):
    """Exact rows searching their host tiers in place on the CPU (runtime/batch_host.py) make ONE
    compiled call per layer for all of them, and every session equals its own steps alone; a row
    the call reports as not ranked (a NaN score) takes its own route, with the same result."""
    from kvloft.runtime import batch_host

    specs = [("exact", 300), ("dense", 120), ("exact", 410), ("exact", 200)]
    alone, batched = _twins(tiny, specs, tmp_path)
    want = [_greedy_alone(s, 4) for s in alone]
    groups = []
    real = batch_host._run_group
    monkeypatch.setattr(batch_host, "_run_group", lambda rows: groups.append(len(rows)) or real(rows))
    assert Engine(tiny).generate(batched, max_new_tokens=4, stop_at_eos=False) == want
    assert groups == [3] * (4 * tiny.config.n_layers)
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)

    def not_ranked(rows):  # row 0 of each call as if its scores held a NaN
        out, ids, ok = real(rows)
        ok[0] = False
        return out, ids, ok

    monkeypatch.setattr(batch_host, "_run_group", not_ranked)
    toks = [5, 6, 7, 8]
    logits = Engine(tiny).step(list(zip(batched, toks, strict=True)))
    for b, (s, t) in enumerate(zip(alone, toks, strict=True)):
        assert _rel(logits[b], s.step(t)) < LOGIT_TOL
        assert _state(batched[b]) == _state(s)


def test_hip_rows_search_together_and_equal_alone(tiny, monkeypatch, tmp_path):
    """Four HiP rows of three lengths (one with fewer host rows than the budget, one searching its
    host tier in place, one a step ahead in its refresh cycle), an exact and a dense row, on the
    CPU route: ONE select_batch per layer for the four (none alone), and every session equals
    its own steps alone: greedy tokens, logits to fp32 rounding, counters, tiers, HiP's state."""
    specs = [("hip", 1100), ("exact", 300), ("hip", 50), ("dense", 120), ("hip-host", 410), ("hip", 700)]
    alone, batched = _twins(tiny, specs, tmp_path)
    assert batched[2].backend.cache[0].n_host < batched[2].retrieval.budget
    assert batched[4].backend.retriever.tiers  # searched in place
    for s in (alone[5], batched[5]):
        s.step(9)  # a step ahead: its stages refresh at other steps than the others'
    plan = Engine(tiny).plan([(s, 1) for s in batched])
    assert plan.search_groups == [[0, 2, 4, 5]]
    want = [_greedy_alone(s, 6) for s in alone]
    calls = _count_searches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=6, stop_at_eos=False)
    assert got == want
    assert calls == {"batched": [4] * (6 * tiny.config.n_layers), "row": 0}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        if a.retrieval.method == "hip":
            _same_retriever_state(a, b)
            assert b.backend.timers.seconds["search"] > 0
    # searching alone, on request: one select() per row and layer
    calls["batched"].clear()
    Engine(tiny, shared_search=False).step([(s, 7) for s in batched])
    assert calls == {"batched": [], "row": 4 * tiny.config.n_layers}


def test_z_rank_hip_rows_search_together_and_equal_alone(tiny, monkeypatch, tmp_path):
    """rank='z' HiP rows (one under the budget, one searching its host tier in place, its key
    statistics made from the tier's rows) and a logit HiP row on the CPU route: ONE select_batch
    per layer for the four, and every session equals its own steps alone: greedy tokens, logits
    to fp32 rounding, counters, tiers, HiP's state."""
    specs = [("hip-z", 1100), ("hip", 700), ("hip-z", 50), ("dense", 120), ("hip-z-host", 410)]
    alone, batched = _twins(tiny, specs, tmp_path)
    assert batched[4].backend.retriever.tiers
    plan = Engine(tiny).plan([(s, 1) for s in batched])
    assert plan.search_groups == [[0, 1, 2, 4]]
    want = [_greedy_alone(s, 5) for s in alone]
    calls = _count_searches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=5, stop_at_eos=False)
    assert got == want
    assert calls == {"batched": [4] * (5 * tiny.config.n_layers), "row": 0}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        if a.retrieval.method == "hip":
            _same_retriever_state(a, b)
    assert all(len(s.backend.retriever.moments) == tiny.config.n_layers for s in (batched[0], batched[4]))


def test_per_head_hip_row_searches_alone_and_equals_alone(tiny, monkeypatch, tmp_path):
    """A heads='kv' HiP row next to two shared-mask HiP rows: it declines the batched search (one
    select() per layer for it, one select_batch per layer for the other two), and every session
    equals its own steps alone: greedy tokens, logits to fp32 rounding, counters, tiers, state."""
    specs = [("hip", 700), ("hip-kv", 1100), ("hip", 410)]
    alone, batched = _twins(tiny, specs, tmp_path)
    plan = Engine(tiny).plan([(s, 1) for s in batched])
    assert plan.search_groups == [[0, 2]]
    want = [_greedy_alone(s, 5) for s in alone]
    calls = _count_searches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=5, stop_at_eos=False)
    assert got == want
    assert calls == {"batched": [2] * (5 * tiny.config.n_layers), "row": 5 * tiny.config.n_layers}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        _same_retriever_state(a, b)
    assert batched[1].backend.retriever.state[0].masks[-1].shape[0] == tiny.config.n_kv_heads


def test_scanning_hip_rows_search_together_and_equal_alone(tiny, monkeypatch, tmp_path):
    """Two scan_stages HiP rows next to two probe-search HiP rows: one select_batch per layer for
    the scan rows, one for the others (different search keys), none alone; every session equals
    its own steps alone."""
    specs = [("hip", 700), ("hip-scan", 1100), ("hip", 410), ("hip-scan", 300)]
    alone, batched = _twins(tiny, specs, tmp_path)
    assert Engine(tiny).plan([(s, 1) for s in batched]).search_groups == [[0, 2], [1, 3]]
    want = [_greedy_alone(s, 3) for s in alone]
    calls = _count_searches(monkeypatch)
    assert Engine(tiny).generate(batched, max_new_tokens=3, stop_at_eos=False) == want
    assert calls == {"batched": [2] * (2 * 3 * tiny.config.n_layers), "row": 0}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        _same_retriever_state(a, b)


def test_one_launch_hip_rows_search_and_attend_together(tiny, monkeypatch, tmp_path):
    """The one-launch route (Triton kernels interpreted, host chunks read in place): three HiP rows
    of different lengths (one under the budget) make one search and one attention launch per
    layer (2 greedy steps), and equal each session alone."""
    specs = [("hip", 410), ("hip", 50), ("hip", 300)]
    alone, batched = _twins(tiny, specs, tmp_path)
    assert all(0 < s.backend.cache[0].n_host % 64 <= 64 - 2 for s in batched)  # no new (pinned) chunk
    _one_launch_route(alone + batched)
    want = [_greedy_alone(s, 2) for s in alone]
    searches, launches = _count_searches(monkeypatch), _count_launches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=2, stop_at_eos=False)
    assert got == want
    assert searches == {"batched": [3] * (2 * tiny.config.n_layers), "row": 0}
    assert launches == {"batched": [3] * (2 * tiny.config.n_layers), "row": 0}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        assert [sp.fills for sp in b.backend._spaces.values()] == [sp.fills for sp in a.backend._spaces.values()]
        _same_retriever_state(a, b)


def test_8bit_tier_hip_rows_search_together_and_equal_alone(tiny, monkeypatch, tmp_path):
    """HiP rows searching 8-bit host tiers in place (CacheConfig.host_dtype int8 and fp8) next to
    one over a model-dtype tier, on the one-launch route (the CPU route reads 8-bit tiers through
    each row's own fetch, so only this route defers their searches): one select_batch per layer for
    the int8 rows and one for the fp8 rows (formats search apart), the model-dtype row alone, and
    every session equals its own steps alone (2 greedy steps): tokens, logits to fp32 rounding,
    counters, tiers, HiP's state. The searches run HiP's Triton stage kernels (codes read in place)."""
    launches = []
    from kvloft.kernels import hip_batched

    real_kernel = hip_batched.hip_stage_batched
    monkeypatch.setattr(hip_batched, "hip_stage_batched", lambda *a, **kw: (launches.append(kw["packed"].kind),
                                                                             real_kernel(*a, **kw))[1])
    specs = [("hip-host-triton", 410, "int8"), ("hip-host-triton", 300, "fp8"), ("hip-host-triton", 450, "int8"),
             ("hip-host-triton", 430, None), ("hip-host-triton", 310, "fp8")]
    alone, batched = _twins(tiny, specs, tmp_path)
    assert all(0 < s.backend.cache[0].n_host % 64 <= 64 - 2 for s in batched)  # no new (pinned) chunk
    assert [b.backend.retriever._host_formats() for b in batched] == [("int8",), ("fp8",), ("int8",), (), ("fp8",)]
    _one_launch_route(alone + batched)
    assert Engine(tiny).plan([(s, 1) for s in batched]).search_groups == [[0, 2], [1, 4]]
    want = [_greedy_alone(s, 2) for s in alone]
    calls = _count_searches(monkeypatch)
    got = Engine(tiny).generate(batched, max_new_tokens=2, stop_at_eos=False)
    assert got == want
    assert calls == {"batched": [2, 2] * (2 * tiny.config.n_layers), "row": 2 * tiny.config.n_layers}
    assert set(launches) == {"int8", "fp8"}
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        _same_retriever_state(a, b)


def _same_retriever_state(a: Session, b: Session) -> None:
    """The retrievers' state_dict()s equal: HiP's stage masks, schedules and counters."""
    sa, sb = a.backend.retriever.state_dict(), b.backend.retriever.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(v, sb[k]) if isinstance(v, torch.Tensor) else v == sb[k], k


def test_sessions_join_and_leave_between_steps(tiny, tmp_path):
    specs = [("exact", 200), ("hip", 260), ("dense", 150)]
    alone, batched = _twins(tiny, specs, tmp_path)
    engine = Engine(tiny, max_batch=3)
    members = {0: range(5), 1: range(9), 2: range(3, 9)}  # session 2 joins at 3, 0 leaves at 5
    fed = [[] for _ in specs]
    for step in range(9):
        live = [b for b in range(3) if step in members[b]]
        toks = [(step * 13 + 5 * b + 9) % 512 for b in live]
        logits = engine.step([(batched[b], t) for b, t in zip(live, toks, strict=True)])
        for row, (b, t) in enumerate(zip(live, toks, strict=True)):
            fed[b].append(t)
            assert _rel(logits[row], alone[b].step(t)) < LOGIT_TOL
    for b in range(3):
        assert batched[b].tokens[-len(fed[b]):] == fed[b]
        assert _state(batched[b]) == _state(alone[b])


@contextmanager
def _nan_row(model, token):
    w = model.net.embed_tokens.weight
    old = w[token].clone()
    with torch.no_grad():
        w[token] = float("nan")
    try:
        yield
    finally:
        with torch.no_grad():
            w[token] = old


def test_a_non_finite_row_rolls_back_every_session(tiny, tmp_path):
    specs = [("dense", 120), ("exact", 150), ("hip", 180)]
    clean, sessions = _twins(tiny, specs, tmp_path)
    engine = Engine(tiny)
    for step in range(3):  # some decode state first (rollback marks taken mid-decode)
        engine.step([(s, 20 + step) for s in sessions])
        for s in clean:
            s.step(20 + step)
    before = [(_state(s), s.last_logits.clone()) for s in sessions]
    with _nan_row(tiny, POISON), pytest.raises(NonFiniteError, match=r"pair 1 \(position 153\)") as e:
        engine.step([(sessions[0], 30), (sessions[1], POISON), (sessions[2], 31)])
    assert "every session of the batch was rolled back" in str(e.value)
    for s, (st, logits) in zip(sessions, before, strict=True):
        assert _state(s) == st
        assert torch.equal(s.last_logits, logits)
    # usable and unchanged: the next steps equal the clean twins'
    assert engine.generate(sessions, 6, stop_at_eos=False) == [_greedy_alone(s, 6) for s in clean]
    for a, b in zip(clean, sessions, strict=True):
        assert _state(b) == _state(a)


def _tier_tensors(s: Session) -> list[Tensor]:
    """Every layer's filled static slots (k, v, positions) and host rows, for bit comparisons."""
    out = []
    for t in s.backend.cache.layers:
        out += [*t.static_kv(), t.host_k.all(), t.host_v.all(), t.host_pos.all()]
    return [x.clone() for x in out]


def test_rows_move_down_before_the_layers_run(tiny):
    """The plan phase moves the rows a step displaces from the rings to the host tier and into
    the index before any layer runs (make_room), and each layer only writes its token: 40 greedy
    steps across the ring first filling (a 20-token prompt: sink 4 + 16 of a 32-token ring), a
    ring full from the start (evicting every step) and batched evictions (evict_batch 5) equal
    each session alone (the append inside each layer), token for token and state for state; a
    NaN step that had moved rows down rolls every row back, bit for bit, and they go on alike."""
    specs = [(20, 0), (36, 0), (30, 5)]
    alone = [_session(tiny, "exact", n, seed, evict_batch=e) for seed, (n, e) in enumerate(specs)]
    batched = [_session(tiny, "exact", n, seed, evict_batch=e) for seed, (n, e) in enumerate(specs)]
    at_layer0 = []
    real = [s.backend.attend_deferred for s in batched]
    for b, s in enumerate(batched):
        def spy(layer, *args, b=b, s=s, **kw):
            if layer == 0:  # the last layer's rows already moved down, as the first's
                at_layer0.append((b, s.backend.cache[0].n_host, s.backend.cache[-1].n_host))
            return real[b](layer, *args, **kw)
        s.backend.attend_deferred = spy
    engine = Engine(tiny)
    assert engine.generate(batched, 40, stop_at_eos=False) == [_greedy_alone(s, 40) for s in alone]
    assert all(first == last for _, first, last in at_layer0)
    grown = {b: [n for bb, n, _ in at_layer0 if bb == b] for b in range(3)}
    assert grown[0][0] == 0 and grown[0][-1] > 0 and grown[1][0] == 1 and len(set(grown[2])) > 2
    for a, b in zip(alone, batched, strict=True):
        assert _state(b) == _state(a)
        assert b.backend.room_made == set()
        for x, y in zip(_tier_tensors(a), _tier_tensors(b), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)  # batched GEMMs round otherwise
    plan = engine.plan([(s, 3) for s in batched])
    assert plan.evicts.tolist()[:2] == [1, 1]
    before = [(_state(s), _tier_tensors(s)) for s in batched]
    with _nan_row(tiny, POISON), pytest.raises(NonFiniteError, match="pair 1"):
        engine.step([(batched[0], 3), (batched[1], POISON), (batched[2], 4)])
    for s, (st, tensors) in zip(batched, before, strict=True):
        assert _state(s) == st and s.backend.room_made == set()
        assert all(torch.equal(x, y) for x, y in zip(_tier_tensors(s), tensors, strict=True))
    assert engine.generate(batched, 6, stop_at_eos=False) == [_greedy_alone(s, 6) for s in alone]


def test_an_error_in_one_rows_attention_rolls_back_all(tiny, monkeypatch, tmp_path):
    specs = [("exact", 150), ("hip", 180)]
    clean, sessions = _twins(tiny, specs, tmp_path)
    before = [_state(s) for s in sessions]
    real = sessions[1].backend.attend_deferred

    def failing(layer, *args):
        if layer == 1:  # layer 0 of every row has appended its token by now
            raise RuntimeError("attention failed")
        return real(layer, *args)

    monkeypatch.setattr(sessions[1].backend, "attend_deferred", failing)
    with pytest.raises(RuntimeError, match="attention failed") as e:
        Engine(tiny).generate(sessions, 3)
    assert any("row 1 of the batched step" in n for n in e.value.__notes__)
    assert [_state(s) for s in sessions] == before
    monkeypatch.undo()
    assert Engine(tiny).generate(sessions, 4, stop_at_eos=False) == [_greedy_alone(s, 4) for s in clean]


def test_generate_stops_a_session_at_eos_and_goes_on_with_the_others(tiny, monkeypatch, tmp_path):
    alone, batched = _twins(tiny, [("exact", 150), ("dense", 120)], tmp_path)
    first = _greedy_alone(alone[0], 1)[0]  # session 0's first greedy token, declared an EOS
    monkeypatch.setattr(tiny, "config", dataclasses.replace(tiny.config, eos_token_ids=(first,)))
    got = Engine(tiny).generate(batched, max_new_tokens=5)
    assert got[0] == [] and len(batched[0]) == 150
    assert got[1] == _greedy_alone(alone[1], 5)


# ---- the step plan --------------------------------------------------------------------------


def test_decode_append_follows_the_ring():
    # (sink_fill, ring_fill, ring_head), n_sink=2, n_window=4 -> (rows down, static rows after)
    assert decode_append({"sink_fill": 1, "ring_fill": 0, "ring_head": 0}, 2, 4, 0) == (0, 2)
    assert decode_append({"sink_fill": 2, "ring_fill": 3, "ring_head": 0}, 2, 4, 0) == (0, 6)
    assert decode_append({"sink_fill": 2, "ring_fill": 4, "ring_head": 1}, 2, 4, 0) == (1, 6)
    assert decode_append({"sink_fill": 2, "ring_fill": 5, "ring_head": 0}, 2, 4, 3) == (0, 8)
    assert decode_append({"sink_fill": 2, "ring_fill": 7, "ring_head": 0}, 2, 4, 3) == (3, 7)


def test_plan_matches_what_the_tiers_do(tiny):
    """Scripted sequences through the sink filling, the ring wrapping (evict_batch 0) and batched
    evictions (evict_batch 5): the plan's rows per tier, evictions, HiP's stage refreshes and
    Recycled's full steps equal the tiers' and the retrievers' after each step; budgets held."""
    sessions = [_session(tiny, "exact", 2, 0), _session(tiny, "exact", 40, 1, evict_batch=5),
                _session(tiny, "hip", 120, 2), _session(tiny, "dense", 30, 3), _session(tiny, "recycled", 60, 4),
                _session(tiny, "hip-extrapolate", 150, 5)]
    engine, hkv, n_layers = Engine(tiny), tiny.config.n_kv_heads, tiny.config.n_layers
    seen = {"evict": set(), "refresh": set(), "full": set()}
    for step in range(40):
        pairs = [(s, (step * 7 + b) % 512) for b, s in enumerate(sessions)]
        plan = engine.plan(pairs)
        assert plan.search_groups == []  # one HiP row at exact positions (the other extrapolates)
        assert plan.tokens.tolist() == [t for _, t in pairs]
        assert plan.positions.tolist() == [len(s) for s in sessions]
        selected = [s.backend.retriever.stats()["selected"] if b != 3 else 0 for b, s in enumerate(sessions)]
        full_steps = sessions[4].backend.retriever.full_steps
        engine.step(pairs)
        for b, s in enumerate(sessions):
            if b == 3:  # dense: every token on the device
                assert (plan.n_static[b], plan.n_host[b], plan.evicts[b]) == (len(s), 0, 0)
                assert plan.refresh[0][b] is None and not plan.searches[b]
                continue
            for layer in range(n_layers):
                t = s.backend.cache[layer]
                assert (t.n_static, t.n_host) == (plan.n_static[b], plan.n_host[b]), (step, b, layer)
            cap = t.n_sink + t.n_window + t.evict_batch
            assert plan.n_static[b] <= cap and plan.n_static[b] + plan.n_host[b] == len(s)
            full = b == 4 and any(plan.refresh[layer][b] == (True,) for layer in range(n_layers))
            assert plan.max_rows[b] == (plan.n_host[b] if full else min(s.retrieval.budget, plan.n_host[b]))
            got = s.backend.retriever.stats()["selected"] - selected[b]
            assert got <= n_layers * hkv * int(plan.max_rows[b])
            seen["evict"].add(int(plan.evicts[b]))
            if b in (2, 5):
                for layer in range(n_layers):
                    assert plan.refresh[layer][b] == s.backend.retriever.state[layer].refreshed, (step, layer)
                    seen["refresh"].add(plan.refresh[layer][b])
            elif b == 4:  # recycled, stride 3: the plan's full steps are the ones it ran
                fulls = [plan.refresh[layer][b] for layer in range(n_layers)]
                assert sum(f == (True,) for f in fulls) == s.backend.retriever.full_steps - full_steps
                assert all(f in ((True,), (False,)) for f in fulls)
                seen["full"].add(fulls[0])
            else:
                assert all(plan.refresh[layer][b] is None for layer in range(n_layers))
    assert seen["evict"] == {0, 1, 5}  # every kind of step was planned and checked
    assert len(seen["refresh"]) >= 2 and seen["full"] == {(True,), (False,)}


# ---- refusals (before anything changes) -------------------------------------------------


def test_refusals_leave_every_session_as_it_was(tiny):
    a, b = _session(tiny, "exact", 100, 0), _session(tiny, "dense", 80, 1)
    before = [_state(a), _state(b)]
    engine = Engine(tiny, max_batch=2)
    with pytest.raises(ValueError, match="same session"):
        engine.step([(a, 1), (a, 3)])
    with pytest.raises(ValueError, match="feed it a prompt first"):
        engine.step([(a, 1), (Session(tiny, CONFIGS["exact"], RUNTIME), 2)])
    other = load_model("tiny", device="cpu", dtype="float32", seed=6)
    with pytest.raises(ValueError, match=r"another model.*kvloft\.Engine\(session\.model\)"):
        engine.step([(a, 1), (_session(other, "dense", 20, 0), 2)])
    with pytest.raises(ValueError, match="over max_batch=2"):
        engine.step([(a, 1), (b, 2), (_session(tiny, "dense", 20, 0), 3)])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 512\)") as e:
        engine.step([(a, 1), (b, 512)])
    assert "in pair 1 of the step" in e.value.__notes__[0]
    full = Session(tiny, CONFIGS["dense"], RUNTIME, CacheConfig(max_context=20))
    full.feed(_prompt(20, 2))
    with pytest.raises(ValueError, match="over max_context=20"):
        engine.step([(a, 1), (full, 2)])
    with pytest.raises(TypeError, match="must be an int"):
        engine.step([(a, 1.0)])
    with pytest.raises(TypeError, match="pair"):
        engine.step([a])
    with pytest.raises(ValueError, match="at least one session"):
        engine.step([])
    with pytest.raises(TypeError, match="list of sessions"):
        engine.generate(a)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        engine.generate([a], max_new_tokens=-1)
    assert [_state(a), _state(b)] == before
    with pytest.raises(ValueError, match=r"max_batch must be an int in \[1, "):
        Engine(tiny, max_batch=0)
    with pytest.raises(TypeError, match="load_model"):
        Engine("tiny")


@pytest.mark.slow
def test_smollm2_batched_greedy_equals_alone(smollm2_gguf, tmp_path):
    model = load_model("smollm2", device="cpu")
    text = "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with one step. "
    rcfgs = {"dense": RetrievalConfig(method="dense"),
             "exact": RetrievalConfig(method="exact", budget=32, n_sink=4, n_window=32),
             "hip": RetrievalConfig(method="hip", budget=32, n_sink=4, n_window=32, options=HIP)}
    alone, batched = [], []
    for reps, method in ((2, "dense"), (4, "exact"), (6, "hip")):
        s = Session(model, rcfgs[method], RUNTIME, CacheConfig(host_chunk_tokens=64))
        s.feed(text * reps + "Repeat the first sentence:")
        s.save(tmp_path / method)  # its twin restored, not fed again
        alone.append(s)
        batched.append(Session.load(tmp_path / method, model, runtime=RUNTIME))
    want = [_greedy_alone(s, 4) for s in alone]
    assert Engine(model).generate(batched, max_new_tokens=4, stop_at_eos=False) == want
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        (tok_a, n_a, st_a, tiers_a), (tok_b, n_b, st_b, tiers_b) = _state(a), _state(b)
        assert (tok_b, n_b, st_b.get("tier_tokens"), tiers_b) == (tok_a, n_a, st_a.get("tier_tokens"), tiers_a)


def test_graphed_segments_pad_the_batch_and_equal_the_eager_step(tiny, tmp_path):
    """graphs="segments": the CUDA-graph path's segments run eagerly (as without CUDA), the batch
    padded to a power of two (at most max_batch); sessions equal their own steps alone."""
    specs = [("dense", 120), ("exact", 150), ("hip", 180)]
    alone, batched = _twins(tiny, specs, tmp_path)
    engine = Engine(tiny, max_batch=6, graphs="segments")
    assert engine.generate(batched, 5, stop_at_eos=False) == [_greedy_alone(s, 5) for s in alone]
    assert sorted(engine._graphs) == [4]  # 3 rows padded to 4
    logits = engine.step([(batched[0], 3), (batched[2], 4)])  # 2 rows: a batch of 2, no padding
    assert sorted(engine._graphs) == [2, 4] and logits.shape == (2, tiny.config.vocab_size)
    for row, (b, t) in enumerate(((0, 3), (2, 4))):
        assert _rel(logits[row], alone[b].step(t)) < LOGIT_TOL
    for a, b in zip(alone, batched, strict=True):
        assert _state(b) == _state(a)
    assert Engine(tiny, max_batch=6, graphs="segments")._graphs_for(5).batch == 6  # capped at max_batch
    with pytest.raises(ValueError, match="graphs must be one of"):
        Engine(tiny, graphs="on")
    with pytest.raises(TypeError, match="shared_attention must be a bool"):
        Engine(tiny, shared_attention="yes")
    with pytest.raises(ValueError, match="batch must be an int >= 1"):
        DecodeGraphs(tiny.net, capture=False, batch=0)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", ["auto", "off"])
def test_cuda_batched_decode_equals_each_session_alone(tmp_path, graphs):
    """On CUDA (Triton kernels, pinned host tier, batched evictions; sessions alone replay their
    own CUDA graphs): the batched step, graphed or eager, equals each session's own steps."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    specs = [("dense", 300), ("exact", 700), ("hip", 1100)]
    alone, batched = _twins(model, specs, tmp_path)
    engine = Engine(model, max_batch=4, graphs=graphs)
    want = [_greedy_alone(s, 80) for s in alone]  # past evict_batch (64 on CUDA): rows move down
    assert engine.generate(batched, 80, stop_at_eos=False) == want
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
    assert bool(engine._graphs) == (graphs == "auto")


@pytest.mark.gpu
def test_cuda_one_launch_rows_share_one_launch_per_layer(tmp_path, monkeypatch):
    """On CUDA (Triton kernels, pinned host tier read in place, host chunks added during the
    steps so the slot tables are remade): exact, hip and exact rows of different lengths share
    one attention launch per layer (the dense row attends alone), and through 80 steps every
    session equals its own steps alone; the per-row path (shared_attention=False) too."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    specs = [("exact", 700), ("hip", 1100), ("dense", 300), ("exact", 420)]
    alone, batched = _twins(model, specs, tmp_path)
    _, rowwise = _twins(model, specs, tmp_path / "rowwise")
    chunks = [len(s.backend.cache[0].host_k.chunks) for s in batched if s.retrieval.method != "dense"]
    want = [_greedy_alone(s, 80) for s in alone]  # past evict_batch (64 on CUDA): rows move down
    calls = _count_launches(monkeypatch)
    assert Engine(model, max_batch=4).generate(batched, 80, stop_at_eos=False) == want
    assert calls == {"batched": [3] * (80 * model.config.n_layers), "row": 0}
    assert Engine(model, max_batch=4, shared_attention=False).generate(rowwise, 80, stop_at_eos=False) == want
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        if a.retrieval.method != "dense":
            assert [sp.fills for sp in b.backend._spaces.values()] == [sp.fills for sp in a.backend._spaces.values()]
    after = [len(s.backend.cache[0].host_k.chunks) for s in batched if s.retrieval.method != "dense"]
    assert all(x > y for x, y in zip(after, chunks, strict=True)), (chunks, after)  # tables remade


@pytest.mark.gpu
def test_cuda_hip_rows_search_together_and_equal_alone(tmp_path, monkeypatch):
    """On CUDA (HiP's batched stage kernel; keys_on="host": every row's pinned host tier read in
    place through one address table): HiP rows of three lengths (one under the budget) make one
    search and one attention launch per layer, and through 80 steps (host chunks added) each
    session equals its own steps alone, HiP's state included."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    specs = [("hip-host", 1100), ("hip-host", 50), ("dense", 300), ("hip-host", 700)]
    alone, batched = _twins(model, specs, tmp_path)
    assert all(s.backend.retriever.use_kernel and s.backend.retriever.tiers for s in batched if s.retrieval.method != "dense")
    want = [_greedy_alone(s, 80) for s in alone]
    searches, launches = _count_searches(monkeypatch), _count_launches(monkeypatch)
    assert Engine(model, max_batch=4).generate(batched, 80, stop_at_eos=False) == want
    # one search and one launch per layer and step (the short row joins once it has host rows)
    for calls in (searches, launches):
        assert calls["row"] == 0 and len(calls["batched"]) == 80 * model.config.n_layers
        assert set(calls["batched"]) <= {2, 3} and calls["batched"][-1] == 3
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
        if a.retrieval.method != "dense":
            _same_retriever_state(a, b)


@pytest.mark.gpu
def test_cuda_exact_rows_search_together_and_equal_alone(tmp_path, monkeypatch):
    """On CUDA: exact rows of different lengths make one select_batch per layer (every row's key
    copy scored in one launch) and through 40 steps each session equals its own steps alone."""
    from kvloft.index.exact import ExactRetriever

    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    specs = [("exact", 700), ("dense", 300), ("exact", 420), ("exact", 1000)]
    alone, batched = _twins(model, specs, tmp_path)
    want = [_greedy_alone(s, 40) for s in alone]
    calls = []
    real = ExactRetriever.select_batch.__func__

    def spy(cls, retrievers, *args, **kw):
        calls.append(len(retrievers))
        return real(cls, retrievers, *args, **kw)

    monkeypatch.setattr(ExactRetriever, "select_batch", classmethod(spy))
    assert Engine(model, max_batch=4).generate(batched, 40, stop_at_eos=False) == want
    assert calls == [3] * (40 * model.config.n_layers)
    for a, b in zip(alone, batched, strict=True):
        assert _rel(b.last_logits, a.last_logits) < LOGIT_TOL
        assert _state(b) == _state(a)
