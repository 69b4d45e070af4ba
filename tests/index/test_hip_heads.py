"""HiP with a mask per KV head (hip option heads="kv") against per-head brute force: shared HiP
run on a one-KV-head view of the model with that head's query group."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kvloft.config import ModelConfig, RetrievalConfig
from kvloft.index.base import make_retriever

MODEL = ModelConfig.from_name("tiny")  # 9 query heads over 3 KV heads, head_dim 16
HQ, HKV, D = MODEL.n_heads, MODEL.n_kv_heads, MODEL.head_dim
GROUP = HQ // HKV
VIEW = dataclasses.replace(MODEL, n_heads=GROUP, n_kv_heads=1)  # one KV head and its query group
SMALL = {"chunk_sizes": (32, 8, 4), "kept_tokens": (256, 64, 32), "refresh_steps": (4, 2, 1),
         "chunk_rows": 128}


def _hip(model: ModelConfig, **options):
    return make_retriever(RetrievalConfig(method="hip", options={**SMALL, **options}), model, "cpu")


def _keys(n: int, gen: torch.Generator, seg: int = 16) -> torch.Tensor:
    """[H_kv, n, D]: runs of `seg` tokens sharing a topic vector plus noise, each KV head its own."""
    topics = torch.randn(-(-n // seg), HKV, D, generator=gen)
    keys = topics.repeat_interleave(seg, 0)[:n] + 0.3 * torch.randn(n, HKV, D, generator=gen)
    return keys.transpose(0, 1).contiguous()


@pytest.mark.parametrize("kernel,rank", [
    ("torch", "logit"), ("torch", "z"), ("triton", "z"),  # (triton with rank z: the +inf masks beside the z bias)
    pytest.param("triton", "logit", marks=pytest.mark.slow),  # (~10 s in the Triton interpreter)
])
def test_per_head_selection_equals_shared_hip_per_head(kernel, rank):
    """Over several steps (cached masks, fresh rows, refreshes) each KV head's ids are what shared
    HiP selects on that head alone with its own query group."""
    gen = torch.Generator().manual_seed(11)
    n, steps = (700, 5) if kernel == "torch" else (300, 3)  # (the Triton interpreter is slow)
    keys = _keys(n, gen)  # 3-6 store chunks of 128 rows: later stages read across chunks
    opts = {"kernel": kernel, "rank": rank, "refresh_steps": (2, 2, 1)}  # stage 1 runs at steps 0 and 2
    kv = _hip(MODEL, heads="kv", **opts)
    refs = [_hip(VIEW, **opts) for _ in range(HKV)]
    kv.build(0, keys, None)
    for g, ref in enumerate(refs):
        ref.build(0, keys[g : g + 1].contiguous(), None)
    for step in range(steps):
        q = torch.randn(HQ, D, generator=gen)
        sel = kv.select(0, q, budget=40)
        assert sel.ids.shape == (HKV, 40) and sel.stable is None and not sel.padded
        for g, ref in enumerate(refs):
            want = ref.select(0, q[g * GROUP : (g + 1) * GROUP], budget=40)
            assert torch.equal(sel.ids[g], want.ids), (step, g)
        new = torch.randn(HKV, 2, D, generator=gen)
        kv.add(0, new, torch.arange(2))
        for g, ref in enumerate(refs):
            ref.add(0, new[g : g + 1].contiguous(), torch.arange(2))
    assert kv.stats()["refreshes"][0] >= 2  # stage 1 ran again after the first step


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_needle_on_a_small_scale_head_is_kept_per_head_and_lost_shared(kernel):
    """A needle only KV head 0's queries seek, its logits tiny next to KV head 1's (whose query
    group has large logits everywhere): the shared mask ranks chunks by KV head 1 and drops the
    needle; a mask per KV head keeps it for head 0."""
    gen = torch.Generator().manual_seed(3)
    n, start, length = 640, 392, 16
    keys = _keys(n, gen)
    direction = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    keys[0, start : start + length] = 6.0 * direction + 0.05 * torch.randn(length, D, generator=gen)
    q = 0.2 * torch.randn(HQ, D, generator=gen)
    q[:GROUP] = direction  # head 0's group: needle logits about 6, elsewhere N(0, 1)
    q[GROUP : 2 * GROUP] *= 100.0  # head 1's group: logits of about 80 (sd) on every row
    needle = set(range(start, start + length))
    shared = _hip(MODEL, kernel=kernel)
    per_head = _hip(MODEL, kernel=kernel, heads="kv")
    for hip in (shared, per_head):
        hip.build(0, keys, None)
    kept_shared = needle & set(shared.select(0, q, budget=32).ids.tolist())
    kept_kv = needle & set(per_head.select(0, q, budget=32).ids[0].tolist())
    assert len(kept_kv) == length, sorted(needle - kept_kv)
    assert len(kept_shared) < length // 2, sorted(kept_shared)


def test_covering_budget_and_state_round_trip():
    gen = torch.Generator().manual_seed(5)
    keys = _keys(400, gen)
    hip = _hip(MODEL, heads="kv")
    hip.build(0, keys, None)
    q = torch.randn(HQ, D, generator=gen)
    assert torch.equal(hip.select(0, q, budget=400).ids, torch.arange(400).expand(HKV, -1))  # nothing pruned
    first = hip.select(0, q, budget=48).ids
    saved = hip.state_dict()
    assert saved["layer0.mask2"].shape == (HKV, 48)
    again = _hip(MODEL, heads="kv")
    again.build(0, keys, None)
    again.load_state_dict(saved)
    q2 = torch.randn(HQ, D, generator=gen)
    assert torch.equal(again.select(0, q2, budget=48).ids, hip.select(0, q2, budget=48).ids)
    assert first.shape == (HKV, 48)


def test_per_head_rows_decline_the_batched_search():
    hip = _hip(MODEL, heads="kv")
    assert hip.search_key() is None and _hip(MODEL).search_key() is not None
    with pytest.raises(ValueError, match="heads='kv'"):
        type(hip).select_batch([hip, hip], 0, torch.zeros(2, HQ, D), [8, 8])


def test_bad_heads_option_is_rejected():
    with pytest.raises(ValueError, match="heads must be one of"):
        _hip(MODEL, heads="query")
