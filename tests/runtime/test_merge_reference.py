"""The lse merge of partial attentions equals softmax attention over the union of keys."""

import torch

from kvloft.kernels import reference as ref


def _split_attention(q, k, v, cuts):
    outs, lses = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, lse = ref.decode_attend(q, k[a:b], v[a:b], scale=0.25)
        outs.append(o)
        lses.append(lse)
    return ref.merge(outs, lses)


def test_merge_equals_union():
    q = torch.randn(9, 16, dtype=torch.float64)
    k = torch.randn(200, 3, 16, dtype=torch.float64)
    v = torch.randn(200, 3, 16, dtype=torch.float64)
    full, lse_full = ref.decode_attend(q, k, v, scale=0.25)
    for cuts in ([0, 200], [0, 1, 97, 200], [0, 0, 50, 50, 200]):  # includes empty parts
        out, lse = _split_attention(q, k, v, cuts)
        assert torch.allclose(out, full, atol=1e-12)
        assert torch.allclose(lse.double(), lse_full.double(), atol=1e-6)


def test_merge_large_logits_and_all_empty():
    q = torch.randn(4, 8) * 1e3  # logits ~1e5: exp overflows without the max shift
    k, v = torch.randn(64, 2, 8), torch.randn(64, 2, 8)
    full, _ = ref.decode_attend(q, k, v, scale=1.0)
    out, lse = _split_attention(q, k, v, [0, 10, 64])
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # fp32 lse of magnitude ~1e4 carries ~1e4 * 6e-8 absolute error, so weights move by ~1e-3
    assert torch.allclose(out, full, atol=3e-3)
    empty = ref.decode_attend(q, k[:0], v[:0], scale=1.0)
    out, lse = ref.merge([empty[0], empty[0]], [empty[1], empty[1]])
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
