"""HiP's rank="z" option: the search kernel's per-head bias, the running key statistics, the
invariances z-scoring buys, a planted needle under a logit offset, and the batched search of
z rows (index/hip_batch.py) against each row's own select()."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import batch_search_key, make_retriever
from kvloft.index.key_moments import KeyMoments
from kvloft.kernels.checks import address_table
from kvloft.kernels.hip_batched import hip_stage_batched, hip_stage_batched_reference
from kvloft.kernels.hip_stage import hip_stage, hip_stage1, hip_stage1_reference, hip_stage_reference


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float) -> None:
    err = (got.float() - want.float()).abs()
    finite = torch.isfinite(want)
    assert torch.equal(torch.isfinite(got), finite)
    assert bool((err[finite] <= atol + 1e-5 * want[finite].abs()).all()), f"max error {err[finite].max():.3g}"


@pytest.mark.parametrize("chunk,probe", [(4, "first"), (8, "middle")])
def test_stage1_kernel_bias_matches_reference(chunk, probe):
    gen = torch.Generator().manual_seed(chunk)
    keys = torch.randn(97, 3, 59, generator=gen)  # D 59, 9 query heads over 3 KV heads, a partial chunk
    q = torch.randn(9, 59, generator=gen)
    bias = 5.0 * torch.randn(9, generator=gen)
    rep, score = hip_stage1(keys, q, chunk, probe, bias=bias)
    rep_ref, score_ref = hip_stage1_reference(keys, q, chunk, probe, bias=bias)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)
    # the bias changes what is searched: against the unbiased scores, not all equal
    assert not torch.equal(score_ref, hip_stage1_reference(keys, q, chunk, probe)[1])


@pytest.mark.parametrize("chunk,probe", [(4, "middle"), (8, "first")])
def test_gathered_stage_kernel_bias_matches_reference(chunk, probe):
    gen = torch.Generator().manual_seed(10 + chunk)
    chunks = [torch.randn(16, 3, 59, generator=gen) for _ in range(3)]
    q = torch.randn(9, 59, generator=gen)
    bias = 5.0 * torch.randn(9, generator=gen)
    cand = torch.full((-(-37 // chunk) * chunk,), -1, dtype=torch.long)  # a padded last chunk
    cand[:37] = torch.randperm(48, generator=gen)[:37]
    cand = cand.view(-1, chunk)
    rep, score = hip_stage(chunks, cand, q, probe, bias=bias)
    rep_ref, score_ref = hip_stage_reference(chunks, cand, q, probe, bias=bias)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)


def test_bias_off_is_bit_identical_to_no_bias():
    # a zero bias through the reference equals no bias; the kernel without a bias equals the
    # reference without one exactly where the bias path is off (HAS_BIAS constexpr)
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(64, 3, 59, generator=gen)
    q = torch.randn(9, 59, generator=gen)
    rep, score = hip_stage1(keys, q, 8, "first")
    rep0, score0 = hip_stage1(keys, q, 8, "first", bias=torch.zeros(9))
    assert torch.equal(rep, rep0) and torch.equal(score, score0)
    ref = hip_stage1_reference(keys, q, 8, "first")
    assert torch.equal(ref[1], hip_stage1_reference(keys, q, 8, "first", bias=torch.zeros(9))[1])


def test_bias_of_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match="bias must be"):
        hip_stage1(torch.randn(16, 3, 8), torch.randn(9, 8), 4, bias=torch.zeros(3))


# ---- the retriever: statistics, invariance, a needle under a logit offset, batches ----------

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
OPTS = {"chunk_sizes": (32, 8), "kept_tokens": (256, 64), "refresh_steps": (1, 1), "chunk_rows": 256}


def _hip(model=MODEL, **options):
    return make_retriever(RetrievalConfig(method="hip", options={**OPTS, **options}), model, "cpu")


def _topic_keys(n: int, gen: torch.Generator, hkv: int = HKV, seg: int = 32) -> torch.Tensor:
    """[H_kv, n, D]: segments of `seg` tokens sharing a topic vector, plus noise."""
    topics = torch.randn(-(-n // seg), hkv, D, generator=gen)
    keys = topics.repeat_interleave(seg, 0)[:n] + 0.3 * torch.randn(n, hkv, D, generator=gen)
    return keys.transpose(0, 1).contiguous()


def test_running_moments_equal_mean_and_cov_after_build_and_adds():
    gen = torch.Generator().manual_seed(0)
    keys = 3.0 * torch.randn(HKV, 300, D, generator=gen) + 100.0  # a large mean: no cancellation allowed
    hip = _hip(rank="z")
    hip.build(0, keys[:, :200], None)
    for a, b in ((200, 201), (201, 260), (260, 300)):  # one row, then batches
        hip.add(0, keys[:, a:b], torch.arange(a, b))
    m = hip.moments[0]
    assert m.count == 300
    for g in range(HKV):
        x = keys[g].double()  # [N, D]
        assert torch.allclose(m.mean[g], x.mean(0), rtol=0, atol=1e-10)
        assert torch.allclose(m.covariance()[g], torch.cov(x.T, correction=0), rtol=1e-10, atol=1e-9)


def test_zscore_gives_each_heads_logits_zero_mean_unit_std():
    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(500, HKV, D, generator=gen) + torch.randn(HKV, D, generator=gen) * 20
    m = KeyMoments(HKV, D, torch.device("cpu"))
    m.add(keys[:123])
    m.add(keys[123:])
    q = torch.randn(HQ, D, generator=gen)
    qz, bias = m.zscore(q)
    kv = torch.arange(HQ) // (HQ // HKV)
    z = torch.einsum("hd,nhd->nh", qz.double(), keys[:, kv].double()) - bias.double()  # [N, H_q]
    assert torch.allclose(z.mean(0), torch.zeros(HQ, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.std(0, correction=0), torch.ones(HQ, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_z_rank_ignores_a_kv_heads_offset_and_a_query_heads_scale(kernel):
    gen = torch.Generator().manual_seed(2)
    keys = _topic_keys(600, gen)
    q = torch.randn(HQ, D, generator=gen)
    shift = 30.0 * torch.nn.functional.normalize(q[3:6].mean(0), dim=0)  # raises KV head 1's logits
    keys2, q2 = keys.clone(), q.clone()
    keys2[1] += shift
    q2[7] *= 2.5

    def ids(rank, k, qq):
        hip = _hip(rank=rank, kernel=kernel)
        hip.build(0, k[:, :540], None)
        hip.add(0, k[:, 540:], torch.arange(540, 600))
        return hip.select(0, qq, budget=64).ids

    assert torch.equal(ids("z", keys, q), ids("z", keys2, q2))
    assert not torch.equal(ids("logit", keys, q), ids("logit", keys2, q2))


def _offset_needle_case(seed: int, n: int = 4096, start: int = 2080) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [2, n, D], q [4, D]: KV head 1's logits sit ~100 above KV head 0's (a shared key
    component its queries align with); a needle span of 32 rows at `start` in KV head 0."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, n, D, generator=gen)
    q = torch.randn(4, D, generator=gen)
    q[2:] = q[2] + 0.1 * torch.randn(2, D, generator=gen)  # KV head 1's two query heads alike
    offset = torch.nn.functional.normalize(q[2:].mean(0), dim=0)
    keys[1] += 100.0 / float(q[2:].mean(0).norm()) * offset  # +100 on KV head 1's logits
    needle = torch.nn.functional.normalize(q[:2].mean(0), dim=0)
    keys[0, start : start + 32] = 6.0 * needle + 0.3 * torch.randn(32, D, generator=gen)
    return keys, q


def test_z_rank_finds_a_needle_that_a_logit_offset_hides():
    """Under the raw max logit every chunk's KV head 1 noise outscores the needle, so stage 1
    keeps it only by chance (8 of 128 chunks: 1/16 expected); z-scored, it is the best chunk."""
    model = ModelConfig(name="two-kv", hidden_size=64, n_heads=4, n_kv_heads=2, head_dim=D, n_layers=1)
    found = {"logit": [], "z": []}
    for seed in range(4):
        keys, q = _offset_needle_case(seed)
        for rank, got in found.items():
            hip = _hip(model, rank=rank)
            hip.build(0, keys, None)
            ids = set(hip.select(0, q, budget=64).ids.tolist())
            got.append(len(ids & set(range(2080, 2112))) / 32)
    assert found["z"] == [1.0] * 4, found
    assert sum(found["logit"]) / 4 <= 0.25, found


def _same_selection(got, want, where) -> None:
    assert torch.equal(got.ids, want.ids), where
    assert (got.scanned, got.n_fresh, got.padded) == (want.scanned, want.n_fresh, want.padded), where
    assert (got.stable is None) == (want.stable is None), where
    assert got.stable is None or torch.equal(got.stable, want.stable), where


BATCH_OPTS = {"chunk_sizes": (16, 4), "kept_tokens": (64, 24), "refresh_steps": (2, 1), "chunk_rows": 64}


@pytest.mark.parametrize("kernel,ranks,lengths,steps,scan", [
    ("torch", ("z", "z", "logit", "z"), (700, 20, 333, 500), 6, ()),
    ("triton", ("z", "logit", "z", "z"), (100, 20, 70, 80), 3, ()),  # interpreted: small
    ("triton", ("z", "logit", "z", "z"), (100, 20, 70, 80), 3, (0, 1)),
], ids=["torch", "triton", "triton-scan01"])
def test_select_batch_of_z_rows_equals_each_row_alone(kernel, ranks, lengths, steps, scan):
    """rank='z' rows (and a logit row among them) searched together: every row's ids, stable part,
    fresh count and scanned keys equal its own select()'s, step by step with rows added between
    (the key statistics move), and so do its state and counters. The z rows do not pick what
    logit rows over the same keys pick (the bias is applied). scan: stages scoring every row
    (scan_stages), the bias applied to each row's score in the batched launch."""
    def rows(rank_of):
        gen = torch.Generator().manual_seed(5)
        out = []
        for rank, n in zip(rank_of, lengths, strict=True):
            hip = _hip(**BATCH_OPTS, rank=rank, kernel=kernel, scan_stages=scan)
            keys = _topic_keys(n, gen, seg=16)
            keys[1] += 4.0  # KV head 1's logits on another scale: z and logit ranks differ
            hip.build(0, keys, None)
            out.append(hip)
        return out

    alone, batched = rows(ranks), rows(ranks)
    logit = rows(("logit",) * len(ranks)) if kernel == "torch" else []  # (interpreted Triton: slow)
    assert len({batch_search_key(h) for h in batched}) == 1  # one search key for both ranks
    gen = torch.Generator().manual_seed(6)
    warm = torch.randn(HQ, D, generator=gen)
    for h in (alone[2], batched[2], *logit[2:3]):
        h.select(0, warm, 24)  # a step ahead in its refresh schedule
    budgets, differs = [24, 24, 24, 40], 0
    for step in range(steps):
        q = torch.randn(len(lengths), HQ, D, generator=gen)
        want = [h.select(0, q[g], budgets[g]) for g, h in enumerate(alone)]
        got = type(batched[0]).select_batch(batched, 0, q, budgets)
        plain = type(logit[0]).select_batch(logit, 0, q, budgets) if logit else got
        for g, (w, s) in enumerate(zip(want, got, strict=True)):
            _same_selection(s, w, (step, g))
            differs += ranks[g] == "z" and not torch.equal(s.ids, plain[g].ids)
        keys = torch.randn(HKV, 3, D, generator=gen) + 2.0
        for h in alone + batched + logit:
            h.add(0, keys, torch.arange(3))
    for a, b in zip(alone, batched, strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k, va in sa.items():
            assert torch.equal(va, sb[k]) if isinstance(va, torch.Tensor) else va == sb[k], k
        assert a.stats() == b.stats()
    assert differs > 0 or not logit


@pytest.mark.parametrize("chunk", [2, 8])
def test_batched_stage_kernel_bias_equals_each_rows_launch(chunk):
    """hip_stage_batched with a bias [G, H_q]: each row's (rep, score) equal its own hip_stage
    launch with its bias bit for bit; a row of bias 0 equals its launch without one."""
    gen = torch.Generator().manual_seed(20 + chunk)
    stores = [[torch.randn(16, 3, 59, generator=gen) for _ in range(n)] for n in (3, 1, 2)]
    table = torch.cat([address_table(s, torch.device("cpu")) for s in stores])
    q = torch.randn(3, 9, 59, generator=gen)
    bias = 5.0 * torch.randn(3, 9, generator=gen)
    bias[1] = 0.0
    n_chunks = [48 // chunk, 16 // chunk - 1, 32 // chunk]
    cols = max(n_chunks)
    meta = torch.tensor([n_chunks, [0, 3, 4], [16, 16, 16]])
    cand = torch.full((3, cols, chunk), -1)
    for g, m in enumerate(n_chunks):
        cand[g, :m] = torch.randperm(16 * len(stores[g]), generator=gen)[: m * chunk].view(m, chunk)
    for c in (None, cand):
        rep, score = hip_stage_batched(table, stores[0][0], q, meta, cols, chunk, c, "first", bias)
        for g, m in enumerate(n_chunks):
            rows = torch.arange(m * chunk).view(m, chunk) if c is None else c[g, :m]
            r1, s1 = hip_stage(stores[g], rows, q[g], "first", bias=bias[g] if g != 1 else None)
            assert torch.equal(rep[g, :m], r1) and torch.equal(score[g, :m], s1), g
        r2, s2 = hip_stage_batched_reference(stores, q, n_chunks, cols, chunk, c, "first", bias)
        assert torch.equal(rep, r2) and bool(torch.isclose(score, s2, atol=1e-4).all())
    with pytest.raises(ValueError, match="bias must be"):
        hip_stage_batched(table, stores[0][0], q, meta, cols, chunk, None, "first", bias[:, :3])


def test_bad_rank_is_rejected():
    with pytest.raises(ValueError, match=r"rank must be one of \('logit', 'z'\)"):
        _hip(rank="zscore")


@pytest.mark.gpu
def test_z_rank_kernel_and_torch_paths_agree_on_cuda():
    """rank='z' on CUDA: the Triton stages with the bias (bf16 keys, keys on the device and read
    in place from pinned host memory) pick what the torch search picks, up to near ties."""
    gen = torch.Generator().manual_seed(12)
    cfg = ModelConfig.from_name("llama3-8b")
    n = 2 * 16384 + 1000
    keys = (torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen) + 3.0).to(torch.bfloat16)
    q = torch.randn(cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
    ids = {}
    for name, opts in (("torch", {"kernel": "torch"}), ("device", {}), ("host", {"keys_on": "host"})):
        hip = make_retriever(RetrievalConfig(method="hip", options={"rank": "z", **opts}), cfg, "cuda")
        hip.build(0, keys, None)
        ids[name] = set(hip.select(0, q, budget=2048).ids.tolist())
    for name in ("device", "host"):
        assert len(ids[name] & ids["torch"]) >= 0.95 * 2048


@pytest.mark.gpu
@pytest.mark.parametrize("keys_on", ["device", "host"])
def test_cuda_z_rows_select_batch_equals_alone(keys_on):
    """rank='z' rows on CUDA (Llama-3-8B heads, bf16 keys with a per-KV-head offset, the Triton
    batched kernel with its bias; keys on the device or read in place from pinned host memory),
    three rows of different lengths, one under the budget and a logit row among them, 12 steps
    with rows added: every row's ids, scanned keys and state equal its own select()'s."""
    cfg = ModelConfig.from_name("llama3-8b")
    gen = torch.Generator().manual_seed(13)
    lengths, ranks = (2 * 16384 + 1000, 1500, 20000, 9000), ("z", "z", "z", "logit")
    keys = [(torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen)
             + 3.0 * torch.randn(cfg.n_kv_heads, 1, cfg.head_dim, generator=gen)).to(torch.bfloat16) for n in lengths]
    rows = {}
    for mode in ("alone", "batched"):
        rows[mode] = []
        for k, rank in zip(keys, ranks, strict=True):
            hip = make_retriever(RetrievalConfig(method="hip", options={"keys_on": keys_on, "rank": rank}), cfg, "cuda")
            hip.build(0, k, None)
            rows[mode].append(hip)
    for step in range(12):
        q = torch.randn(len(lengths), cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
        want = [h.select(0, q[g], 2048) for g, h in enumerate(rows["alone"])]
        got = type(rows["batched"][0]).select_batch(rows["batched"], 0, q, [2048] * len(lengths))
        for g, (w, s) in enumerate(zip(want, got, strict=True)):
            _same_selection(s, w, (step, g))
        new = torch.randn(cfg.n_kv_heads, 1, cfg.head_dim, generator=gen).to(torch.bfloat16)
        for h in rows["alone"] + rows["batched"]:
            h.add(0, new, torch.arange(1))
    for a, b in zip(rows["alone"], rows["batched"], strict=True):
        assert a.stats() == b.stats()
