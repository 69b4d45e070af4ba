"""kernels/cpu_rank.py: exact's compiled CPU ranking (group max, top-k) against the torch route it
replaces (reference.reduce_group's amax, torch.topk), on awkward shapes.

torch.topk(sorted=False) returns its ids in no stated order, so the selections are compared as
sets per KV head; random fp32 logits have no exact ties at the boundary, where the two may take
different tied ids (test_ties_take_the_lowest_ids states the compiled rule)."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import cpu_rank, reference


def _torch_ids(logits, hkv, budget):
    s = reference.reduce_group(logits, hkv, "max")
    return torch.topk(s, budget, dim=-1, sorted=False).indices


def _sets(ids):
    return [set(row.tolist()) for row in ids]


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("n,budget", [(1001, 256), (97, 96), (5, 1), (4099, 1000)])
def test_compiled_ranking_selects_torchs_ids(hq, hkv, n, budget):
    gen = torch.Generator().manual_seed(hq * 1000 + n)
    logits = torch.randn(hq, n, generator=gen)
    assert cpu_rank.applies(logits, hkv, budget)
    got = cpu_rank.group_max_topk(logits, hkv, budget)
    assert got.shape == (hkv, budget) and got.dtype == torch.int64
    assert _sets(got) == _sets(_torch_ids(logits, hkv, budget))
    assert all(len(s) == budget for s in _sets(got))  # no id twice


def test_budget_not_below_rows_or_other_dtypes_do_not_apply():
    logits = torch.randn(6, 10)
    assert not cpu_rank.applies(logits, 3, 10) and not cpu_rank.applies(logits, 3, 11)
    assert not cpu_rank.applies(logits, 3, 0) and not cpu_rank.applies(logits, 4, 5)
    assert not cpu_rank.applies(logits.double(), 3, 5) and not cpu_rank.applies(logits.bfloat16(), 3, 5)


def test_ties_take_the_lowest_ids_and_inf_ranks():
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, float("-inf"), 0.5],
                           [0.0, 0.0, 0.0, 0.0, float("inf"), 0.0]])
    got = cpu_rank.group_max_topk(logits, 1, 3)  # group max: [1, 2, 2, 2, inf, 0.5]
    assert sorted(got[0].tolist()) == [1, 2, 4]


def test_nan_scores_fall_back():
    logits = torch.randn(4, 20)
    logits[1, 7] = float("nan")
    assert cpu_rank.group_max_topk(logits, 2, 5) is None


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30])
def test_many_ties_and_signed_zeros_follow_the_stated_rule(scale):
    """Scores in a few values (one histogram bucket holding most rows), -0.0 among them: every row
    above the budget-th largest score, then the rows tied at it in index order."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randint(-3, 3, (6, 777), generator=gen).float() * scale
    logits[logits == 0] = -0.0
    logits[:, ::5] = 0.0
    s = reference.reduce_group(logits, 2, "max")
    for budget in (1, 100, 400, 776):
        got = cpu_rank.group_max_topk(logits, 2, budget)
        for h in range(2):
            kth = torch.topk(s[h], budget).values[-1]
            above = (s[h] > kth).nonzero().view(-1).tolist()
            tied = (s[h] == kth).nonzero().view(-1).tolist()[: budget - len(above)]
            assert sorted(got[h].tolist()) == sorted(above + tied)
