"""kernels/cpu_score.py: the compiled CPU scan against reference.score (torch bmm), and the
dispatch of kernels.score_keys to it."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import cpu_score, reference, score_keys


@pytest.mark.parametrize("hq,hkv,d,n", [(9, 3, 64, 1025), (7, 7, 59, 97), (12, 2, 16, 1), (8, 4, 32, 0)])
def test_equals_reference_score(hq, hkv, d, n):
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(hq, d, generator=gen)
    k = torch.randn(n + 5, hkv, d, generator=gen)[:n]  # a chunk's filled part
    assert cpu_score.applies(q, k)
    got = cpu_score.score_rows(q, k)
    want = reference.score(q.double(), k.double())  # fp64 oracle
    assert got.shape == (hq, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    # score_keys dispatches to it, scale and group reduction on top
    torch.testing.assert_close(score_keys(q, k, scale=0.5, reduce="max"),
                               reference.reduce_group(reference.score(q, k, scale=0.5), hkv, "max"),
                               rtol=1e-5, atol=1e-5)


def test_other_inputs_go_to_the_reference(monkeypatch):
    q, k = torch.randn(9, 16), torch.randn(40, 3, 16)
    assert not cpu_score.applies(q.bfloat16(), k.bfloat16())
    assert not cpu_score.applies(q, k.transpose(0, 1).contiguous().transpose(0, 1))  # strided rows
    monkeypatch.setattr(cpu_score, "enabled", False)
    assert not cpu_score.applies(q, k)
    torch.testing.assert_close(score_keys(q, k), reference.score(q, k), rtol=0, atol=0)
