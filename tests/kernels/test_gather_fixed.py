"""gather_fixed (kernels/gather_fixed.py): B sequences' rows of chunked stores into device
buffers, counts on the device. Reference: gather_fixed_reference (index_select per sequence);
rows past a count and sequences with count 0 are left untouched (poisoned, checked)."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels.gather_fixed import gather_fixed, gather_fixed_reference


def _stores(nb, n_chunks, rows, hkv, d):
    k = [[torch.randn(rows, hkv, d) for _ in range(n_chunks)] for _ in range(nb)]
    v = [[torch.randn(rows, hkv, d) for _ in range(n_chunks)] for _ in range(nb)]
    return k, v


def test_gather_fixed_equals_reference_and_leaves_rows_past_counts():
    nb, hc, rows, hkv, d, w = 3, 4, 16, 2, 8, 32
    k, v = _stores(nb, hc, rows, hkv, d)
    k_tab = torch.tensor([c.data_ptr() for s in k for c in s], dtype=torch.int64)
    v_tab = torch.tensor([c.data_ptr() for s in v for c in s], dtype=torch.int64)
    meta = torch.zeros(nb, 5, dtype=torch.int64)
    meta[:, 0], meta[:, 1] = torch.arange(nb) * hc, rows
    g = torch.Generator().manual_seed(1)
    wide = torch.stack([torch.randperm(hc * rows, generator=g)[: w + 5] for _ in range(nb)])
    ids = wide[:, :w]  # rows of a wider buffer (strided)
    counts = torch.tensor([w, 0, 13])
    out_k = torch.full((nb, w, hkv, d), 7.0)
    out_v = torch.full_like(out_k, 7.0)
    gather_fixed(k_tab, v_tab, meta, ids, counts, out_k, out_v, k[0][0])
    ref_k, ref_v = torch.full_like(out_k, 7.0), torch.full_like(out_v, 7.0)
    gather_fixed_reference(k, v, ids, counts.tolist(), ref_k, ref_v)
    assert torch.equal(out_k, ref_k) and torch.equal(out_v, ref_v)
    assert (out_k[1] == 7).all() and (out_k[2, 13:] == 7).all()  # nothing past a count written
    assert torch.equal(out_k[2, 12], k[2][ids[2, 12] // rows][ids[2, 12] % rows])


def test_gather_fixed_validates_shapes():
    like = torch.zeros(1, 2, 8)
    out = torch.zeros(2, 4, 2, 8)
    tab, meta = torch.zeros(2, dtype=torch.int64), torch.zeros(2, 5, dtype=torch.int64)
    with pytest.raises(ValueError, match="ids must be"):
        gather_fixed(tab, tab, meta, torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                     out, out.clone(), like)
    with pytest.raises(ValueError, match="out_k, out_v"):
        gather_fixed(tab, tab, meta, torch.zeros(2, 4, dtype=torch.int64), torch.zeros(2, dtype=torch.int64),
                     out.half(), out.clone(), like)
