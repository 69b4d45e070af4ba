"""HiP retriever: dense identity, the algorithm against a loop reference, needles, refresh, options."""

from __future__ import annotations

import math

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever
from kvloft.index.hip_params import HipParams
from kvloft.kernels import reference
from kvloft.kernels.hip_stage import hip_stage, hip_stage1, hip_stage1_reference, hip_stage_reference

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
SMALL = {"chunk_sizes": (64, 16, 4), "kept_tokens": (1024, 256, 64), "refresh_steps": (8, 4, 2),
         "chunk_rows": 1024}


def _hip(**options):
    opts = {**SMALL, **options}
    return make_retriever(RetrievalConfig(method="hip", options=opts), MODEL, "cpu")


def _assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float = 1e-5) -> None:
    # (torch.testing.assert_close imports torch.distributed on first use: seconds on this CPU)
    err = (got.float() - want.float()).abs()
    bound = atol + rtol * want.float().abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g} over the bound"


def _topic_keys(n: int, gen: torch.Generator, seg: int = 32) -> torch.Tensor:
    """[H_kv, n, D]: segments of `seg` tokens sharing a topic vector, plus noise (local smoothness)."""
    n_seg = -(-n // seg)
    topics = torch.randn(n_seg, HKV, D, generator=gen)
    keys = topics.repeat_interleave(seg, 0)[:n] + 0.3 * torch.randn(n, HKV, D, generator=gen)
    return keys.transpose(0, 1).contiguous()


def _plant(keys: torch.Tensor, start: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Plant a needle span in keys [H_kv, N, D]; returns the query [H_q, D] that seeks it."""
    direction = torch.nn.functional.normalize(torch.randn(HKV, D, generator=gen), dim=-1)
    keys[:, start : start + length] = 4.0 * direction[:, None] + 0.3 * torch.randn(HKV, length, D, generator=gen)
    return 3.0 * direction.repeat_interleave(HQ // HKV, 0) + 0.3 * torch.randn(HQ, D, generator=gen)


def test_budget_covering_host_tier_equals_dense_attention():
    gen = torch.Generator().manual_seed(1)
    n_sink, n_window, n_total = 4, 32, 331
    k = torch.randn(n_total, HKV, D, generator=gen)
    v = torch.randn(n_total, HKV, D, generator=gen)
    q = torch.randn(HQ, D, generator=gen)
    host = slice(n_sink, n_total - n_window)
    hip = _hip()
    hip.build(0, k[n_sink:250].transpose(0, 1), None)  # prefill host tier, then decode adds the rest
    hip.add(0, k[250 : host.stop].transpose(0, 1), torch.arange(250, host.stop))
    sel = hip.select(0, q, budget=4096)
    assert sel.shared and torch.equal(torch.sort(sel.ids).values, torch.arange(host.stop - n_sink))
    static = torch.cat([k[:n_sink], k[host.stop :]]), torch.cat([v[:n_sink], v[host.stop :]])
    scale = D**-0.5
    o_s, l_s = reference.decode_attend(q, *static, scale=scale)
    o_r, l_r = reference.gather_attend(q, k[host], v[host], sel.ids, scale=scale)
    out, lse = reference.merge([o_s, o_r], [l_s, l_r])
    want, want_lse = reference.decode_attend(q, k, v, scale=scale)
    _assert_close(out, want, 1e-5)
    _assert_close(lse, want_lse, 1e-5)


def _loop_reference(keys: torch.Tensor, q: torch.Tensor, p: HipParams, budget: int) -> tuple[set[int], int]:
    """The multi-stage search written chunk by chunk in Python. keys [N, H_kv, D].

    Each stage searches the whole chunks of l_c candidates; the len % l_c left over are kept.
    Returns (selected rows, probe slots: 2 * log2(l_c) per chunk searched, 1 if l_c == 1).
    """
    def score(j: int) -> float:
        return max(float(q[h] @ keys[j, h // (HQ // HKV)]) for h in range(HQ))

    cand, slots = list(range(keys.shape[0])), 0
    for i, length in enumerate(p.chunk_sizes):
        kept = budget if i == p.n_stages - 1 else max(p.kept_tokens[i], budget)
        if len(cand) <= kept:
            continue
        n_full = len(cand) // length
        chunks = [cand[j : j + length] for j in range(0, n_full * length, length)]
        rest = cand[n_full * length :]
        slots += len(chunks) * (2 * int(math.log2(length)) if length > 1 else 1)
        scores = []
        for ch in chunks:
            lo, span, best = 0, length, score(ch[0]) if length == 1 else None
            while span > 1:
                half = span // 2
                off = 0 if p.probe == "first" else half // 2
                left = score(ch[lo + off]) if lo + off < len(ch) else -math.inf
                right = score(ch[lo + half + off]) if lo + half + off < len(ch) else -math.inf
                lo, best = (lo + half, right) if right > left else (lo, left)
                span = half
            scores.append(best)
        order = sorted(range(len(chunks)), key=lambda c: -scores[c])[: max(kept // length, 1)]
        kept_rows = [x for c in order for x in chunks[c]] + rest  # best chunk first, the rest last
        cand = kept_rows[:budget] if i == p.n_stages - 1 else sorted(kept_rows)
    return set(cand), slots


@pytest.mark.parametrize("probe", ["first", "middle"])
def test_stages_match_loop_reference(probe):
    gen = torch.Generator().manual_seed(2)
    n = 1500  # 1.46 store chunks: stage 1 crosses a chunk boundary and ends in a partial chunk
    keys = _topic_keys(n, gen)
    q = torch.randn(HQ, D, generator=gen)
    opts = {"chunk_sizes": (64, 8, 2), "kept_tokens": (512, 128, 32), "refresh_steps": (1, 1, 1),
            "chunk_rows": 1024, "probe": probe}
    hip = _hip(**opts)
    hip.build(0, keys, None)
    budget = 40
    sel = hip.select(0, q, budget)
    assert sel.ids.numel() <= budget and len(set(sel.ids.tolist())) == sel.ids.numel()
    want, slots = _loop_reference(keys.transpose(0, 1), q, hip.params, budget)
    assert set(sel.ids.tolist()) == want
    assert sel.scanned == slots * HKV  # each probe reads a row of H_kv key vectors


@pytest.mark.parametrize("start", [5, 1410, 2071, 4060])
def test_planted_needle_span_is_selected(start):
    # HiP assumes attention locality: a needle is visible to stage 1 when it covers a probe
    # position, guaranteed for a span of l_c / 2 = 32 rows inside one stage-1 chunk.
    gen = torch.Generator().manual_seed(start)
    n, length = 4096, 32
    keys = _topic_keys(n, gen)
    q = _plant(keys, start, length, gen)
    hip = _hip()
    hip.build(0, keys, None)
    sel = hip.select(0, q, budget=64)
    got = set(sel.ids.tolist())
    needle = set(range(start, min(start + length, n)))
    # Probes read the first key of each half, so a later-stage chunk holding only the needle's
    # first rows, past its last probe, is lost: fewer than l_c / 2 = 8 rows (stage 2), never more.
    missed = needle - got
    assert missed <= set(range(start, start + 7)), f"missed needle rows {sorted(missed)}"
    assert sel.scanned < n * HKV  # fewer key reads than one exact pass


def _expected_flags(step: int, every: tuple[int, ...]) -> tuple[bool, ...]:
    flags, cascade = [], False
    for e in every:
        cascade = cascade or step % e == 0
        flags.append(cascade)
    return tuple(flags)


@pytest.mark.parametrize("every", [(8, 4, 2), (6, 4, 1)])
def test_masks_refresh_exactly_at_their_steps(every):
    gen = torch.Generator().manual_seed(3)
    keys = _topic_keys(4096, gen)
    q_a = _plant(keys, 320, 32, gen)  # needles aligned to chunks: found whole
    q_b = _plant(keys, 3520, 32, gen)
    hip = _hip(refresh_steps=every)
    hip.build(0, keys, None)
    hip.build(1, keys.clone(), None)
    prev_masks, prev_ids = None, None
    for step in range(25):
        q = q_a if step < 13 else q_b  # the query moves to the other needle at step 13
        sel = hip.select(0, q, budget=64)
        st = hip.state[0]
        assert st.refreshed == _expected_flags(step, every), step
        if prev_masks is not None:
            for i, refreshed in enumerate(st.refreshed):
                assert (st.masks[i] is not prev_masks[i]) == refreshed, (step, i)
        if not any(st.refreshed):  # nothing recomputed: the new query changes nothing
            assert torch.equal(sel.ids, prev_ids) and sel.scanned == 0, step
        else:
            assert sel.scanned > 0
        if step == 0:
            assert set(range(320, 352)) <= set(sel.ids.tolist())
        if step == 24:  # every stage has been recomputed for q_b by now
            assert set(range(3520, 3552)) <= set(sel.ids.tolist())
        prev_masks, prev_ids = list(st.masks), sel.ids
    assert hip.stats()["refreshes"] == [sum(_expected_flags(s, every)[i] for s in range(25)) for i in range(3)]
    assert hip.state[1].step == 0  # steps are counted per layer


def test_rows_added_between_refreshes_are_selected():
    gen = torch.Generator().manual_seed(4)
    keys = _topic_keys(2048, gen)
    q = torch.randn(HQ, D, generator=gen)
    hip = _hip()
    hip.build(0, keys, None)
    hip.select(0, q, budget=64)  # step 0: every stage runs
    new = torch.randn(HKV, 3, D, generator=gen)
    hip.add(0, new, torch.arange(3))
    sel = hip.select(0, q, budget=64)  # step 1: no stage refreshes with (8, 4, 2)
    assert hip.state[0].refreshed == (False, False, False)
    assert sel.scanned == 0
    assert sel.ids[:3].tolist() == [2048, 2049, 2050] and sel.ids.numel() == 64


def test_kernels_match_torch_path_in_retriever():
    gen = torch.Generator().manual_seed(5)
    keys = _topic_keys(300, gen)  # 3 store chunks of 128 rows: stage 2 reads across chunks
    q = torch.randn(HQ, D, generator=gen)
    opts = {"chunk_sizes": (32, 8), "kept_tokens": (128, 32), "refresh_steps": (1, 1), "chunk_rows": 128}
    ids = []
    for kernel in ("torch", "triton"):
        hip = _hip(**opts, kernel=kernel)
        hip.build(0, keys, None)
        ids.append(hip.select(0, q, budget=32).ids)
    assert torch.equal(ids[0], ids[1])


@pytest.mark.parametrize("chunk,probe", [(1, "first"), (8, "first"), (16, "middle")])
def test_stage1_kernel_matches_reference_awkward_shapes(chunk, probe):
    rows = 37 if chunk == 1 else 97  # a partial last chunk
    keys = torch.randn(rows, 3, 59)  # D 59, 9 heads over 3
    q = torch.randn(9, 59)
    rep, score = hip_stage1(keys, q, chunk, probe)
    rep_ref, score_ref = hip_stage1_reference(keys, q, chunk, probe)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)


@pytest.mark.parametrize("chunk,probe", [(1, "first"), (4, "first"), (8, "middle")])
def test_gathered_stage_kernel_matches_reference(chunk, probe):
    gen = torch.Generator().manual_seed(chunk)
    chunks = [torch.randn(16, 3, 59, generator=gen) for _ in range(3)]  # a store of 3 chunks of 16 rows
    q = torch.randn(9, 59, generator=gen)
    ids = torch.randperm(48, generator=gen)[:37]
    cand = torch.full((-(-37 // chunk) * chunk,), -1, dtype=torch.long)  # a padded last chunk
    cand[:37] = ids
    cand = cand.view(-1, chunk)
    rep, score = hip_stage(chunks, cand, q, probe)
    rep_ref, score_ref = hip_stage_reference(chunks, cand, q, probe)
    assert torch.equal(rep, rep_ref)
    _assert_close(score, score_ref, 1e-4)


@pytest.mark.gpu
def test_gathered_stage_kernel_cuda_bf16():
    chunks = [torch.randn(4096, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(5)]
    q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    cand = torch.sort(torch.randperm(5 * 4096, device="cuda")[:8192]).values.view(-1, 32)
    rep, score = hip_stage(chunks, cand, q)
    rep_ref, score_ref = hip_stage_reference(chunks, cand, q)
    assert (rep == rep_ref).float().mean() > 0.99
    _assert_close(score, score_ref, 0.05, rtol=0.01)


@pytest.mark.gpu
def test_stage1_kernel_cuda_bf16():
    keys = torch.randn(20000, 8, 128, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(32, 128, device="cuda", dtype=torch.bfloat16)
    rep, score = hip_stage1(keys, q, 256)
    rep_ref, score_ref = hip_stage1_reference(keys, q, 256)
    assert (rep == rep_ref).float().mean() > 0.99  # fp32 accumulation order may flip near-ties
    _assert_close(score, score_ref, 0.05, rtol=0.01)


@pytest.mark.gpu
def test_host_resident_keys_select_what_device_keys_select():
    # keys_on="host": the stage kernels read probe rows from pinned host memory (zero-copy)
    gen = torch.Generator().manual_seed(11)
    cfg = ModelConfig.from_name("llama3-8b")
    n = 3 * 16384 + 1000  # several store chunks and a partial one
    keys = torch.randn(cfg.n_kv_heads, n, cfg.head_dim, generator=gen).to(torch.bfloat16)
    q = torch.randn(cfg.n_heads, cfg.head_dim, generator=gen).to("cuda", torch.bfloat16)
    ids = {}
    for where in ("device", "host"):
        hip = make_retriever(RetrievalConfig(method="hip", options={"keys_on": where}), cfg, "cuda")
        hip.build(0, keys, None)
        hip.add(0, keys[:, :300], torch.arange(n, n + 300))
        assert hip.keys[0].chunks[0].is_cuda == (where == "device")
        ids[where] = [hip.select(0, q, budget=2048).ids for _ in range(20)]  # refreshes and cached steps
    for a, b in zip(ids["device"], ids["host"]):
        assert torch.equal(a, b)


def test_host_keys_need_the_kernels():
    with pytest.raises(ValueError, match="keys_on='host'"):
        make_retriever(RetrievalConfig(method="hip", options={"keys_on": "host", "kernel": "torch"}), MODEL,
                       torch.device("cuda"))


@pytest.mark.parametrize(
    "options,match",
    [
        ({"chunk_sizes": (256, 24, 8)}, "powers of two"),
        ({"chunk_sizes": (32, 64, 8)}, "non-increasing"),
        ({"kept_tokens": (4096, 8192, 2048)}, "non-increasing"),
        ({"refresh_steps": (4, 8, 16)}, "non-increasing"),
        ({"refresh_steps": (16, 8)}, "one entry per stage"),
        ({"kept_tokens": (128, 16, 2048), "chunk_sizes": (256, 32, 8)}, "non-increasing"),
        ({"kept_tokens": (200, 20, 8)}, ">= the stage's chunk size"),
        ({"probe": "last"}, "probe"),
        ({"chunk_rows": 1000}, "multiple of chunk_sizes"),
        ({"kernel": "cuda"}, "kernel"),
        ({"refresh_steps": (16, 0, 4)}, "ints >= 1"),
        ({"chunk_size": 64}, "unknown hip options"),
        ({"keys_on": "disk"}, "keys_on"),
    ],
)
def test_bad_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        make_retriever(RetrievalConfig(method="hip", options=options), MODEL, "cpu")


def test_bad_select_arguments_are_rejected():
    hip = _hip()
    hip.build(0, torch.randn(HKV, 100, D), None)
    with pytest.raises(ValueError, match="q must be"):
        hip.select(0, torch.randn(HKV, D), 16)
    with pytest.raises(ValueError, match="budget"):
        hip.select(0, torch.randn(HQ, D), -1)
    with pytest.raises(ValueError, match="keys must be"):
        hip.add(0, torch.randn(HQ, 3, D), torch.arange(3))
