"""HiP's batched search (index/hip_batch.py, kernels/hip_batched.py): the rows of a batched step
searched together get exactly the ids, state and counters each row's own select() gets."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import batch_search_key, make_retriever
from kvloft.index.hip import HipRetriever
from kvloft.kernels.checks import address_table
from kvloft.kernels.hip_batched import hip_stage_batched, hip_stage_batched_reference
from kvloft.kernels.hip_stage import hip_stage

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
OPTS = {"chunk_sizes": (32, 8, 4), "kept_tokens": (256, 64, 32), "refresh_steps": (4, 2, 1), "chunk_rows": 128}
BUDGET = 24


def _rows(lengths, seed, **options):
    """One HiP retriever per length, each over its own random keys (same seed: same keys)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        hip = make_retriever(RetrievalConfig(method="hip", options={**OPTS, **options}), MODEL, "cpu")
        hip.build(0, torch.randn(HKV, n, D, generator=gen), None)
        out.append(hip)
    return out


def _same_state(a: HipRetriever, b: HipRetriever) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, va in sa.items():
        assert torch.equal(va, sb[k]) if isinstance(va, torch.Tensor) else va == sb[k], k


SHORT = {"chunk_sizes": (16, 4), "kept_tokens": (64, 24), "refresh_steps": (2, 1), "chunk_rows": 64}
SHORT3 = {"chunk_sizes": (16, 8, 4), "kept_tokens": (64, 32, 24), "refresh_steps": (2, 2, 1),
          "chunk_rows": 64}
TORCH, TRITON = [900, 20, 333, 500], [100, 20, 70, 80]  # row lengths (Triton interpreted: small)


@pytest.mark.parametrize("options,lengths,steps", [
    ({"kernel": "torch"}, TORCH, 10),
    ({**SHORT, "kernel": "triton"}, TRITON, 3),
    ({"kernel": "torch", "scan_stages": (1,)}, TORCH, 10),
    ({"kernel": "torch", "scan_stages": (1, 2)}, TORCH, 10),
    ({"kernel": "torch", "scan_stages": (0,)}, TORCH, 10),
    ({**SHORT3, "kernel": "triton", "scan_stages": (1,)}, TRITON, 4),
    ({**SHORT3, "kernel": "triton", "scan_stages": (1, 2)}, TRITON, 4),
    ({**SHORT, "kernel": "triton", "scan_stages": (0,)}, TRITON, 3),
], ids=["torch", "triton", "torch-scan1", "torch-scan12", "torch-scan0", "triton-scan1", "triton-scan12",
        "triton-scan0"])
def test_select_batch_equals_each_row_alone(options, lengths, steps, monkeypatch):
    """Rows of several lengths, one under the budget (then over it as rows arrive), one a step
    ahead in its refresh cycle (so stages refresh for some rows and not others), one of another
    budget: over the steps, rows added between them, every row's ids, stable part, fresh count
    and scanned keys equal its own select()'s, and so do state and counters. With scan_stages,
    each scanned stage is searched in a batch of several rows at least once (the Triton path:
    the batched launch over chunks of one row)."""
    from kvloft.index import hip_batch
    from kvloft.kernels import hip_batched

    searched, chunks = [], []
    real_search, real_kernel = hip_batch._search, hip_batched.hip_stage_batched
    monkeypatch.setattr(hip_batch, "_search", lambda stage, rows, q: (searched.append(stage),
                                                                       real_search(stage, rows, q))[1])
    monkeypatch.setattr(hip_batched, "hip_stage_batched", lambda *a, **kw: (chunks.append(a[5]),
                                                                             real_kernel(*a, **kw))[1])
    alone, batched = _rows(lengths, 1, **options), _rows(lengths, 1, **options)
    assert len({batch_search_key(h) for h in batched}) == 1
    gen = torch.Generator().manual_seed(2)
    warm = torch.randn(HQ, D, generator=gen)
    alone[2].select(0, warm, BUDGET)  # row 2 one step ahead in its refresh schedule
    batched[2].select(0, warm, BUDGET)
    budgets = [BUDGET, BUDGET, BUDGET, 40]
    for step in range(steps):
        q = torch.randn(len(lengths), HQ, D, generator=gen)
        want = [h.select(0, q[g], budgets[g]) for g, h in enumerate(alone)]
        got = HipRetriever.select_batch(batched, 0, q, budgets)
        for g, (w, s) in enumerate(zip(want, got, strict=True)):
            assert torch.equal(s.ids, w.ids), (step, g)
            assert (s.scanned, s.n_fresh, s.padded) == (w.scanned, w.n_fresh, w.padded), (step, g)
            assert (s.stable is None) == (w.stable is None)
            assert s.stable is None or torch.equal(s.stable, w.stable)
        keys = torch.randn(HKV, 3, D, generator=gen)
        for h in alone + batched:
            h.add(0, keys, torch.arange(3))
    for a, b in zip(alone, batched, strict=True):
        _same_state(a, b)
        assert a.stats() == b.stats()
    assert alone[1].stats()["selected"] < alone[0].stats()["selected"]  # the short row took all it had
    scan = options.get("scan_stages", ())
    assert set(scan) <= set(searched)
    assert (1 in chunks) == (options["kernel"] == "triton" and bool(scan))


def test_select_batch_refuses_mixed_keys_and_bad_rows():
    """Rows of different search keys (probe, which stages scan) are refused, not searched alike."""
    a = _rows([300], 3)[0]
    q = torch.randn(2, HQ, D)
    for other in ({"probe": "middle"}, {"scan_stages": (1,)}):
        b = _rows([300], 3, **other)[0]
        assert batch_search_key(b) is not None and batch_search_key(b) != batch_search_key(a)
        with pytest.raises(ValueError, match="search keys"):
            HipRetriever.select_batch([a, b], 0, q, [BUDGET, BUDGET])
    scan1, scan12 = _rows([300], 3, scan_stages=(1,))[0], _rows([300], 3, scan_stages=(1, 2))[0]
    assert batch_search_key(scan1) != batch_search_key(scan12)
    with pytest.raises(ValueError, match="search keys"):
        HipRetriever.select_batch([scan1, scan12], 0, q, [BUDGET, BUDGET])
    with pytest.raises(ValueError, match="one retriever and budget per query row"):
        HipRetriever.select_batch([a], 0, q, [BUDGET, BUDGET])
    with pytest.raises(ValueError, match="q must be"):
        HipRetriever.select_batch([a, a], 0, torch.randn(2, HQ, D + 1), [BUDGET, BUDGET])


def _stores(gen):
    """Three stores of 16-row chunks [16, 3, 59] (3, 1 and 2 chunks) and their address table."""
    stores = [[torch.randn(16, 3, 59, generator=gen) for _ in range(n)] for n in (3, 1, 2)]
    table = torch.cat([address_table(s, torch.device("cpu")) for s in stores])
    return stores, table, [0, 3, 4]


@pytest.mark.parametrize("chunk,probe", [(1, "first"), (4, "first"), (8, "middle")])
def test_batched_stage_kernel_equals_each_rows_launch(chunk, probe):
    """D 59, 9 heads over 3, rows of different chunk counts: each row's (rep, score) equal its own
    hip_stage launch bit for bit, -1 / -inf past its chunks; close to the torch twin."""
    gen = torch.Generator().manual_seed(chunk)
    stores, table, offsets = _stores(gen)
    q = torch.randn(3, 9, 59, generator=gen)
    n_chunks = [48 // chunk, 16 // chunk - 1, 32 // chunk]
    cols = max(n_chunks)
    meta = torch.tensor([n_chunks, offsets, [16, 16, 16]])
    cand = torch.full((3, cols + 1, chunk), -1)  # one spare column: cand may be wider than n_cols
    for g, m in enumerate(n_chunks):
        cand[g, :m] = torch.randperm(16 * len(stores[g]), generator=gen)[: m * chunk].view(m, chunk)
    for c in (None, cand):  # stage 1 (rows in order) and a later stage (candidate lists)
        rep, score = hip_stage_batched(table, stores[0][0], q, meta, cols, chunk, c, probe)
        for g, m in enumerate(n_chunks):
            rows = torch.arange(m * chunk).view(m, chunk) if c is None else c[g, :m]
            r1, s1 = hip_stage(stores[g], rows, q[g], probe)
            assert torch.equal(rep[g, :m], r1) and torch.equal(score[g, :m], s1)
            assert bool((rep[g, m:] == -1).all()) and bool((score[g, m:] == float("-inf")).all())
        r2, s2 = hip_stage_batched_reference(stores, q, n_chunks, cols, chunk, c, probe)
        assert torch.equal(rep, r2) and bool(torch.isclose(score, s2, atol=1e-4).all())


def test_batched_stage_kernel_checks_its_arguments():
    stores, table, _ = _stores(torch.Generator().manual_seed(0))
    q = torch.randn(3, 9, 59)
    with pytest.raises(ValueError, match="meta must be"):
        hip_stage_batched(table, stores[0][0], q, torch.zeros(2, 3, dtype=torch.long), 2, 4)
    with pytest.raises(ValueError, match="cand must be"):
        hip_stage_batched(table, stores[0][0], q, torch.zeros(3, 3, dtype=torch.long), 2, 4,
                          cand=torch.zeros(3, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="power of two"):
        hip_stage_batched(table, stores[0][0], q, torch.zeros(3, 3, dtype=torch.long), 2, 6)


@pytest.mark.gpu
def test_cuda_host_keys_select_batch_equals_alone():
    """keys_on="host" on CUDA (pinned keys read through the address tables), Llama-3-8B heads,
    bf16, three rows of different lengths incl. one under the budget, 20 steps."""
    cfg = ModelConfig.from_name("llama3-8b")
    gen = torch.Generator().manual_seed(11)
    lengths = (3 * 16384 + 1000, 1500, 20000)
    keys = [torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen).to(torch.bfloat16) for n in lengths]
    rows = {}
    for mode in ("alone", "batched"):
        rows[mode] = []
        for k in keys:
            hip = make_retriever(RetrievalConfig(method="hip", options={"keys_on": "host"}), cfg, "cuda")
            hip.build(0, k, None)
            rows[mode].append(hip)
    for step in range(20):
        q = torch.randn(len(lengths), cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
        want = [h.select(0, q[g], 2048) for g, h in enumerate(rows["alone"])]
        got = HipRetriever.select_batch(rows["batched"], 0, q, [2048] * len(lengths))
        for w, s in zip(want, got, strict=True):
            assert torch.equal(w.ids, s.ids), step
        new = torch.randn(cfg.n_kv_heads, 1, cfg.head_dim, generator=gen).to(torch.bfloat16)
        for h in rows["alone"] + rows["batched"]:
            h.add(0, new, torch.arange(1))


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvloft.kernels.hip_kernel import hip_search_kernel

sig = {n: "*i64" for n in ("table_ptr", "cand_ptr", "meta_ptr", "rep_ptr")}
sig |= {"k_ptr": "*bf16", "q_ptr": "*bf16", "score_ptr": "*fp32"}
sig |= {n: "i32" for n in ("n_cols", "n_group", "n_rows", "chunk_rows", "stride_cg", "stride_cc", "stride_kn",
                           "stride_kh")}
for implicit, table, per_row, bias in ((1, 0, 0, 0), (0, 1, 0, 0), (0, 1, 1, 0), (1, 1, 1, 0), (1, 0, 0, 1),
                                      (0, 1, 0, 1)):
    const = dict(H_Q=9, GROUP=3, D=59, BLOCK_H=16, BLOCK_D=64, CHUNK=4, LOG2_CHUNK=2, MIDDLE=True,
                 IMPLICIT=bool(implicit), TABLE=bool(table), PER_ROW=bool(per_row), HAS_BIAS=bool(bias))
    if not bias:  # a launch without a bias passes bias_ptr=None (a constexpr)
        const["bias_ptr"] = None
    const |= {"scale_ptr": None, "CODES": 0, "ROUND": 0}  # model-dtype rows (8-bit ones: tests/index/test_hip_8bit.py)
    full = sig | dict.fromkeys(const, "constexpr") | ({"bias_ptr": "*fp32"} if bias else {})
    triton.compile(ASTSource(hip_search_kernel, full, const), target=GPUTarget("cuda", 90, 32))
"""


def test_search_kernel_compiles_for_cuda():
    """Every launch mode of the search kernel (hip_stage1, hip_stage, hip_stage_batched with and
    without candidate lists; the per-row launches with and without a bias) compiles for sm_90. The interpreter runs Python, so it accepts code
    the compiler rejects: a constexpr branch that returns early still has the rest compiled."""
    import os
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE_SM90], check=False, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
