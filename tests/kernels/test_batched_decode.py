"""gather_attend_table_batched (kernels/batched_decode.py): B sequences' slot tables in one
launch equal gather_attend_table on each sequence and an fp64 softmax over its gathered rows.
CPU through the Triton interpreter (fp32); GPU (bf16, pinned host slots) where CUDA is present."""

from __future__ import annotations

import math

import pytest
import torch

from kvloft.kernels import checks
from kvloft.kernels.batched_decode import gather_attend_table_batched, stack_tables
from kvloft.kernels.rowquant import dequantize_rows, quantize_rows
from kvloft.kernels.sparse_decode import SlotTables, gather_attend_table

KEEP: list = []  # every slot tensor made here (a table holds addresses, not references)
ATOL = 1e-5  # fp32: a few ulps of values of order 1 (the kernel against itself / the fp64 softmax)


@pytest.fixture(autouse=True)
def _free_slots():
    yield
    KEEP.clear()


def _sequence(n_host, n_static, r, hkv, d, n_sel, kind=None, device="cpu", dtype=torch.float32, pin=False):
    """One sequence's decode rows in slots of r rows: host chunks (8-bit codes with `kind`) then a
    static region, behind one table. Returns (tables, like [S', H_kv, D] static buffer, ids
    [H_kv, n_sel + n_static] with padding, the rows [N', H_kv, D] that ids point into, as read).
    The slot tensors stay alive in KEEP (the tables hold bare addresses)."""
    n_chunks = -(-n_host // r)
    host_k, host_v = (torch.randn(n_chunks * r, hkv, d).to(dtype) for _ in range(2))
    n_static_slots = -(-n_static // r)
    sk = torch.randn(n_static_slots * r, hkv, d, dtype=dtype, device=device)
    sv = torch.randn_like(sk)
    k_slots, v_slots, scales, read = [], [], [], []
    for x, slots in ((host_k, k_slots), (host_v, v_slots)):
        if kind is None:
            x = x.pin_memory() if pin else x.to(device)
            slots += [x[j : j + r] for j in range(0, x.shape[0], r)]
            read.append(x.to(device))
        else:
            codes, s = quantize_rows(x, kind)
            codes, s = (codes.pin_memory(), s.pin_memory()) if pin else (codes.to(device), s.to(device))
            slots += [codes[j : j + r] for j in range(0, x.shape[0], r)]
            scales.append(checks.address_table([s[j : j + r] for j in range(0, x.shape[0], r)], device))
            KEEP.append(s)
            read.append(dequantize_rows(codes, s, kind, dtype).to(device))
    k_slots += [sk[j : j + r] for j in range(0, sk.shape[0], r)]
    v_slots += [sv[j : j + r] for j in range(0, sv.shape[0], r)]
    KEEP.append((k_slots, v_slots, scales))
    k_tab, v_tab = checks.address_table(k_slots, device), checks.address_table(v_slots, device)
    tables = SlotTables(k_tab, v_tab, *scales, n_chunks, kind) if kind else (k_tab, v_tab)
    sel = torch.stack([torch.randperm(n_host)[:n_sel] for _ in range(hkv)])
    sel[:, -2:] = -1  # padding inside a sequence's own ids
    static_ids = torch.arange(n_static) + n_chunks * r
    ids = torch.cat([sel, static_ids[None].expand(hkv, -1)], dim=1).to(device)
    rows = torch.cat([read[0], sk]), torch.cat([read[1], sv])
    return tables, sk, ids, rows


def _softmax_rows(q, k_rows, v_rows, ids, scale):
    """fp64 dense softmax of q [H_q, D] over the rows ids [H_kv, n] (-1 ignored) of [N, H_kv, D]."""
    hq, hkv = q.shape[0], k_rows.shape[1]
    outs, lses = [], []
    for h in range(hq):
        kv = h // (hq // hkv)
        sel = ids[kv][ids[kv] >= 0]
        logits = (k_rows[sel, kv].double() @ q[h].double()) * scale
        lse = torch.logsumexp(logits, 0)
        outs.append(torch.exp(logits - lse) @ v_rows[sel, kv].double())
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def _pad(ids_list, n):
    return torch.stack([torch.nn.functional.pad(i, (0, n - i.shape[-1]), value=-1) for i in ids_list])


# (host rows, static rows, slot rows, selected) per sequence: different lengths and slot sizes
SEQS = [(77, 21, 16, 40), (150, 9, 32, 70), (30, 30, 16, 12)]


@pytest.mark.parametrize("hq,hkv,d", [(9, 3, 24), (8, 2, 32), (4, 4, 16)])
@pytest.mark.parametrize("kinds", [(None, None, None), ("int8", None, "int8"), (None, "fp8", "fp8")],
                         ids=["plain", "int8-mixed", "fp8-mixed"])
def test_batched_equals_each_sequence_and_softmax(hq, hkv, d, kinds):
    """Sequences of different key counts, slot sizes and 8-bit slots (some plain), GQA: row b
    of the batched launch == gather_attend_table on sequence b (same arithmetic, other splits)
    == an fp64 softmax over the rows it gathers (fp32 bound, or the codes' dequantized rows)."""
    torch.manual_seed(hq * 100 + d)
    seqs = [_sequence(h, s, r, hkv, d, m, kind) for (h, s, r, m), kind in zip(SEQS, kinds, strict=True)]
    q = torch.randn(len(seqs), hq, d)
    scale = d**-0.5
    lengths = [ids.shape[-1] for _, _, ids, _ in seqs]
    n = max(lengths) + 5  # padding past every sequence's own count too
    stacked = stack_tables([t for t, *_ in seqs], [r for _, _, r, _ in SEQS])
    like = seqs[0][1]
    out, lse = gather_attend_table_batched(q, like, like, _pad([i for _, _, i, _ in seqs], n), stacked,
                                           scale=scale, lengths=lengths)
    assert out.shape == (3, hq, d) and lse.shape == (3, hq)
    strided = _pad([i for _, _, i, _ in seqs], n).transpose(0, 1).contiguous().transpose(0, 1)  # [B, H_kv, n]
    assert strided.stride() == (n, 3 * n, 1)  # runtime/batch_attention.py's layout
    full, full_lse = gather_attend_table_batched(q, like, like, strided, stacked,
                                                 scale=scale)  # no lengths: the -1 padding is skipped
    torch.testing.assert_close(full, out, rtol=0, atol=ATOL)
    torch.testing.assert_close(full_lse, lse, rtol=0, atol=ATOL)
    for b, ((tables, sk, ids, (rk, rv)), (_, _, r, _)) in enumerate(zip(seqs, SEQS, strict=True)):
        one, one_lse = gather_attend_table(q[b], sk, sk, ids, tables, r, scale=scale)
        torch.testing.assert_close(out[b], one, rtol=0, atol=ATOL)
        torch.testing.assert_close(lse[b], one_lse, rtol=0, atol=ATOL)
        ref, ref_lse = _softmax_rows(q[b], rk, rv, ids, scale)
        torch.testing.assert_close(out[b].double(), ref, rtol=0, atol=ATOL)
        torch.testing.assert_close(lse[b].double(), ref_lse, rtol=0, atol=ATOL)


def test_shared_ids_and_an_empty_sequence():
    """ids [B, n] shared over KV heads, and a sequence with no key (length 0, or all padding):
    that row is out = 0, lse = -inf, the others as gather_attend_table."""
    hq, hkv, d = 6, 2, 16
    seqs = [_sequence(h, s, r, hkv, d, m) for h, s, r, m in SEQS]
    q = torch.randn(3, hq, d)
    shared = [ids[0] for _, _, ids, _ in seqs]
    n = max(i.shape[0] for i in shared)
    stacked = stack_tables([t for t, *_ in seqs], [r for _, _, r, _ in SEQS])
    lengths = [shared[0].shape[0], 0, shared[2].shape[0]]
    out, lse = gather_attend_table_batched(q, seqs[0][1], seqs[0][1], _pad(shared, n), stacked, scale=0.3,
                                           lengths=lengths)
    assert bool((out[1] == 0).all()) and bool((lse[1] == -math.inf).all())
    for b in (0, 2):
        one, one_lse = gather_attend_table(q[b], seqs[b][1], seqs[b][1], shared[b], seqs[b][0], SEQS[b][2], scale=0.3)
        torch.testing.assert_close(out[b], one, rtol=0, atol=ATOL)
        torch.testing.assert_close(lse[b], one_lse, rtol=0, atol=ATOL)


def test_stack_tables_lays_sequences_end_to_end():
    """Row b's slot base is the slots before it; scale tables of 8-bit sequences likewise."""
    a = SlotTables(torch.arange(5), torch.arange(5) + 10, torch.arange(3) + 100, torch.arange(3) + 200, 3, "int8")
    b = (torch.arange(4) + 20, torch.arange(4) + 30)
    c = SlotTables(torch.arange(6) + 40, torch.arange(6) + 50, torch.arange(2) + 300, torch.arange(2) + 400, 2, "int8")
    st = stack_tables([a, b, c], [16, 32, 16])
    assert st.rows == ((0, 16, 3, 0), (5, 32, 0, 3), (9, 16, 2, 3))
    assert st.tables.k.tolist() == [*range(5), *range(20, 24), *range(40, 46)]
    assert st.tables.v.tolist() == [*range(10, 15), *range(30, 34), *range(50, 56)]
    assert st.tables.k_scales.tolist() == [100, 101, 102, 300, 301]
    assert st.tables.v_scales.tolist() == [200, 201, 202, 400, 401]
    assert (st.tables.n_packed, st.tables.kind) == (5, "int8")
    plain = stack_tables([b, b], [32, 32])
    assert plain.tables.kind is None and plain.rows == ((0, 32, 0, 0), (4, 32, 0, 0))
    with pytest.raises(ValueError, match="one format per launch"):
        stack_tables([a, c._replace(kind="fp8")], [16, 16])
    with pytest.raises(ValueError, match="one slot_rows per table"):
        stack_tables([a, b], [16])


def test_bad_inputs():
    seqs = [_sequence(h, s, r, 2, 16, m) for h, s, r, m in SEQS[:2]]
    stacked = stack_tables([t for t, *_ in seqs], [16, 32])
    like = seqs[0][1]
    ids = _pad([i for _, _, i, _ in seqs], 80)
    q = torch.randn(2, 4, 16)
    with pytest.raises(ValueError, match=r"q must be .*\[B, H_q, D\]"):
        gather_attend_table_batched(q[0], like, like, ids, stacked, scale=1.0)
    with pytest.raises(ValueError, match="stacked tables hold 2 sequences but q has 3"):
        gather_attend_table_batched(torch.randn(3, 4, 16), like, like, _pad([ids[0]] * 3, 80), stacked, scale=1.0)
    with pytest.raises(ValueError, match=r"ids must be \[B=2, H_kv=2, n\]"):
        gather_attend_table_batched(q, like, like, ids[:, :1], stacked, scale=1.0)
    with pytest.raises(ValueError, match=r"lengths must give one count in \[0, n=80\]"):
        gather_attend_table_batched(q, like, like, ids, stacked, scale=1.0, lengths=[10, 81])
    with pytest.raises(ValueError, match="share dtype and row layout"):
        gather_attend_table_batched(q, like, like.double(), ids, stacked, scale=1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("kinds", [(None, None, None), ("int8", None, "int8")], ids=["plain", "int8-mixed"])
def test_gpu_batched_over_pinned_host_slots(kinds):
    """CUDA, bf16, host chunks pinned and read zero-copy: the batched launch equals
    gather_attend_table per sequence (the same bf16 arithmetic, other splits) and an fp64
    softmax over the rows read, within bf16 rounding of the output."""
    hq, hkv, d = 32, 8, 128
    seqs = [_sequence(h * 20, s, r * 8, hkv, d, m * 10, kind, "cuda", torch.bfloat16, pin=True)
            for (h, s, r, m), kind in zip(SEQS, kinds, strict=True)]
    q = torch.randn(3, hq, d, device="cuda", dtype=torch.bfloat16)
    lengths = [ids.shape[-1] for _, _, ids, _ in seqs]
    stacked = stack_tables([t for t, *_ in seqs], [r * 8 for _, _, r, _ in SEQS])
    like = seqs[0][1]
    out, lse = gather_attend_table_batched(q, like, like, _pad([i for _, _, i, _ in seqs], max(lengths)), stacked,
                                           scale=d**-0.5, lengths=lengths)
    for b, ((tables, sk, ids, (rk, rv)), (_, _, r, _)) in enumerate(zip(seqs, SEQS, strict=True)):
        one, one_lse = gather_attend_table(q[b], sk, sk, ids, tables, r * 8, scale=d**-0.5)
        torch.testing.assert_close(out[b].float(), one.float(), rtol=0, atol=2e-2)
        torch.testing.assert_close(lse[b], one_lse, rtol=0, atol=1e-3)
        ref, _ = _softmax_rows(q[b], rk, rv, ids, d**-0.5)
        assert (out[b].double() - ref).abs().max().item() < 2e-2
