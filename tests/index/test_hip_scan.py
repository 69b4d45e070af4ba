"""HiP stages that score every row of their chunks (hip option scan_stages): the chunk scores
against a brute-force max over each chunk's rows on a planted needle the probe search misses
(torch, Triton through the interpreter, an 8-bit host tier read in place), the needle kept by
select (alone and batched), a session against dense attention where the budget covers the context,
validation."""

from __future__ import annotations

import pytest
import torch

from kvloft import CacheConfig, RetrievalConfig, RuntimeConfig, Session, load_model
from kvloft.config import ModelConfig
from kvloft.eval.methods import parse_method
from kvloft.index.base import batch_search_key, make_retriever
from kvloft.index.hip_params import HipParams
from kvloft.kernels.rowquant import dequantize_rows, quantize_rows
from kvloft.tiers.kvcache import TieredKVCache

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
SMALL = {"chunk_sizes": (64, 16, 4), "kept_tokens": (256, 64, 16), "refresh_steps": (4, 2, 1), "chunk_rows": 256}
N, L1, NEEDLE = 512, 16, 16 * 20 + 5  # the needle: row 5 of stage 2's chunk 20, never a probe of it


def _hip(**options):
    return make_retriever(RetrievalConfig(method="hip", options={**SMALL, **options}), MODEL, "cpu")


def _planted(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [N, H_kv, D], q [H_q, D]: noise rows, one needle row (logit ~ +8 |q|) at NEEDLE; the
    rest of its chunk of L1 rows points away from q, row 0 (a first-halving probe, probe "first")
    furthest, so the search goes right, never reaches the needle and scores the chunk last."""
    q = torch.randn(HQ, D, generator=gen)
    u = torch.nn.functional.normalize(q.view(HKV, HQ // HKV, D).mean(1), dim=-1)  # [H_kv, D]
    keys = 0.5 * torch.randn(N, HKV, D, generator=gen)
    base = NEEDLE - 5
    keys[base : base + L1] = -5.0 * u + 0.05 * torch.randn(L1, HKV, D, generator=gen)
    keys[base] = -6.0 * u
    keys[NEEDLE] = 8.0 * u
    return keys, q


def _brute(keys: torch.Tensor, q: torch.Tensor, length: int) -> torch.Tensor:
    """Max over each chunk's rows of the max over query heads of q_h · k: [N // length] fp32."""
    logits = torch.einsum("nhd,hgd->nhg", keys.float(), q.float().view(HKV, HQ // HKV, D))
    return logits.amax(dim=(1, 2)).view(-1, length).amax(dim=1)


def _scores(hip, keys: torch.Tensor, q: torch.Tensor, stage: int = 1) -> torch.Tensor:
    hip.build(0, keys.transpose(0, 1).contiguous(), None)
    chunks = torch.arange(N).view(-1, SMALL["chunk_sizes"][stage])
    return hip._stage_scores(stage, hip._keys_of(0), q, chunks)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_scanned_stage_ranks_chunks_as_brute_force(kernel):
    keys, q = _planted(torch.Generator().manual_seed(1))
    want = _brute(keys, q, L1)
    got = _scores(_hip(scan_stages=(1,), kernel=kernel), keys, q)
    assert torch.allclose(got, want, atol=1e-4)
    order = torch.sort(got, descending=True, stable=True).indices
    assert torch.equal(order, torch.sort(want, descending=True, stable=True).indices)
    assert int(order[0]) == NEEDLE // L1
    probed = _scores(_hip(kernel=kernel), keys, q)  # the probe search misses it
    rank = int((probed > probed[NEEDLE // L1]).sum())
    assert rank >= N // L1 - 2, f"the probe search ranks the needle's chunk {rank}"


def test_scanned_stage_over_8bit_host_tier_matches_dequantized_rows():
    """keys_on='host' over an fp8 tier: rows read in place (torch: dequantized by the tier),
    scores equal to brute force over the dequantized keys."""
    keys, q = _planted(torch.Generator().manual_seed(2))
    kv = TieredKVCache(MODEL, n_sink=0, n_window=1, host_chunk=256, device=torch.device("cpu"),
                       dtype=keys.dtype, host_dtype="fp8")
    t = kv[0]
    t.append(torch.cat([keys, keys[:1]]), torch.cat([keys, keys[:1]]), torch.arange(N + 1))
    for kernel in ("torch", "triton"):
        hip = _hip(scan_stages=1, keys_on="host", kernel=kernel)
        assert hip.attach_host_tier(0, t)
        got = hip._stage_scores(1, hip._keys_of(0), q, torch.arange(N).view(-1, L1))
        deq = dequantize_rows(*quantize_rows(keys, "fp8"), "fp8", keys.dtype)
        assert torch.allclose(got, _brute(deq, q, L1), atol=1e-4), kernel


def test_select_keeps_the_needle_only_with_the_scan():
    """Stage 2 scanned (stage 1 keeps every row: kept 512): the needle row is selected at a
    budget of 16 rows; the probe search drops it."""
    keys, q = _planted(torch.Generator().manual_seed(3))
    opts = {"kept_tokens": (512, 64, 16)}
    got = {}
    for scan in ((), (1,), (1, 2)):
        hip = _hip(scan_stages=scan, **opts)
        hip.build(0, keys.transpose(0, 1).contiguous(), None)
        got[scan] = hip.select(0, q, budget=16)
    assert NEEDLE not in got[()].ids.tolist()
    assert NEEDLE in got[(1,)].ids.tolist() and NEEDLE in got[(1, 2)].ids.tolist()
    assert got[(1,)].scanned > got[()].scanned  # every row of stage 2's 512 candidates read


def test_session_with_scan_and_budget_covering_context_equals_dense():
    """The budget-covers-context contract holds with the option set: there every host row is
    selected and no stage runs, so this checks the option's path through a session, not the
    scan (test_select_keeps_the_needle_only_with_the_scan and test_engine.py's scanning row,
    budget 24 over 1,100 tokens, run the scanned stages)."""
    model = load_model("tiny", device="cpu", dtype="float32", seed=3)
    prompt = torch.randint(0, model.config.vocab_size, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    logits = {}
    for method, opts in (("dense", {}), ("hip", {**SMALL, "chunk_sizes": (16, 8, 4), "chunk_rows": 32,
                                                  "scan_stages": (1, 2)})):
        rcfg = RetrievalConfig(method=method, budget=4096, n_sink=4, n_window=16, options=opts)
        s = Session(model, rcfg, RuntimeConfig(prefill_chunk=64, progress=False, kernels="reference"),
                    CacheConfig(host_chunk_tokens=32, evict_batch=8))
        s.feed(prompt)
        logits[method] = torch.stack([s.step(t) for t in (5, 6, 7)])
    assert torch.allclose(logits["hip"], logits["dense"], atol=1e-4)


def test_scan_rows_search_batched_by_their_own_key():
    """A scan row has a search key of its own (not a probe-search row's, not another scan_stages'),
    and select_batch over two scan rows (512 and 448 rows) keeps the needle and equals each row's
    select() (tests/index/test_hip_batch.py: longer runs of the batched scan against each row alone)."""
    keys, q = _planted(torch.Generator().manual_seed(3))
    opts = {"kept_tokens": (512, 64, 16)}

    def rows(scan):
        out = [_hip(scan_stages=scan, **opts) for _ in range(2)]
        for hip, n in zip(out, (N, N - 64), strict=True):
            hip.build(0, keys[:n].transpose(0, 1).contiguous(), None)
        return out

    search_keys = {batch_search_key(rows(scan)[0]) for scan in ((), (1,), (1, 2))}
    assert len(search_keys) == 3 and None not in search_keys
    alone, batched = rows((1,)), rows((1,))
    want = [h.select(0, q, 16) for h in alone]
    got = type(batched[0]).select_batch(batched, 0, torch.stack([q, q]), [16, 16])
    for w, s in zip(want, got, strict=True):
        assert torch.equal(s.ids, w.ids) and s.scanned == w.scanned
        assert NEEDLE in s.ids.tolist()


@pytest.mark.parametrize("value,want", [((), ()), (1, (1,)), ([2, 1, 2], (1, 2)), ("0,2", (0, 2)), ("1/2", (1, 2))])
def test_scan_stages_spellings(value, want):
    assert HipParams(scan_stages=value).scan_stages == want


def test_scan_stages_through_a_method_spec():
    name, options, _ = parse_method("hip:scan_stages=1/2")
    assert name == "hip" and _hip(**options).params.scan_stages == (1, 2)


@pytest.mark.parametrize("value,match", [((3,), "indices in 0..2"), ((-1,), "indices in 0..2"),
                                         ("one", "scan_stages=1"), ((1.0,), "stage indices"), ((True,), "stage indices")])
def test_scan_stages_validation(value, match):
    with pytest.raises(ValueError, match=match):
        HipParams(scan_stages=value)
