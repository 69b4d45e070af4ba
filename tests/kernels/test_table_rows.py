"""The launches of a captured decode step (runtime/whole_step.py): write_rows_table (keys and
values appended through address tables) against its reference, and attend_table_fixed (each
sequence's first n_b rows, counts read on the device, a fixed grid) against decode_attend on
each sequence and an fp64 softmax. CPU through the Triton interpreter (fp32); GPU (bf16)
where CUDA is present, captured in a CUDA graph and replayed with other counts."""

from __future__ import annotations

import pytest
import torch

from kvloft.kernels import checks, reference
from kvloft.kernels.batched_decode import attend_table_fixed, fixed_splits, stack_tables
from kvloft.kernels.sparse_decode import gather_attend_table
from kvloft.kernels.table_rows import write_rows_reference, write_rows_table

ATOL = 1e-5  # fp32: a few ulps of values of order 1


def _buffers(caps, hkv, d, device, dtype):
    ks = [torch.randn(c, hkv, d, device=device, dtype=dtype) for c in caps]
    vs = [torch.randn_like(k) for k in ks]
    return ks, vs


def _tables(ks, vs, device):
    return checks.address_table(ks, device), checks.address_table(vs, device)


def _meta(caps, counts, device):
    """[B, 5]: each sequence one slot of its whole buffer (slot base b, slot rows = capacity)."""
    return torch.tensor([[b, c, 0, 0, n] for b, (c, n) in enumerate(zip(caps, counts))], dtype=torch.int64,
                        device=device)


def _softmax64(q, k, v, scale):
    """fp64 attention of q [H_q, D] over k, v [n, H_kv, D] (GQA by heads' groups) -> [H_q, D]."""
    hq, hkv = q.shape[0], k.shape[1]
    kk = k.double().repeat_interleave(hq // hkv, dim=1)  # [n, H_q, D]
    w = torch.softmax(torch.einsum("hd,nhd->hn", q.double(), kk) * scale, dim=-1)
    return torch.einsum("hn,nhd->hd", w, v.double().repeat_interleave(hq // hkv, dim=1))


@pytest.mark.parametrize("hkv,d", [(3, 16), (2, 59)])
def test_write_rows_table_equals_reference(hkv, d):
    caps, rows = [7, 12, 5], [6, -1, 0]  # the last row of one buffer, a padding row, the first row
    ks, vs = _buffers(caps, hkv, d, "cpu", torch.float32)
    want_k, want_v = [k.clone() for k in ks], [v.clone() for v in vs]
    k, v = torch.randn(3, hkv, d), torch.randn(3, hkv, d)
    write_rows_reference(k, v, want_k, want_v, rows)
    write_rows_table(k, v, *_tables(ks, vs, "cpu"), torch.tensor(rows), ks[0])
    for b in range(3):
        assert torch.equal(ks[b], want_k[b]) and torch.equal(vs[b], want_v[b])
    assert not torch.equal(ks[1][0], k[1])  # the padding row wrote nothing


def test_write_rows_table_writes_positions_where_a_row_has_a_buffer():
    """pos and p_table: a row's position into its int64 buffer at its row; p_table 0 (no
    buffer: a dense row of a tiered batch) and padding rows write no position."""
    caps, rows = [7, 12, 5, 6], [6, 3, -1, 2]
    ks, vs = _buffers(caps, 3, 16, "cpu", torch.float32)
    ps = [torch.full((c,), -1, dtype=torch.int64) for c in caps]
    want_k, want_v, want_p = [k.clone() for k in ks], [v.clone() for v in vs], [p.clone() for p in ps]
    k, v, pos = torch.randn(4, 3, 16), torch.randn(4, 3, 16), torch.tensor([40, 41, 42, 43])
    p_table = checks.address_table(ps, "cpu")
    p_table[1] = 0  # row 1 keeps no positions
    write_rows_reference(k, v, want_k, want_v, rows, pos, [want_p[0], None, want_p[2], want_p[3]])
    write_rows_table(k, v, *_tables(ks, vs, "cpu"), torch.tensor(rows), ks[0], pos=pos, p_table=p_table)
    for b in range(4):
        assert torch.equal(ks[b], want_k[b]) and torch.equal(vs[b], want_v[b]) and torch.equal(ps[b], want_p[b])
    assert ps[0][6] == 40 and ps[3][2] == 43 and (ps[1] == -1).all() and (ps[2] == -1).all()
    with pytest.raises(ValueError, match="both pos and p_table"):
        write_rows_table(k, v, *_tables(ks, vs, "cpu"), torch.tensor(rows), ks[0], pos=pos)


def test_write_rows_table_refuses_bad_tables():
    ks, vs = _buffers([4, 4], 2, 16, "cpu", torch.float32)
    k = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="rows must be"):
        write_rows_table(k, k, *_tables(ks, vs, "cpu"), torch.tensor([0, 1], dtype=torch.int32), ks[0])
    with pytest.raises(ValueError, match="contiguous"):
        write_rows_table(k, k, *_tables(ks, vs, "cpu"), torch.tensor([0, 1]), ks[0].transpose(0, 1))


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 16), (4, 2, 59)])
def test_attend_table_fixed_equals_each_sequence(hq, hkv, d):
    """Sequences of 1025, 97, 0 (padding) and 300 keys: each equals decode_attend over its own
    first n_b rows and an fp64 softmax; the padding row gives out 0, lse -inf."""
    caps, counts = [1100, 128, 64, 300], [1025, 97, 0, 300]
    ks, vs = _buffers(caps, hkv, d, "cpu", torch.float32)
    q = torch.randn(4, hq, d)
    scale = d**-0.5
    out, lse = attend_table_fixed(q, ks[0], *_tables(ks, vs, "cpu"), _meta(caps, counts, "cpu"), scale=scale,
                                   num_splits=fixed_splits(hkv, 4, torch.device("cpu")))
    for b, n in enumerate(counts):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])) and torch.isinf(lse[b]).all()
            continue
        want, want_lse = reference.decode_attend(q[b], ks[b][:n], vs[b][:n], scale=scale)
        assert (out[b] - want).abs().max() <= ATOL
        assert (lse[b] - want_lse).abs().max() <= ATOL
        assert (out[b].double() - _softmax64(q[b], ks[b][:n], vs[b][:n], scale)).abs().max() <= ATOL


@pytest.mark.parametrize("shared", [False, True], ids=["per-head-ids", "shared-ids"])
def test_attend_table_fixed_reads_each_rows_first_ids(shared):
    """ids of a fixed width (a budget of 64) over slots of 16 rows: sequences with 50, 17 and 0
    ids in use read exactly ids[b, ..., :n_b] (the ids past n_b point at real rows and must not
    count), equal to gather_attend_table over those ids alone."""
    hq, hkv, d, r, width = 6, 3, 16, 16, 64
    counts, n_rows = [50, 17, 0], [80, 40, 16]
    ks, vs = _buffers(n_rows, hkv, d, "cpu", torch.float32)
    tables = [_tables([k[j : j + r] for j in range(0, k.shape[0], r)],
                      [v[j : j + r] for j in range(0, v.shape[0], r)], "cpu") for k, v in zip(ks, vs)]
    stacked = stack_tables(tables, [r] * 3)
    meta = torch.tensor([[base, rows, 0, 0, n] for (base, rows, _, _), n in zip(stacked.rows, counts)])
    shape = (3, width) if shared else (3, hkv, width)
    ids = torch.stack([torch.randint(0, m, shape[1:]) for m in n_rows])
    ids[0, ..., 3] = -1  # padding inside a row's count
    q = torch.randn(3, hq, d)
    out, _ = attend_table_fixed(q, ks[0], stacked.tables.k, stacked.tables.v, meta, scale=0.25,
                                num_splits=fixed_splits(hkv, 3, torch.device("cpu")), ids=ids)
    for b, n in enumerate(counts):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        want, _ = gather_attend_table(q[b], ks[0], vs[0], ids[b, ..., :n].contiguous(), tables[b], r, scale=0.25)
        assert (out[b] - want).abs().max() <= ATOL


def test_attend_table_fixed_refuses_host_meta_shape():
    ks, vs = _buffers([8], 2, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="row_meta must be"):
        attend_table_fixed(torch.randn(1, 2, 16), ks[0], *_tables(ks, vs, "cpu"), torch.zeros(1, 4, dtype=torch.int64),
                            scale=0.25, num_splits=2)


@pytest.mark.gpu
def test_captured_launches_replay_with_new_counts():
    """A CUDA graph of write + attend, captured once, replayed with other rows and counts
    (tables and meta refilled in place): equal to the eager launches and to decode_attend."""
    dev, dt, hq, hkv, d = torch.device("cuda"), torch.bfloat16, 32, 8, 128
    caps = [4096, 2048, 4096]
    ks, vs = _buffers(caps, hkv, d, dev, dt)
    kt, vt = _tables(ks, vs, dev)
    meta = _meta(caps, [1, 1, 1], dev)
    rows = torch.zeros(3, dtype=torch.int64, device=dev)
    q, k, v = (torch.randn(3, h, d, device=dev, dtype=dt) for h in (hq, hkv, hkv))
    splits = fixed_splits(hkv, 3, dev)

    def step():
        write_rows_table(k, v, kt, vt, rows, ks[0])
        return attend_table_fixed(q, ks[0], kt, vt, meta, scale=d**-0.5, num_splits=splits)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = step()
    for counts in ([4000, 17, 0], [129, 2048, 3333]):
        rows.copy_(torch.tensor([n - 1 if n else -1 for n in counts]))
        meta.copy_(_meta(caps, counts, dev))
        g.replay()
        torch.cuda.synchronize()
        eager = step()
        assert torch.equal(out, eager)
        for b, n in enumerate(counts):
            if n:
                assert torch.equal(ks[b][n - 1], k[b]) and torch.equal(vs[b][n - 1], v[b])
                want, _ = reference.decode_attend(q[b].float(), ks[b][:n].float(), vs[b][:n].float(), scale=d**-0.5)
                assert (out[b].float() - want).abs().max() <= 2e-2  # bf16 P.V rounding
            else:
                assert torch.equal(out[b], torch.zeros_like(out[b]))
