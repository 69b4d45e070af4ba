"""kernels/scoring_batched.py with reduce="none": every query head's logits of every row's keys,
read through the rows' chunk address tables, against the torch twin, an fp64 oracle and
scoring.py's own launches (CPU: interpreter, fp32)."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import reference
from kvloft.kernels.checks import address_table
from kvloft.kernels.scoring import score
from kvloft.kernels.scoring_batched import score_batched, score_batched_reference

CHUNK = 128  # rows per store chunk, two tiles of BLOCK_N
N_CHUNKS = (3, 1, 2)  # chunks of each row's store
N_KEYS = (300, 64, 200)  # 300 and 200 end mid-chunk (and mid-tile), 64 on a tile boundary
N_COLS = 320


def _rows(hkv, d, gen):
    """Each row's store: a list of whole chunks [CHUNK, H_kv, D]."""
    return [[torch.randn(CHUNK, hkv, d, generator=gen) for _ in range(n)] for n in N_CHUNKS]


def _launch(q, stores, reduce, scale):
    table = torch.cat([address_table(s, torch.device("cpu")) for s in stores])
    offsets = [sum(N_CHUNKS[:i]) for i in range(len(N_CHUNKS))]
    meta = torch.tensor([list(N_KEYS), offsets, [CHUNK] * len(stores)])
    return score_batched(q, table, stores[0][0], meta, N_COLS, reduce=reduce, scale=scale)


def _oracle(q, keys, scale):
    """fp64 logits [H_q, n] of q [H_q, D] over keys [n, H_kv, D] (query head h reads KV head h // group)."""
    group = q.shape[0] // keys.shape[1]
    return torch.einsum("hd,nhd->hn", q.double(), keys.double().repeat_interleave(group, 1)) * scale


@pytest.mark.parametrize("hkv,group,d", [(2, 3, 16), (3, 7, 32), (1, 7, 16)])
def test_none_equals_reference_oracle_and_own_launches(hkv, group, d):
    gen = torch.Generator().manual_seed(hkv * 100 + group * 10 + d)
    stores = _rows(hkv, d, gen)
    q = torch.randn(len(stores), hkv * group, d, generator=gen)
    scale = d**-0.5
    out = _launch(q, stores, "none", scale)  # [G, H_q, N_COLS]
    assert out.shape == (len(stores), hkv * group, N_COLS)
    keys = [torch.cat(s)[:n] for s, n in zip(stores, N_KEYS, strict=True)]
    ref = score_batched_reference(q, keys, N_COLS, reduce="none", scale=scale)
    for g, (s, k, n) in enumerate(zip(stores, keys, N_KEYS, strict=True)):
        assert bool((out[g, :, n:] == float("-inf")).all())
        own = torch.cat([score(q[g], c, scale=scale) for c in s], dim=1)[:, :n]
        assert torch.equal(out[g, :, :n], own)  # the same tile dots as one launch per chunk
        exact = _oracle(q[g], k, scale)
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, exact.abs().max().item())
        err = (out[g, :, :n].double() - exact).abs().max().item()
        base = (ref[g, :, :n].double() - exact).abs().max().item()
        assert err <= 2 * base + floor, (err, base, floor)
    assert torch.equal(ref == float("-inf"), out == float("-inf"))


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_reduced_launch_folds_the_none_launchs_heads(reduce):
    """"max" equals the group max of "none"'s logits bit for bit (the same scores, folded in
    registers); "sum" to fp32 rounding; both -inf where "none" is."""
    hkv, group, d = 3, 7, 16
    gen = torch.Generator().manual_seed(5)
    stores = _rows(hkv, d, gen)
    q = torch.randn(len(stores), hkv * group, d, generator=gen)
    none = _launch(q, stores, "none", 0.5)
    red = _launch(q, stores, reduce, 0.5)
    for g, n in enumerate(N_KEYS):
        folded = reference.reduce_group(none[g, :, :n], hkv, reduce)
        if reduce == "max":
            assert torch.equal(red[g, :, :n], folded)
        else:
            assert bool(torch.isclose(red[g, :, :n], folded, atol=1e-4, rtol=1e-5).all())
        assert bool((red[g, :, n:] == float("-inf")).all())
