"""RowAttention (runtime/batch_layer.py): rows attended through their own backends, pending
searches finished, and an error in a row or in the searches noted with its rows, pairs and layer."""

from __future__ import annotations

import pytest
import torch

from kvloft.runtime.batch_layer import RowAttention
from kvloft.runtime.batch_search import PendingSearch

H_Q, H_KV, D = 3, 1, 5


class _Dense:
    """A backend whose attention is its row's query times `scale`."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def attend(self, layer, q, k, v, positions):  # q [1, H_q, D] -> [1, H_q, D]
        return q * self.scale


class _Failing:
    def attend(self, layer, q, k, v, positions):
        raise RuntimeError("row broke")


class _Fetch:
    """InPlaceRows' select: raises when told to, else the query's sum as a one-number selection."""

    def __init__(self, fail: bool) -> None:
        self.fail = fail

    def select(self, layer, q, budget):
        if self.fail:
            raise RuntimeError("search broke")
        return q.sum()


class _Searching:
    """A backend whose deferred route returns its search, finished as q + selection."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def attend_deferred(self, layer, q, k, v, positions, defer_search=False):
        return PendingSearch(fetch=_Fetch(self.fail), layer=layer, q=q[0], budget=4, timers=None,
                             finish=lambda sel, q=q: q + sel)


def _inputs(b: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, H_Q, D, generator=g)  # [B', H_q, D]
    k = torch.randn(b, H_KV, D, generator=g)  # [B', H_kv, D]
    return q, k, k.clone(), torch.arange(10, 10 + b)  # positions [B']


def test_rows_through_their_backends_and_padding_zeroed():
    q, k, v, pos = _inputs(4)  # 3 rows and one padding row
    att = RowAttention([_Dense(2.0), _Searching(), _Dense(-1.0)], torch.tensor([2, 0, 1]))
    o = att.attend(0, q, k, v, pos)
    assert torch.equal(o[0], q[0] * 2.0)
    assert torch.equal(o[1], q[1] + q[1].sum())
    assert torch.equal(o[2], -q[2])
    assert torch.equal(o[3], torch.zeros_like(q[3]))


def test_a_failing_row_is_named():
    q, k, v, pos = _inputs(2)
    att = RowAttention([_Dense(1.0), _Failing()], torch.tensor([1, 0]))
    with pytest.raises(RuntimeError, match="row broke") as e:
        att.attend(3, q, k, v, pos)
    assert e.value.__notes__ == ["in row 1 of the batched step (pair 0, layer 3, position 11)"]


def test_failing_searches_name_their_rows_and_pairs():
    q, k, v, pos = _inputs(3)
    att = RowAttention([_Searching(), _Dense(1.0), _Searching(fail=True)], torch.tensor([2, 0, 1]))
    with pytest.raises(RuntimeError, match="search broke") as e:
        att.attend(5, q, k, v, pos)
    assert e.value.__notes__ == ["in the searches of rows [0, 2] of the batched step (pairs 2, 1, layer 5)"]
