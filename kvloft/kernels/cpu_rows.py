"""Exact search and attention of many decode rows on the CPU in one compiled call (numba).

For each row b of a batched decode step (one session's token at one layer), with its host tier
read in place through chunk addresses:

    logits = q_b · K_host_b                 [H_q, N_b]  unscaled, chunk by chunk (cpu_score's scan)
    ids    = each KV head's top-k_b rows     [H_kv, k_b] by the group max (cpu_rank's), k_b = min(budget_b, N_b)
    out_b  = softmax over [static_b | ids]   [H_q, D]    the selected rows' logits read from `logits`
                                                         (cpu_decode's one-softmax pass)

That is index/exact.py's CPU select followed by cpu_decode.select_attend(logits=...), row for
row, through the same compiled loops in the same order, so each row's result equals that route
bit for bit. Where a row takes that route alone, a layer is ~15 torch and numba calls, each a few
to some tens of us of Python and under load a wait on torch's OpenMP threads; here a layer of B
rows is one call. The rows are the work chunks of kernels/cpu_split.py: the caller and the
helper thread take rows from one counter (a row is ~0.2 ms of arithmetic at 2K host rows), and
the caller never waits on a descheduled helper.

Inputs reach the kernel as addresses (a row's tiers are tensors of its own, of any count): `meta`
[B, 8] int64 per row (static K, static V address, static rows, host rows, chunk rows, first
chunk's index into the address tables, k_b, 0) and `kaddr`, `vaddr` [n_chunks] int64 for all
rows' host chunks. Every tensor must be fp32, contiguous, on the CPU, rows [H_kv, D], and stay
alive during the call (the caller holds them). A row whose scores hold a NaN reports it in
`ok` and is left unwritten (torch then ranks it: index/exact.py).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import carray, njit, types
from numba.extending import intrinsic
from torch import Tensor

from kvloft.kernels import cpu_split
from kvloft.kernels.cpu_decode import _one_softmax
from kvloft.kernels.cpu_rank import _group_max_topk
from kvloft.kernels.cpu_score import row_logits
from kvloft.kernels.cpu_split import claim, commit, done, settle
from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH

enabled = True  # False: each row searches and attends alone (index/exact.py select, cpu_decode.select_attend)
META = 8  # int64 fields per row in `meta`
S_K, S_V, S_N, N_HOST, CHUNK_ROWS, CHUNK0, TOPK = range(7)


@intrinsic
def _f32(typingctx, addr):  # int64 address -> float32* (the caller keeps the memory alive)
    sig = types.CPointer(types.float32)(types.int64)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return sig, codegen


@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _row(q, m, kaddr, vaddr, scale, hkv, d, logits, out, lse, ids):
    # one row: q [H_q, D], m = its meta [8]; logits [H_q, >= N], out [H_q, D], lse [H_q], ids [H_kv, >= k] scratch
    hq = q.shape[0]
    g = hq // hkv
    n, cr, c0, k = m[N_HOST], m[CHUNK_ROWS], m[CHUNK0], m[TOPK]
    for ci in range((n + cr - 1) // cr):  # q · every host row, chunk by chunk, read in place
        a = ci * cr
        rows = min(cr, n - a)
        keys = carray(_f32(kaddr[c0 + ci]), (rows, hkv, d))
        row_logits(q, keys, 0, rows, np.float32(1.0), logits[:, a : a + rows])
    lg = logits[:, :n]
    sel_ids = ids[:, :k]
    if k < n:
        if not _group_max_topk(lg, hkv, k, sel_ids):
            return False
    else:  # a budget covering the host tier selects all of it
        for h in range(hkv):
            for c in range(n):
                sel_ids[h, c] = c
    sel = np.empty((hkv, g, k), np.float32)
    selv = np.empty((hkv, k, d), np.float32)
    for h in range(hkv):
        for c in range(k):
            r = sel_ids[h, c]
            for i in range(g):
                sel[h, i, c] = lg[h * g + i, r]
            vc = carray(_f32(vaddr[c0 + r // cr]), (cr, hkv, d))
            for j in range(d):
                selv[h, c, j] = vc[r % cr, h, j]
    s_n = m[S_N]
    sk = carray(_f32(m[S_K]), (s_n, hkv, d))
    sv = carray(_f32(m[S_V]), (s_n, hkv, d))
    _one_softmax(q, sk, sv, sel, selv, scale, out, lse)
    return True


@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _rows(role, q, meta, kaddr, vaddr, scale, n_max, k_max, out, lse, ids, ok, ctl):
    # q [B, H_q, D]; out [B, H_q, D], lse [B, H_q], ids [B, H_kv, k_max], ok [B] uint8; one row a chunk
    _, hq, d = q.shape
    hkv = ids.shape[1]
    logits = np.empty((hq, n_max), np.float32)
    o = np.empty((hq, d), np.float32)
    ls = np.empty(hq, np.float32)
    rid = np.empty((hkv, k_max), np.int64)
    while True:
        c = claim(ctl, role)
        if c < 0:
            break
        good = _row(q[c], meta[c], kaddr, vaddr, scale, hkv, d, logits, o, ls, rid)
        if commit(ctl, c, role):
            ok[c] = good
            if good:
                out[c] = o
                lse[c] = ls
                ids[c] = rid
            done(ctl, c, role)
    settle(ctl, role)


def row_meta(static_k: Tensor, static_v: Tensor, n_host: int, chunk_rows: int, chunk0: int, k: int) -> list[int]:
    """One row's `meta` entry: static_k, static_v [S, H_kv, D] fp32 contiguous (their addresses
    are read here), n_host host rows in chunks of chunk_rows whose addresses start at index
    chunk0 of the tables, k rows to select (0 < k <= n_host)."""
    return [static_k.data_ptr(), static_v.data_ptr(), static_k.shape[0], n_host, chunk_rows, chunk0, k, 0]


def exact_attend_rows(q: Tensor, meta: np.ndarray, kaddr: np.ndarray, vaddr: np.ndarray, *, scale: float,
                      n_kv_heads: int, split: cpu_split.Helper | None = None
                      ) -> tuple[Tensor, Tensor, Tensor, np.ndarray]:
    """Every row's exact search and attention (see the module docstring).

    q: [B, H_q, D] fp32 CPU; meta: [B, META] int64 (row_meta per row); kaddr, vaddr: [n_chunks]
    int64 chunk addresses of every row's host keys and values, each chunk [chunk_rows, H_kv, D]
    fp32 contiguous. Returns out [B, H_q, D] fp32, lse [B, H_q] fp32, ids [B, H_kv, k_max]
    int64 (row b's first meta[b, TOPK] columns hold its selection, in no order) and ok [B]
    bool (False: a NaN score; that row's outputs are not written)."""
    b_n, hq, d = q.shape
    n_max, k_max = int(meta[:, N_HOST].max()), int(meta[:, TOPK].max())
    out = torch.empty((b_n, hq, d), dtype=torch.float32)
    lse = torch.empty((b_n, hq), dtype=torch.float32)
    ids = torch.empty((b_n, n_kv_heads, k_max), dtype=torch.int64)
    ok = np.zeros(b_n, np.uint8)
    args = (q.contiguous().numpy(), meta, kaddr, vaddr, np.float32(scale), n_max, k_max, out.numpy(),
            lse.numpy(), ids.numpy(), ok, cpu_split.new_ctl(b_n))
    cpu_split.run(_rows, args, split if b_n > 1 else None)
    return out, lse, ids, ok.astype(bool)


def warm() -> None:
    """Compile (or load from numba's cache) the batched pass."""
    sk = torch.ones((2, 1, 4))
    hk = torch.ones((3, 1, 4))
    meta = np.array([row_meta(sk, sk, 3, 3, 0, 2)], np.int64)
    addr = np.array([hk.data_ptr()], np.int64)
    exact_attend_rows(torch.ones((1, 2, 4)), meta, addr, addr, scale=0.5, n_kv_heads=1)
