"""A prefill chunk's attention over keys every query sees plus gathered host rows.

Both prefill routes end here: the exact sparse prefill (runtime/exact_prefill.py) with the
static tier and the rows of the selected blocks, the extrapolating one (runtime/extrapolate.py)
with the window, the remapped sink and the remapped retrieved rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.kernels import KernelSet


def attend_chunk(ops: KernelSet, scale: float, q: Tensor, k: Tensor, v: Tensor, keys: list[Tensor],
                 vals: list[Tensor], gathered: tuple[Tensor, Tensor, Tensor] | None) -> Tensor:
    """The last Tq queries q [Tq, H_q, D] of the chunk k, v [T, H_kv, D] (causal) over
    `keys`/`vals` (each [n, H_kv, D], seen by every query) and gathered host rows
    (gk, gv [n, H_kv, D], valid [H_kv, n]; see host_rows.gather_rows) or None.

    One attention over [*keys, gathered, chunk] (causal: the queries are the last Tq
    keys); gathered rows with per-head padding go through a per-head pass, merged by lse.
    """
    padded = None
    if gathered is not None and gathered[2].shape[1]:
        gk, gv, valid = gathered
        if bool(valid.all()):
            keys, vals = [*keys, gk], [*vals, gv]
        else:
            padded = attend_padded(ops, scale, q, gk, gv, valid)
    kk, vv = torch.cat([*keys, k]), torch.cat([*vals, v])
    if padded is None:  # nothing to merge: the out-only call (on CUDA one flash launch, lower-right)
        return ops.causal_attend(q, kk, vv, scale=scale)
    out, lse = ops.attend(q, kk, vv, scale=scale, causal=True)
    out, _ = ops.merge([out, padded[0]], [lse, padded[1]])
    return out


def attend_padded(ops: KernelSet, scale: float, q: Tensor, gk: Tensor, gv: Tensor,
                  valid: Tensor) -> tuple[Tensor, Tensor]:
    """q [T, H_q, D] over gk, gv [k, H_kv, D], KV head h over its valid [H_kv, k] keys only.
    Returns (out [T, H_q, D], lse [T, H_q] fp32)."""
    hkv = valid.shape[0]
    g = q.shape[1] // hkv
    outs, lses = [], []
    for h in range(hkv):
        # the rows as indices made where valid lies (the CPU): a boolean mask on the device
        # would read its count back (one sync per head)
        rows = valid[h].nonzero()[:, 0].to(gk.device, non_blocking=True)
        o, lse = ops.attend(q[:, h * g : (h + 1) * g], gk[rows, h : h + 1], gv[rows, h : h + 1], scale=scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=1), torch.cat(lses, dim=1)
