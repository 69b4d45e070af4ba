"""The whole decode step (runtime/whole_step.py, Engine(graphs="whole")): one graph of the whole
step, attention inside, for batches of dense rows, of exact rows with their keys on the
device (runtime/whole_exact.py) and of HiP rows (runtime/whole_hip.py); equal to the segmented step and to each session decoded alone. CPU: the same code run eagerly, its kernels through the Triton
interpreter (fp32; bf16 with the interpreter's bf16 dot widened to fp32, see bf16_dot). GPU (marked):
captured, replayed and held against the eager step.

Bound: the whole step's attention is the split-K Triton kernel where the segmented step and a
session alone run the torch reference on the CPU; both are fp32 softmaxes of the same rows, so
logits agree to LOGIT_TOL (relative norm), greedy tokens exactly. Exact rows: the same top-k
rows (scores of one fp32 dot product per key), attended in two parts (static tier, selected
host rows) merged by log-sum-exp where the segmented step takes one softmax: the same bound."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kvloft import CacheConfig, Engine, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.runtime.numerics import NonFiniteError
from kvloft.runtime.whole_graphs import MAX_PATTERN_GRAPHS
from kvloft.runtime.whole_step import WholeStep, captured_route
from kvloft.tiers.kvcache import DenseKV

RUNTIME = RuntimeConfig(prefill_chunk=256, progress=False)
DENSE = RetrievalConfig(method="dense")
EXACT = RetrievalConfig(method="exact", budget=24, n_sink=4, n_window=32)
# exact with its keys copied to the device (as on CUDA), in chunks of 64 rows: the captured route
EXACT_DEV = RetrievalConfig(method="exact", budget=24, n_sink=4, n_window=32,
                            options={"keys_on": "device", "chunk_rows": 64})
CACHE = CacheConfig(host_chunk_tokens=64)  # host rows in several chunks at these lengths
LOGIT_TOL = 1e-4  # relative norm: two fp32 attention implementations, each ~1e-6 off an fp64 softmax


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny", device="cpu", dtype="float32", seed=5)


def _fed(model, n, seed, rcfg=DENSE, cache=CACHE):
    s = Session(model, rcfg, RUNTIME, cache)
    s.feed(torch.randint(8, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist())
    return s


def _twins(model, lengths, copies=3):
    """`copies` identical sets of dense sessions, one per prompt length (fed again each time)."""
    return [[_fed(model, n, seed) for seed, n in enumerate(lengths)] for _ in range(copies)]


def _greedy_alone(s: Session, n: int) -> list[int]:
    """n greedy tokens of `s` stepped alone (its own route): the reference of a batched step."""
    out = []
    for _ in range(n):
        out.append(int(s.last_logits.argmax()))
        s.step(out[-1])
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _tight(s: Session) -> None:
    """Dense buffers with room for exactly one more token: the next whole step grows them."""
    m = s.model
    for i, store in enumerate(s.backend.layers):
        new = DenseKV(m.config, m.device, m.dtype, capacity=store.n + 1)
        new.append(*store.kv())
        s.backend.layers[i] = new


def test_dense_rows_declare_a_captured_route_and_tiered_rows_do_not(tiny):
    assert captured_route(_fed(tiny, 20, 0).backend) is None
    why = captured_route(_fed(tiny, 80, 1, EXACT).backend)
    assert why is not None and "host" in why


def test_whole_step_equals_segments_and_each_session_alone(tiny):
    """Rows of 40, 57 and 23 tokens (3 rows in a bucket of 4: a padding row), one of them at its
    buffers' capacity (the step grows them): 3 greedy tokens equal the segmented engine's and each
    session's own; a teacher-forced step's logits agree within LOGIT_TOL; every row's KV count
    grows by one a step."""
    alone, segmented, whole = _twins(tiny, [40, 57, 23])
    _tight(whole[1])
    want = [_greedy_alone(s, 3) for s in alone]
    eng_w = Engine(tiny, graphs="whole")
    assert Engine(tiny, graphs="segments").generate(segmented, 3, stop_at_eos=False) == want
    assert eng_w.generate(whole, 3, stop_at_eos=False) == want
    assert eng_w.route_counts == {"whole": 3, "segments": 0, "eager": 0} and eng_w.last_route_why is None
    for a, w in zip(alone, whole, strict=True):
        assert w.tokens == a.tokens and len(w) == len(a)
        assert all(store.n == len(a) for store in w.backend.layers)
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
    toks = [11, 48, 85]
    got = eng_w.step(list(zip(whole, toks, strict=True)))
    for b, (s, t) in enumerate(zip(alone, toks, strict=True)):
        assert _rel(got[b], s.step(t)) < LOGIT_TOL


def test_sessions_join_and_leave_the_whole_step(tiny):
    """Buckets 4, 1, 2 and 1 again over the same sessions, in other orders: each step's rows equal
    the same sessions stepped alone (one graph per bucket; the tables, not the graph, name the
    rows: bucket 1 runs row 1, then row 2)."""
    alone, whole = _twins(tiny, [33, 61, 18], copies=2)
    eng = Engine(tiny, graphs="whole")
    for rows, tok in (([0, 1, 2], 5), ([1], 9), ([2, 0], 13), ([2], 21)):
        got = eng.step([(whole[i], tok + i) for i in rows])
        for j, i in enumerate(rows):
            assert _rel(got[j], alone[i].step(tok + i)) < LOGIT_TOL
    assert sorted(eng._wholes) == [1, 2, 4] and eng.route_counts["whole"] == 4
    assert [len(s) for s in whole] == [len(s) for s in alone]


def test_a_batch_with_a_tiered_row_runs_the_segmented_step(tiny):
    """A dense row with an exact row: not whole (the reason names the row); equal to alone."""
    alone = [_fed(tiny, 30, 0), _fed(tiny, 90, 1, EXACT)]
    batched = [_fed(tiny, 30, 0), _fed(tiny, 90, 1, EXACT)]
    eng = Engine(tiny, graphs="whole")
    got = eng.step([(batched[0], 3), (batched[1], 4)])
    assert eng.route_counts == {"whole": 0, "segments": 1, "eager": 0}
    assert eng.last_route_why.startswith("row 1:")
    for b, (s, t) in enumerate(zip(alone, (3, 4), strict=True)):
        assert _rel(got[b], s.step(t)) < 1e-5  # the segmented step: the same kernels as alone


def test_without_triton_on_the_device_the_step_is_segmented(tiny, monkeypatch):
    """A CPU without the Triton interpreter cannot run the whole step's kernels: the engine says
    so and runs the segmented step, equal to the session alone."""
    from kvloft.kernels import checks

    monkeypatch.setattr(checks, "is_interpreted", lambda kernel: False)
    alone, whole = _fed(tiny, 30, 0), _fed(tiny, 30, 0)
    eng = Engine(tiny, graphs="whole")
    got = eng.step([(whole, 3)])
    assert eng.route_counts == {"whole": 0, "segments": 1, "eager": 0} and "Triton" in eng.last_route_why
    assert _rel(got[0], alone.step(3)) < 1e-5


def test_a_failed_whole_step_rolls_every_row_back(tiny):
    """A NaN embedding row makes one row's logits non-finite: both sessions are rolled back
    (tokens and KV counts as before) and decode on equal to twins that never saw it."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=5)
    poison = 7
    sessions = [_fed(model, 25, 0), _fed(model, 44, 1)]
    twins = [_fed(model, 25, 0), _fed(model, 44, 1)]
    with torch.no_grad():
        model.net.embed_tokens.weight[poison] = float("nan")
    eng = Engine(model, graphs="whole")
    with pytest.raises(NonFiniteError, match="pair 1"):
        eng.step([(sessions[0], 3), (sessions[1], poison)])
    for s, t in zip(sessions, twins, strict=True):
        assert s.tokens == t.tokens and all(store.n == len(t) for store in s.backend.layers)
    got = eng.step([(sessions[0], 3), (sessions[1], 4)])
    for b, (t, tok) in enumerate(zip(twins, (3, 4), strict=True)):
        assert _rel(got[b], t.step(tok)) < LOGIT_TOL


def test_whole_step_refuses_more_rows_than_its_bucket(tiny):
    s = _fed(tiny, 10, 0)
    w = WholeStep(tiny.net, capture=False, batch=1)
    with pytest.raises(ValueError, match="1..1 rows"):
        w.step(torch.tensor([1, 2]), torch.tensor([10, 10]), [s.backend, s.backend])
    with pytest.raises(ValueError, match="CUDA"):
        WholeStep(tiny.net, capture=True, batch=1)


@pytest.mark.gpu
def test_cuda_whole_step_equals_each_session_alone():
    """fp32 on CUDA: 40 greedy steps of the captured whole step (one replay a step) over rows of
    300, 1020 and 70 tokens (the 1020 row's buffers grow past 1024 mid-run: new addresses in the
    tables, the same graph) equal each session stepped alone (its own segmented graphs)."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    lengths = [300, 1020, 70]
    alone = [_fed(model, n, seed) for seed, n in enumerate(lengths)]
    whole = [_fed(model, n, seed) for seed, n in enumerate(lengths)]
    want = [_greedy_alone(s, 40) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 40, stop_at_eos=False) == want
    assert eng.route_counts["whole"] == 40 and eng._wholes[4].graphs.held == 1
    for a, w in zip(alone, whole, strict=True):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert all(st.n == len(a) for st in w.backend.layers)
    assert whole[1].backend.layers[0].k.shape[0] > 1024  # grew under the graph


@pytest.mark.gpu
def test_captured_whole_step_equals_the_same_step_eager():
    """bf16 on CUDA, rows joining and leaving (buckets 2, 1, 4): each captured replay gives the
    logits of the same whole step run eagerly (the same kernels and grid, launched from Python)."""
    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=5)
    lengths = [300, 1100, 70, 513]
    graphed = [_fed(model, n, seed) for seed, n in enumerate(lengths)]
    eager = [_fed(model, n, seed) for seed, n in enumerate(lengths)]
    g_eng, e_eng = Engine(model, graphs="whole"), Engine(model, graphs="whole")
    e_eng._wholes = {b: WholeStep(model.net, capture=False, batch=b) for b in (1, 2, 4)}
    for step, rows in enumerate(([0, 1], [2], [0, 1, 2, 3], [3, 1], [0, 1, 2, 3], [2, 0, 3])):
        pairs = [(i, (step * 31 + 7 * i) % 512) for i in rows]
        got = g_eng.step([(graphed[i], t) for i, t in pairs])
        ref = e_eng.step([(eager[i], t) for i, t in pairs])
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    assert all(w.graphs.held for w in g_eng._wholes.values()) and sorted(g_eng._wholes) == [1, 2, 4]
    assert all(w.graphs.held == 0 for w in e_eng._wholes.values())
    assert [len(s) for s in graphed] == [len(s) for s in eager]


# ---- tiered rows: exact with its keys on the device ------------------------------------------


def _counters(s: Session):
    """What a step counts besides the logits: tokens, tier fill, the retriever's and backend's counts."""
    be = s.backend
    return (s.tokens[:], [t.ring_state() | {"n_host": t.n_host} for t in be.cache.layers],
            be.retriever.stats(), be.scanned)


def _tier_tensors(s: Session) -> list[torch.Tensor]:
    out = []
    for t in s.backend.cache.layers:
        out += [*t.static_kv(), t.host_k.all(), t.host_v.all(), t.host_pos.all(), s.backend.retriever.keys[0].all()]
    return [x.clone() for x in out]


def test_exact_rows_declare_a_captured_route_with_their_keys_on_the_device(tiny):
    """keys_on="device" is captured; the host tier searched in place, rank="prob", another
    retriever or extrapolate mode say why not."""
    assert captured_route(_fed(tiny, 80, 1, EXACT_DEV).backend) is None
    for rcfg, word in ((EXACT, "keys_on"), (dataclasses.replace(EXACT_DEV, options={**EXACT_DEV.options, "rank": "prob"}),
                                            "rank"),
                       (RetrievalConfig(method="tokenselect", budget=24, n_sink=4, n_window=32), "TokenSelect"),
                       (dataclasses.replace(EXACT_DEV, position_mode="extrapolate"), "extrapolate")):
        why = captured_route(_fed(tiny, 80, 1, rcfg).backend)
        assert why is not None and word.lower() in why.lower(), why


def test_exact_shape_covers_the_batch_and_rows_that_rank_otherwise_do_not_share_a_step(tiny):
    """The tiered step's shape: score columns a power of two over the most host rows (at least a
    scoring block), the width the largest budget's power of two, chunk tables to the capacity;
    none for dense rows; rows reducing their GQA groups otherwise are not one step."""
    from kvloft.runtime.whole_exact import ExactShape, exact_shape, shape_why
    from kvloft.runtime.whole_step import not_whole

    short, long_, dense = _fed(tiny, 90, 0, EXACT_DEV), _fed(tiny, 200, 1, EXACT_DEV), _fed(tiny, 30, 2)
    assert exact_shape([dense.backend]) is None
    assert exact_shape([short.backend, dense.backend]) == ExactShape(64, 32, 1, 1, "max")
    assert exact_shape([short.backend, long_.backend]) == ExactShape(256, 32, 4, 4, "max")  # 164 host rows
    assert not_whole([short.backend, long_.backend, dense.backend], torch.device("cpu")) is None
    summed = _fed(tiny, 90, 3, dataclasses.replace(EXACT_DEV, gqa_reduce="sum"))
    assert "gqa_reduce" in shape_why([short.backend, summed.backend])
    assert "gqa_reduce" in not_whole([short.backend, summed.backend], torch.device("cpu"))


def test_exact_whole_step_equals_segments_and_each_session_alone(tiny):
    """Exact rows of 90 (54 host rows, over the budget of 24), 50 (14: below the budget) and 35
    tokens (no host row; its ring fills on the first step, evicts from the second), all keys on
    the device: 3 greedy whole steps (the step's top-k over the key copy, two fixed launches and
    a merge) give the tokens of the segmented engine and of each session alone, the same
    counters (tiers, retriever, scanned keys), tiers within fp32 rounding; a teacher-forced step's
    logits within LOGIT_TOL."""
    lengths = [90, 50, 35]
    alone, segmented, whole = ([_fed(tiny, n, seed, EXACT_DEV) for seed, n in enumerate(lengths)] for _ in range(3))
    want = [_greedy_alone(s, 3) for s in alone]
    eng = Engine(tiny, graphs="whole")
    assert Engine(tiny, graphs="segments").generate(segmented, 3, stop_at_eos=False) == want
    assert eng.generate(whole, 3, stop_at_eos=False) == want
    assert eng.route_counts == {"whole": 3, "segments": 0, "eager": 0} and eng.last_route_why is None
    assert [t.n_host for t in (s.backend.cache.layers[0] for s in whole)] == [57, 17, 2]
    for a, w in zip(alone, whole, strict=True):
        assert _counters(w) == _counters(a)
        assert w.backend.room_made == set()
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        for x, y in zip(_tier_tensors(w), _tier_tensors(a), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    toks = [11, 48, 85]
    got = eng.step(list(zip(whole, toks, strict=True)))
    for b, (s, t) in enumerate(zip(alone, toks, strict=True)):
        assert _rel(got[b], s.step(t)) < LOGIT_TOL


def test_dense_and_exact_rows_join_and_leave_the_whole_step(tiny):
    """An exact row, a dense row and an exact row below the budget whose ring moves rows down 5 at
    a time (evict_batch 5; full on the last step): buckets 4 (the tiered graph, its dense row
    reading no host rows), 1 (the dense row alone: the dense graph) and 2; each step's rows equal
    the same sessions stepped alone."""
    specs = [(70, EXACT_DEV, CACHE), (40, DENSE, CACHE), (45, EXACT_DEV, CacheConfig(host_chunk_tokens=64,
                                                                                   evict_batch=5))]
    alone, whole = ([_fed(tiny, n, seed, r, c) for seed, (n, r, c) in enumerate(specs)] for _ in range(2))
    for s in (alone[2], whole[2]):  # its ring to 36 of 37 tokens
        for t in range(4):
            s.step(20 + t)
    eng = Engine(tiny, graphs="whole")
    for rows, tok in (([0, 1, 2], 5), ([1], 9), ([2, 0], 13)):
        got = eng.step([(whole[i], tok + i) for i in rows])
        for j, i in enumerate(rows):
            assert _rel(got[j], alone[i].step(tok + i)) < LOGIT_TOL
    assert eng.route_counts["whole"] == 3 and whole[2].backend.cache.layers[0].n_host == 9 + 5
    assert 1 in eng._wholes and sorted(k[0] for k in eng._wholes if isinstance(k, tuple)) == [2, 4]
    for i in (0, 2):
        assert _counters(whole[i]) == _counters(alone[i])


def test_a_failed_exact_whole_step_rolls_every_row_back(tiny):
    """A NaN row in a whole step of two exact rows whose rings evict (their rows moved down in
    the plan phase, the token written in the graph): both roll back bit for bit and go on equal
    to twins that never saw it."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=5)
    sessions, twins = ([_fed(model, n, seed, EXACT_DEV) for seed, n in enumerate((60, 44))] for _ in range(2))
    before = [(_counters(s), _tier_tensors(s)) for s in sessions]
    with torch.no_grad():
        model.net.embed_tokens.weight[7] = float("nan")
    eng = Engine(model, graphs="whole")
    with pytest.raises(NonFiniteError, match="pair 1"):
        eng.step([(sessions[0], 3), (sessions[1], 7)])
    assert eng.route_counts["whole"] == 1
    for s, (counters, tensors) in zip(sessions, before, strict=True):
        assert _counters(s) == counters and s.backend.room_made == set()
        assert all(torch.equal(x, y) for x, y in zip(_tier_tensors(s), tensors, strict=True))
    got = eng.step([(sessions[0], 3), (sessions[1], 4)])
    for b, (t, tok) in enumerate(zip(twins, (3, 4), strict=True)):
        assert _rel(got[b], t.step(tok)) < LOGIT_TOL


@pytest.mark.gpu
def test_cuda_exact_whole_step_equals_each_session_alone():
    """fp32 on CUDA, exact rows with their keys on the device (pinned host tier read in place,
    batched evictions of 64 moved down in the plan phase, one at step 65): 70 greedy captured
    steps over rows of 2472, 700 (below the budget of 1024) and 1100 host rows equal each
    session stepped alone (its segmented graphs: one launch over its slot table), counters alike."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="exact", budget=1024, n_sink=16, n_window=512, options={"keys_on": "device"})
    lengths = [3000, 700 + 528, 1100 + 528]
    alone = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    whole = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    want = [_greedy_alone(s, 70) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 70, stop_at_eos=False) == want
    assert eng.route_counts["whole"] == 70 and all(w.graphs.held for w in eng._wholes.values())
    for a, w in zip(alone, whole, strict=True):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert _counters(w) == _counters(a)


def _captured_equals_eager(model, specs, schedule):
    """Sessions of specs [(context, rcfg)] fed twice; each step of schedule (row indices) runs
    through a capturing whole-step engine and one whose whole steps run eagerly (the same
    kernels and grid, launched from Python): the logits agree to bf16's rounding. Returns
    (capturing engine, eager engine, its sessions, the eager ones) for the caller's checks."""
    graphed = [_fed(model, n, seed, r, CacheConfig()) for seed, (n, r) in enumerate(specs)]
    eager = [_fed(model, n, seed, r, CacheConfig()) for seed, (n, r) in enumerate(specs)]
    g_eng, e_eng = Engine(model, graphs="whole"), Engine(model, graphs="whole")

    def eager_whole(n, shape=None):
        key = e_eng._bucket(n) if shape is None else (e_eng._bucket(n), shape)
        if key not in e_eng._wholes:
            e_eng._wholes[key] = WholeStep(model.net, capture=False, batch=e_eng._bucket(n), shape=shape)
        return e_eng._wholes[key]

    e_eng._whole_for = eager_whole
    for step, rows in enumerate(schedule):
        pairs = [(i, (step * 31 + 7 * i) % 512) for i in rows]
        got = g_eng.step([(graphed[i], t) for i, t in pairs])
        ref = e_eng.step([(eager[i], t) for i, t in pairs])
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    return g_eng, e_eng, graphed, eager


@pytest.mark.gpu
def test_captured_exact_whole_step_equals_the_same_step_eager():
    """bf16 on CUDA, dense and exact rows joining and leaving: each captured replay gives the
    logits of the same whole step run eagerly (the same kernels and grid, launched from Python)."""
    from kvloft.runtime.whole_exact import exact_shape

    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=5)
    rcfg = RetrievalConfig(method="exact", budget=256, n_sink=16, n_window=256, options={"keys_on": "device"})
    specs = [(2000, rcfg), (1100, DENSE), (400, rcfg), (513, rcfg)]
    g_eng, e_eng, graphed, _ = _captured_equals_eager(model, specs, ([0, 1], [2], [0, 1, 2, 3], [3, 1],
                                                                     [0, 1, 2, 3], [2, 0, 3]))
    assert all(w.graphs.held for w in g_eng._wholes.values())
    assert all(w.graphs.held == 0 for w in e_eng._wholes.values())
    assert exact_shape([s.backend for s in graphed]) is not None


# ---- tiered rows: HiP's staged search ----------------------------------------------------------

# two stages (chunks of 16 then 4 rows, 48 then the budget kept), refreshed every 4 and 2 steps,
# staggered per layer; the Triton stage kernels (on the CPU through the interpreter), as on CUDA
HIP_OPTIONS = {"chunk_rows": 64, "kernel": "triton", "chunk_sizes": (16, 4), "kept_tokens": (48, 24),
               "refresh_steps": (4, 2)}
HIP_DEV = RetrievalConfig(method="hip", budget=24, n_sink=4, n_window=32, options={**HIP_OPTIONS, "keys_on": "device"})
HIP_HOST = dataclasses.replace(HIP_DEV, options={**HIP_OPTIONS, "keys_on": "host"})


def _hip_state(s: Session, ids: bool = True):
    """A HiP row's search state: per layer its step, seen rows, budget, flags and masks (as lists;
    ids=False: their lengths, where queries of other GEMM shapes may break a near tie otherwise)."""
    out = []
    for layer, st in sorted(s.backend.retriever.state.items()):
        masks = [None if m is None else (m.tolist() if ids else m.numel()) for m in st.masks]
        out.append((layer, st.step, st.seen, st.budget, st.refreshed, masks))
    return out


def test_hip_rows_declare_a_captured_route(tiny):
    """HiP with the Triton stage kernels is captured, its keys on the device or read in place from
    the host tier; the torch search, extrapolate mode, a mask per KV head and scanned stages say why not."""
    assert captured_route(_fed(tiny, 80, 1, HIP_DEV).backend) is None
    host = _fed(tiny, 80, 1, HIP_HOST).backend
    assert host.indexes.attached and captured_route(host) is None
    torch_search = dataclasses.replace(HIP_DEV, options={**HIP_DEV.options, "kernel": "torch"})
    per_head = dataclasses.replace(HIP_DEV, options={**HIP_DEV.options, "heads": "kv"})
    scanned = dataclasses.replace(HIP_DEV, options={**HIP_DEV.options, "scan_stages": (1,)})
    for rcfg, word in ((torch_search, "torch"), (dataclasses.replace(HIP_DEV, position_mode="extrapolate"),
                                                 "extrapolate"), (per_head, "per KV head"),
                       (scanned, "scan_stages")):
        why = captured_route(_fed(tiny, 80, 1, rcfg).backend)
        assert why is not None and word in why, why


# keys_on=host (~60 s on a busy 2-core CPU) is slow: test_whole_stable.py holds that route's whole
# steps against each session alone (tokens, search state, logits), test_engine.py its segmented one
@pytest.mark.parametrize("rcfg", [HIP_DEV, pytest.param(HIP_HOST, marks=pytest.mark.slow)],
                         ids=["keys_on=device", "keys_on=host"])
def test_hip_whole_step_equals_segments_and_each_session_alone(tiny, rcfg):
    """HiP rows of 110 tokens (74 host rows: both stages search) and 50 (14: below the budget, every
    row selected), the first two steps ahead (another refresh phase; its layers staggered by one):
    3 greedy whole steps give the tokens of the segmented engine and of each session alone, the
    same search state (stage masks, seen rows, steps) and counters; logits within LOGIT_TOL."""
    lengths = [110, 50]
    alone, segmented, whole = ([_fed(tiny, n, seed, rcfg) for seed, n in enumerate(lengths)] for _ in range(3))
    for s in (alone[0], segmented[0], whole[0]):
        for t in range(2):
            s.step(30 + t)
    want = [_greedy_alone(s, 3) for s in alone]
    eng = Engine(tiny, graphs="whole")
    assert Engine(tiny, graphs="segments").generate(segmented, 3, stop_at_eos=False) == want
    assert eng.generate(whole, 3, stop_at_eos=False) == want
    assert eng.route_counts == {"whole": 3, "segments": 0, "eager": 0} and eng.last_route_why is None
    assert whole[0].backend.retriever.stats()["refreshes"][0] >= 2  # stage 1 ran inside the step
    for a, w in zip(alone, whole, strict=True):
        assert _counters(w) == _counters(a) and _hip_state(w) == _hip_state(a)
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL


def test_hip_and_dense_rows_join_and_leave_the_whole_step(tiny):
    """Two HiP rows and a dense row in buckets 4, 1, 2 (the HiP rows in other slots: their masks
    move), then a HiP row alone through the segmented engine (its masks, views of the step's
    buffer, detached and replaced) and back: every step's rows equal the sessions stepped alone,
    and the search state too."""
    specs = [(100, HIP_DEV), (40, DENSE), (90, HIP_DEV)]
    alone, whole = ([_fed(tiny, n, seed, r) for seed, (n, r) in enumerate(specs)] for _ in range(2))
    eng, seg = Engine(tiny, graphs="whole"), Engine(tiny, graphs="segments")
    for rows, tok, e in (([0, 1, 2], 5, eng), ([1], 9, eng), ([2, 0], 13, eng), ([0], 17, seg), ([0, 2], 21, eng)):
        got = e.step([(whole[i], tok + i) for i in rows])
        for j, i in enumerate(rows):
            assert _rel(got[j], alone[i].step(tok + i)) < LOGIT_TOL
    assert eng.route_counts["whole"] == 4
    for i in (0, 2):
        assert _counters(whole[i]) == _counters(alone[i]) and _hip_state(whole[i]) == _hip_state(alone[i])



@pytest.mark.parametrize("keys_on", ["device", pytest.param("host", marks=pytest.mark.slow)])
def test_z_rank_hip_rows_run_the_whole_step_equal_to_each_session_alone(tiny, keys_on):
    """A rank='z' (z-scored logits) row and a logit row in one whole step (run eagerly: the same
    code the graph holds): the z row's statistics copied into the step's buffers in the plan
    phase, q' and bias made inside the step; 2 greedy steps (the z row a step ahead: other
    refresh phases) give the tokens, search state, counters and logits of each session stepped
    alone (keys_on='host': the statistics made from the attached tier's rows)."""
    rcfg = dataclasses.replace(HIP_DEV, options={**HIP_OPTIONS, "keys_on": keys_on, "rank": "z"})
    logit = dataclasses.replace(HIP_DEV, options={**HIP_OPTIONS, "keys_on": keys_on})
    assert captured_route(_fed(tiny, 80, 1, rcfg).backend) is None
    specs = [(110, rcfg), (90, logit)]
    alone, whole = ([_fed(tiny, n, seed, r) for seed, (n, r) in enumerate(specs)] for _ in range(2))
    for s in (alone[0], whole[0]):
        s.step(30)
    want = [_greedy_alone(s, 2) for s in alone]
    eng = Engine(tiny, graphs="whole")
    assert eng.generate(whole, 2, stop_at_eos=False) == want
    assert eng.route_counts == {"whole": 2, "segments": 0, "eager": 0} and eng.last_route_why is None
    step = list(eng._wholes.values())[-1]
    assert step.shape.z and step.z_buffers.nbytes > 0
    for a, w in zip(alone, whole, strict=True):
        assert _counters(w) == _counters(a) and _hip_state(w) == _hip_state(a)
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL


def test_z_rank_whole_step_searches_z_scored_logits(tiny, monkeypatch):
    """A z row's whole step with its z flags cleared after the plan copied its statistics (the
    step then searches raw logits) leaves other stage masks than the step as planned: the
    equality above rests on the z numbers the step is given, not on both ranks picking alike."""
    from kvloft.runtime.whole_zrank import ZBuffers

    rcfg = dataclasses.replace(HIP_DEV, options={**HIP_OPTIONS, "rank": "z"})
    planned, cleared = (_fed(tiny, 110, 0, rcfg) for _ in range(2))
    Engine(tiny, graphs="whole").step([(planned, 5)])
    real = ZBuffers.fill
    monkeypatch.setattr(ZBuffers, "fill", lambda *args: real(*args) and 0)
    Engine(tiny, graphs="whole").step([(cleared, 5)])
    assert _hip_state(planned) != _hip_state(cleared)


def test_z_rank_statistics_follow_a_rolled_back_attached_tier(tiny):
    """keys_on='host' reads the host tier in place, so a rollback rebuilds no index there: the
    key statistics, which counted the failed call's rows, are remade from the tier at the next
    select, and the session goes on equal to a twin that never ran the call."""
    rcfg = dataclasses.replace(HIP_DEV, options={**HIP_OPTIONS, "keys_on": "host", "rank": "z"})
    s, twin = _fed(tiny, 100, 0, rcfg), _fed(tiny, 100, 0, rcfg)
    assert s.backend.indexes.attached
    mark = s._mark()
    for tok in (5, 6, 7):
        s.step(tok)
    s._rollback(mark)
    assert _rel(s.step(9), twin.step(9)) < LOGIT_TOL and _hip_state(s) == _hip_state(twin)
    assert sorted(s.backend.retriever.moments) == list(range(tiny.config.n_layers))
    for layer, m in s.backend.retriever.moments.items():
        want = twin.backend.retriever.moments[layer]
        assert m.count == want.count == s.backend.cache.layers[layer].n_host
        assert torch.allclose(m.mean, want.mean) and torch.allclose(m.m2, want.m2)


def test_a_failed_hip_whole_step_rolls_every_row_back(tiny):
    """A NaN row in a whole step of two HiP rows (the step rewrote masks in its buffer):
    both roll back (tokens, tiers, search state as marked) and go on equal to twins that never
    saw it, their restored masks copied into the step's buffer again."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=5)
    sessions, twins = ([_fed(model, n, seed, HIP_DEV) for seed, n in enumerate((100, 80))] for _ in range(2))
    eng = Engine(model, graphs="whole")
    eng.step([(sessions[0], 5), (sessions[1], 6)])  # masks in the step's buffer, the rows' state views of it
    for t, tok in zip(twins, (5, 6), strict=True):
        t.step(tok)
    before = [copy.deepcopy((_counters(s), _hip_state(s))) for s in sessions]  # stats hold live lists
    with torch.no_grad():
        model.net.embed_tokens.weight[7] = float("nan")
    with pytest.raises(NonFiniteError, match="pair 1"):
        eng.step([(sessions[0], 3), (sessions[1], 7)])
    assert eng.route_counts["whole"] == 2
    for s, (counters, state) in zip(sessions, before, strict=True):
        assert _counters(s) == counters and _hip_state(s) == state and s.backend.room_made == set()
    got = eng.step([(sessions[0], 3), (sessions[1], 4)])
    for b, (t, tok) in enumerate(zip(twins, (3, 4), strict=True)):
        assert _rel(got[b], t.step(tok)) < LOGIT_TOL
    assert all(_hip_state(s) == _hip_state(t) for s, t in zip(sessions, twins, strict=True))


# ---- bf16 on the CPU ---------------------------------------------------------------------------

# Triton 3.9's interpreter keeps a bf16 tile as its uint16 bits (numpy has no bf16) and its tl.dot
# multiplies those bits as integers: a 16x16 bf16 dot comes out ~4e9 (relative) off, fp16 and
# fp32 are right. Every attention launch of the whole step is such a dot, so a bf16 whole step
# under the interpreter gives logits ~1.5 (relative) off each session alone, whose CPU route is
# torch. The kernels are not at fault: with the dot widened (bf16_dot) attend_table_fixed's bf16
# error against an fp32 softmax is within 2x of a torch bf16 attention's (5.6e-3 and 3.3e-3 over
# 24 to 58 keys), and the step below holds its bound.
BF16_TOL = 2.0**-5  # relative norm: 8 units of bf16 roundoff (measured ~2u, ~4u with a swapped row)


@pytest.fixture
def bf16_dot(monkeypatch):
    """The interpreter's tl.dot with bf16 tiles widened to fp32 first: the same numbers exactly,
    whose products are exact in fp32, accumulated in fp32 (a GPU's bf16 tensor-core dot)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    real = interpreter.InterpreterBuilder.create_dot

    def widen(h):
        if h.dtype.scalar != tl.bfloat16:
            return h
        return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, *rest: real(self, widen(a), widen(b), *rest))


@pytest.mark.usefixtures("bf16_dot")
@pytest.mark.parametrize("tiered", [EXACT_DEV, HIP_DEV], ids=["exact", "hip"])
def test_bf16_whole_step_equals_each_session_alone(tiered):
    """bf16, a dense row between two tiered rows (exact or HiP, keys on the device; 55 and 22 host
    rows, budget 24): 2 teacher-forced whole steps against each session alone and against its fp32
    twin (the same weights widened): every row's logits within BF16_TOL of alone (a tiered row's
    top 24 may swap a near-tied row: its queries differ by bf16 rounding from the step's own
    attention); a dense row meets the flash-attention rule, its error against the fp32 twin at
    most 2x the session alone's."""
    model = load_model("tiny", device="cpu", dtype="bfloat16", seed=5)
    wide = dataclasses.replace(model, net=copy.deepcopy(model.net).float(), dtype=torch.float32)
    specs = [(90, tiered), (40, DENSE), (57, tiered)]
    alone, whole = ([_fed(model, n, seed, r) for seed, (n, r) in enumerate(specs)] for _ in range(2))
    ref = [_fed(wide, n, seed, r) for seed, (n, r) in enumerate(specs)]
    eng = Engine(model, graphs="whole")
    for step in range(2):
        toks = [(step * 31 + 7 * i) % 512 for i in range(3)]
        got = eng.step(list(zip(whole, toks, strict=True)))
        for b, (a, r, t) in enumerate(zip(alone, ref, toks, strict=True)):
            want, fp32 = a.step(t), r.step(t)
            assert _rel(got[b], want) < BF16_TOL, (step, b)
            if specs[b][1] is DENSE:
                assert _rel(got[b], fp32) <= 2 * _rel(want, fp32), (step, b)
    assert eng.route_counts == {"whole": 2, "segments": 0, "eager": 0}


# three stages as InfiniteHiP's, scaled to a few thousand host rows
HIP_CUDA_OPTIONS = {"chunk_sizes": (64, 16, 4), "kept_tokens": (1024, 768, 256), "refresh_steps": (8, 4, 2)}


@pytest.mark.gpu
@pytest.mark.parametrize("keys_on", ["device", "host"])
def test_cuda_hip_whole_step_equals_each_session_alone(keys_on):
    """fp32 on CUDA, HiP rows (keys on the device, or the host tier's pinned keys read in place;
    batched evictions of 64 moved down in the plan phase): 40 greedy captured steps over rows of
    2472, 700 and 200 host rows (the last below the budget of 256) equal each session stepped
    alone (its segmented graphs, its own search), search state and counters alike."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=512,
                           options={**HIP_CUDA_OPTIONS, "keys_on": keys_on})
    lengths = [3000, 700 + 528, 200 + 528]
    alone = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    whole = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    want = [_greedy_alone(s, 40) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 40, stop_at_eos=False) == want
    assert eng.route_counts["whole"] == 40 and all(w.graphs.held for w in eng._wholes.values())
    for a, w in zip(alone, whole, strict=True):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert _counters(w) == _counters(a) and _hip_state(w, ids=False) == _hip_state(a, ids=False)


@pytest.mark.gpu
def test_cuda_hip_stable_buffers_equal_each_session_alone():
    """fp32 on CUDA, HiP rows with keys read in place from the pinned host tier: 40 captured steps
    with each row's stable selection in the step's device buffers (runtime/whole_stable.py,
    copied where the last stage refreshes, fresh rows read in place) equal each session stepped
    alone; the buffers served the last step (no row read all in place) and hold the host rows of
    each row's current last mask."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=512,
                           options={**HIP_CUDA_OPTIONS, "keys_on": "host"})
    lengths = [3000, 2200 + 528]
    alone = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    whole = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    _greedy_alone(alone[1], 3)  # another refresh phase
    _greedy_alone(whole[1], 3)
    want = [_greedy_alone(s, 40) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 40, stop_at_eos=False) == want
    assert eng.route_counts["whole"] == 40 and eng.last_read_why is None
    stable = list(eng._wholes.values())[-1].exact.stable  # the step's last shape
    assert stable.nbytes > 0 and all(w.graphs.held for w in eng._wholes.values())
    for b, (a, w) in enumerate(zip(alone, whole, strict=True)):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert _hip_state(w, ids=False) == _hip_state(a, ids=False)
        for layer, st in w.backend.retriever.state.items():
            if stable.holds(b, layer, st):
                n = min(st.masks[-1].numel(), stable.width)
                parts = list(w.backend.cache.layers[layer].host_chunk_pairs())
                ids = st.masks[-1][:n].cpu()
                k = torch.cat([kc for _, kc, _ in parts])[ids]
                assert torch.equal(stable.k[layer, b, :n].cpu(), k)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", ["logit", "z"])
def test_captured_hip_whole_step_equals_the_same_step_eager(rank):
    """bf16 on CUDA, HiP rows of `rank` (rows 0 and 3), a logit HiP row and a dense row joining
    and leaving (their masks moving between slots and steps; rank='z': the statistics in fixed
    buffers, refreshed by the plan before each replay): each captured replay gives the logits of
    the same whole step run eagerly."""
    model = load_model("tiny", device="cuda", dtype="bfloat16", seed=5)
    logit = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=256,
                            options={**HIP_CUDA_OPTIONS, "keys_on": "host"})
    ranked = dataclasses.replace(logit, options={**logit.options, "rank": rank})
    specs = [(2000, ranked), (1100, DENSE), (400, logit), (1513, ranked)]
    g_eng, _, graphed, eager = _captured_equals_eager(model, specs, ([0, 1], [2], [0, 1, 2, 3], [3, 1],
                                                                     [0, 1, 2, 3], [2, 0, 3], [0, 2, 3]))
    assert g_eng.route_counts["whole"] == 7 and all(w.graphs.held for w in g_eng._wholes.values())
    assert any(getattr(w.shape, "z", False) for w in g_eng._wholes.values()) == (rank == "z")
    for i in (0, 2, 3):
        assert _hip_state(graphed[i], ids=False) == _hip_state(eager[i], ids=False)


@pytest.mark.gpu
@pytest.mark.parametrize("keys_on", ["device", "host"])
def test_cuda_z_rank_hip_whole_step_equals_each_session_alone(keys_on):
    """fp32 on CUDA, two rank='z' HiP rows and a logit row (the first a few steps ahead: other
    refresh phases): 40 greedy captured steps, q' and bias made inside the graph from the
    statistics the plan copies in each step, equal each session stepped alone: tokens, logits
    within LOGIT_TOL, search state and counters."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    z = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=512,
                        options={**HIP_CUDA_OPTIONS, "keys_on": keys_on, "rank": "z"})
    logit = dataclasses.replace(z, options={**HIP_CUDA_OPTIONS, "keys_on": keys_on})
    specs = [(3000, z), (1228, logit), (2200, z)]
    alone, whole = ([_fed(model, n, seed, r, CacheConfig()) for seed, (n, r) in enumerate(specs)] for _ in range(2))
    _greedy_alone(alone[0], 3)
    _greedy_alone(whole[0], 3)
    want = [_greedy_alone(s, 40) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 40, stop_at_eos=False) == want
    assert eng.route_counts["whole"] == 40 and all(w.graphs.held for w in eng._wholes.values())
    assert any(w.shape.z for w in eng._wholes.values())
    for a, w in zip(alone, whole, strict=True):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert _counters(w) == _counters(a) and _hip_state(w, ids=False) == _hip_state(a, ids=False)


@pytest.mark.gpu
@pytest.mark.parametrize("keys_on", ["device", "host"])
def test_cuda_hip_pattern_graphs_equal_each_session_alone(keys_on):
    """fp32 on CUDA, three HiP rows at three refresh phases (two decoded 3 and 5 steps alone
    first): 40 captured steps replay one graph per refresh pattern (several captured, none over
    the cap, no fallback) and equal each session stepped alone: tokens, logits within LOGIT_TOL,
    search state."""
    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=512,
                           options={**HIP_CUDA_OPTIONS, "keys_on": keys_on})
    lengths = [3000, 1228, 2200]
    alone = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    whole = [_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate(lengths)]
    for i, ahead in ((1, 3), (2, 5)):
        _greedy_alone(alone[i], ahead)
        _greedy_alone(whole[i], ahead)
    want = [_greedy_alone(s, 40) for s in alone]
    eng = Engine(model, graphs="whole")
    assert eng.generate(whole, 40, stop_at_eos=False) == want
    counts = eng.whole_graphs()
    assert eng.route_counts["whole"] == 40 and counts["patterns"] >= 3 and counts["captures"] >= 4
    assert counts["fallbacks"] == 0
    assert counts["held"] <= MAX_PATTERN_GRAPHS + 1
    for a, w in zip(alone, whole, strict=True):
        assert _rel(w.last_logits, a.last_logits) < LOGIT_TOL
        assert _hip_state(w, ids=False) == _hip_state(a, ids=False)


@pytest.mark.gpu
def test_captured_pattern_graphs_over_a_small_cap_equal_the_full_lru(monkeypatch):
    """fp32 on CUDA, two HiP rows at two refresh phases, 24 captured steps with an LRU of 2
    pattern graphs (patterns past it replay the graph of every stage; idle ones evicted, their
    memory back in the shared pool) against the default LRU: the same logits, step by step."""
    from kvloft.runtime import whole_graphs

    model = load_model("tiny", device="cuda", dtype="float32", seed=5)
    rcfg = RetrievalConfig(method="hip", budget=256, n_sink=16, n_window=512,
                           options={**HIP_CUDA_OPTIONS, "keys_on": "host"})
    full, small = ([_fed(model, n, seed, rcfg, CacheConfig()) for seed, n in enumerate((2500, 1800))]
                   for _ in range(2))
    for rows in (full, small):
        _greedy_alone(rows[1], 3)
    engines, logits = [], []
    for cap, rows in ((whole_graphs.MAX_PATTERN_GRAPHS, full), (2, small)):
        monkeypatch.setattr(whole_graphs, "MAX_PATTERN_GRAPHS", cap)  # read as each step is made
        engines.append(Engine(model, graphs="whole"))
        logits.append([engines[-1].step([(s, (step * 37 + 11 * b) % 512) for b, s in enumerate(rows)]).clone()
                       for step in range(24)])
    for got, want in zip(logits[1], logits[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    counts = [e.whole_graphs() for e in engines]
    assert counts[0]["fallbacks"] == 0 and counts[1]["fallbacks"] > 0 and counts[1]["captures"] >= 2
    assert all(len(w.graphs.patterns()) <= 2 for w in engines[1]._wholes.values())
