"""kernels/cpu_rows.py: many rows' exact search and attention in one compiled call, each row
against its own route (cpu_score's scan, cpu_rank's top-k, cpu_decode.select_attend with the
search's logits), bit for bit; awkward shapes (9 query heads over 3 KV heads, head dim 59,
host tiers of 97, 50 and 1025 rows in chunks of 32-256, partial last chunks, a covering
budget); a NaN row reported and left unwritten; the helper thread sharing the rows."""

import numpy as np
import pytest
import torch

from kvloft.kernels import cpu_rank, cpu_rows, cpu_score, cpu_split
from kvloft.kernels.cpu_decode import select_attend

HQ, HKV, D = 9, 3, 59
SCALE = D**-0.5
ROWS = [(97, 32, 20, 40), (50, 64, 7, 80), (1025, 256, 33, 100), (300, 96, 1, 299)]  # n_host, chunk rows, static, budget


def _rows(seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, cr, s_n, budget in ROWS:
        nc = -(-n // cr)
        rows.append({"q": torch.randn(HQ, D, generator=g), "n": n, "cr": cr, "k": min(budget, n),
                     "hk": [torch.randn(cr, HKV, D, generator=g) for _ in range(nc)],
                     "hv": [torch.randn(cr, HKV, D, generator=g) for _ in range(nc)],
                     "sk": torch.randn(s_n, HKV, D, generator=g), "sv": torch.randn(s_n, HKV, D, generator=g)})
    return rows


def _alone(r):
    """The row's own route: logits of every host row, the group-max top-k, one softmax."""
    logits = torch.cat([cpu_score.score_rows(r["q"], c) for c in r["hk"]], dim=1)[:, : r["n"]]
    if r["k"] < r["n"]:
        ids = cpu_rank.group_max_topk(logits, HKV, r["k"])
    else:
        ids = torch.arange(r["n"])[None].expand(HKV, -1).contiguous()
    out, lse = select_attend(r["q"], r["sk"], r["sv"], r["hk"], r["hv"], r["cr"], ids, scale=SCALE,
                             logits=logits, padded=False)
    return out, lse, ids


def _batched(rows, split=None):
    meta, kaddr, vaddr = [], [], []
    for r in rows:
        meta.append(cpu_rows.row_meta(r["sk"], r["sv"], r["n"], r["cr"], len(kaddr), r["k"]))
        kaddr += [c.data_ptr() for c in r["hk"]]
        vaddr += [c.data_ptr() for c in r["hv"]]
    q = torch.stack([r["q"] for r in rows])
    return cpu_rows.exact_attend_rows(q, np.array(meta, np.int64), np.array(kaddr, np.int64),
                                      np.array(vaddr, np.int64), scale=SCALE, n_kv_heads=HKV, split=split)


@pytest.mark.parametrize("with_helper", [False, True])
def test_rows_equal_each_row_alone_bit_for_bit(with_helper):
    rows = _rows(0)
    helper = cpu_split.Helper() if with_helper else None
    out, lse, ids, ok = _batched(rows, helper)
    assert ok.all()
    for b, r in enumerate(rows):
        o, lv, i = _alone(r)
        assert torch.equal(out[b], o) and torch.equal(lse[b], lv), b
        got = ids[b, :, : r["k"]].sort(dim=-1).values
        assert torch.equal(got, i.sort(dim=-1).values), b


def test_rows_against_fp64_attention():
    """Independent of the compiled loops: softmax over [static | top-k by group max] in fp64."""
    rows = _rows(1)
    out, _, ids, _ = _batched(rows)
    for b, r in enumerate(rows):
        q = r["q"].double()
        keys = torch.cat([c.double() for c in r["hk"]])[: r["n"]]
        vals = torch.cat([c.double() for c in r["hv"]])[: r["n"]]
        g = HQ // HKV
        for h in range(HQ):
            kv = h // g
            sel = ids[b, kv, : r["k"]]
            k_all = torch.cat([r["sk"][:, kv].double(), keys[sel, kv]])
            v_all = torch.cat([r["sv"][:, kv].double(), vals[sel, kv]])
            p = torch.softmax(k_all @ q[h] * SCALE, dim=0)
            torch.testing.assert_close(out[b, h].double(), p @ v_all, rtol=1e-4, atol=1e-5)
        # the selection is each KV head's top-k by the group max of q·k
        s = torch.einsum("kgd,nkd->kgn", q.view(HKV, g, D), keys).amax(1)  # [H_kv, N]
        for kv in range(HKV):
            kth = s[kv].topk(r["k"]).values[-1]
            assert (s[kv, ids[b, kv, : r["k"]]] >= kth - 1e-4).all()


def test_a_nan_row_is_reported_and_the_others_written():
    rows = _rows(2)
    rows[0]["q"][4, 7] = float("nan")  # row 1 selects all its rows: no ranking to refuse (its output is NaN)
    out, _, _, ok = _batched(rows)
    assert ok.tolist() == [False, True, True, True]
    for b in (1, 2, 3):
        assert torch.equal(out[b], _alone(rows[b])[0])
