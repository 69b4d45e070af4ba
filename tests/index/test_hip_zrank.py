"""HiP's rank="z" option: the search kernel's per-head bias, the running key statistics, the
invariances z-scoring buys, a planted needle under a logit offset, and the paths that decline it."""

from __future__ import annotations

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import batch_search_key, make_retriever
from kvloft.index.key_moments import KeyMoments
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


# ---- the retriever: statistics, invariance, a needle under a logit offset, declines ---------

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


def test_batched_search_declines_z_rank_rows():
    gen = torch.Generator().manual_seed(4)
    rows = [_hip(rank="z"), _hip(rank="z")]
    for h in rows:
        h.build(0, _topic_keys(500, gen), None)
    assert batch_search_key(rows[0]) is None  # the step plan then searches each row alone
    assert batch_search_key(_hip()) is not None
    with pytest.raises(ValueError, match="rank='z'"):
        type(rows[0]).select_batch(rows, 0, torch.randn(2, HQ, D), [64, 64])


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
