"""One decode query on the CPU over the static tier and the selected host rows, in one softmax.

The torch path of a retrieval decode step (runtime/exact_decode.py on the CPU). The reference
route attends to the static tier (ATen's flash attention) and to the selected rows
(reference.gather_attend: K and V gathered, the logits computed again) apart, then merges the
two partials by log-sum-exp: three passes and some twenty small ops a layer. Here

    s = [q·K_static | q·K_selected] * scale        [H_kv, g, S + k], one softmax
    o = p_static @ V_static + p_selected @ V_selected

q·K_selected is read from the logits the retriever computed to rank every host row, where it
hands them over (Selection.logits: ExactRetriever searching the host tier in place), instead
of gathering the keys and multiplying again; else from the gathered keys. Rows are gathered
per KV head by one index_select over a chunk viewed as [rows * H_kv, D]
(reference.gather_kv indexes two dimensions and zero-fills the pads: 1K rows of SmolLM2's
3 KV heads cost ~1 ms there, ~60 us here). A pad (-1) reads row 0 and takes logit -inf.
fp32 with the compiled scan on (cpu_score.applies), the logits, the softmax and both sums are
one compiled pass on the caller's thread (_one_softmax): under load each of the torch route's
ops waited on the two OpenMP threads (3-8 ms each at load ~3, docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numba import njit
from torch import Tensor

from kvloft.kernels import cpu_score
from kvloft.kernels.cpu_score import row_logits
from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH
from kvloft.kernels.reference import NEG_INF, _acc

compiled_gather = True  # False: head_rows through torch (index_select per chunk) on fp32 too


@njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)
def _one_softmax(q, sk, sv, sel, selv, scale, out, lse):  # all float32, shapes in _select_compiled
    s_n, hkv, d = sk.shape
    hq = q.shape[0]
    g = hq // hkv
    k = sel.shape[2]
    s = np.empty((hq, s_n + k), np.float32)
    total = np.zeros(hq, np.float32)
    row_logits(q, sk, 0, s_n, scale, s)  # the static keys, each row once, every head at once
    for hh in range(hq):  # one softmax over [static | selected]
        for c in range(k):
            s[hh, s_n + c] = sel[hh // g, hh % g, c] * scale
        m = -np.inf
        for c in range(s_n + k):
            m = max(m, s[hh, c])
        for c in range(s_n + k):
            p = np.exp(s[hh, c] - m) if m > -np.inf else np.float32(0.0)
            s[hh, c] = p
            total[hh] += p
        lse[hh] = m + np.log(total[hh]) if total[hh] > 0 else -np.inf
        for j in range(d):
            out[hh, j] = 0.0
    for r in range(s_n):  # p_static @ V_static, each row once
        for h in range(hkv):
            vr = sv[r, h]
            for i in range(g):
                p = s[h * g + i, r]
                for j in range(d):
                    out[h * g + i, j] += p * vr[j]
    for hh in range(hq):  # + p_selected @ V_selected, then normalized
        for c in range(k):
            p = s[hh, s_n + c]
            vr = selv[hh // g, c]
            for j in range(d):
                out[hh, j] += p * vr[j]
        if total[hh] > 0:
            for j in range(d):
                out[hh, j] /= total[hh]


def _select_compiled(q: Tensor, static_k: Tensor, static_v: Tensor, sel: Tensor, sel_v: Tensor,
                     scale: float) -> tuple[Tensor, Tensor]:
    """select_attend's softmax and sums in one compiled pass on the caller's thread: the torch
    route is about six ops a layer, each under load a wait on the OpenMP threads.
    q [H_q, D]; static_k, static_v [S, H_kv, D] contiguous; sel [H_kv, g, k] unscaled logits of
    the selected rows (-inf: pad); sel_v [H_kv, k, D]; all fp32 CPU -> (out [H_q, D], lse [H_q])."""
    hq, d = q.shape
    out, lse = torch.empty((hq, d), dtype=torch.float32), torch.empty(hq, dtype=torch.float32)
    _one_softmax(q.contiguous().numpy(), static_k.numpy(), static_v.numpy(), sel.contiguous().numpy(),
                 sel_v.contiguous().numpy(), np.float32(scale), out.numpy(), lse.numpy())
    return out, lse


def warm() -> None:
    """Compile (or load from numba's cache) the one-softmax pass and the row gather."""
    q, k = np.ones((2, 4), np.float32), np.ones((3, 1, 4), np.float32)
    _one_softmax(q, k, k, np.ones((1, 2, 1), np.float32), np.ones((1, 1, 4), np.float32), np.float32(0.5),
                 np.empty((2, 4), np.float32), np.empty(2, np.float32))
    _gather_chunk(k, np.zeros((1, 2), np.int64), 0, np.empty((1, 2, 4), np.float32))


@njit(nogil=True, cache=True)
def _gather_chunk(chunk, ids, r0, out):  # chunk [R, H_kv, D], ids [H_kv, k] i64, out [H_kv, k, D]
    rows = chunk.shape[0]
    hkv, k = ids.shape
    for h in range(hkv):
        for j in range(k):
            r = ids[h, j] - r0
            if 0 <= r < rows:
                out[h, j, :] = chunk[r, h, :]


def _head_rows_compiled(chunks: Sequence[Tensor], chunk_rows: int, ids: Tensor) -> Tensor:
    """head_rows for fp32 CPU chunks: each chunk's rows copied by one compiled pass on the
    caller's thread (the torch route's index_select, argsort and cat each wait on the OpenMP
    threads under load). Same arguments and result as head_rows."""
    hkv, k = ids.shape
    out = torch.empty((hkv, k, chunks[0].shape[-1]), dtype=torch.float32)
    idn, on = ids.contiguous().numpy(), out.numpy()
    for c, chunk in enumerate(chunks):
        _gather_chunk(chunk.numpy(), idn, c * chunk_rows, on)
    return out


def head_rows(chunks: Sequence[Tensor], chunk_rows: int, ids: Tensor) -> Tensor:
    """Rows of a chunked token-major store, picked per KV head.

    chunks: each [chunk_rows, H_kv, D] contiguous (row i lives in chunks[i // chunk_rows]);
    ids: [H_kv, k] int64 in [0, rows held), no pads. Returns [H_kv, k, D] (the store's dtype):
    out[h, j] = head h of row ids[h, j]. fp32 CPU chunks: one compiled pass per chunk
    (_head_rows_compiled); else one index_select per chunk touched.
    """
    hkv, k = ids.shape
    d = chunks[0].shape[-1]
    if compiled_gather and chunks[0].dtype == torch.float32 and chunks[0].device.type == "cpu" \
            and ids.device.type == "cpu" and ids.dtype == torch.int64 and all(c.is_contiguous() for c in chunks):
        return _head_rows_compiled(chunks, chunk_rows, ids)
    # each row is H_kv vectors of D: head h of row i is vector i * H_kv + h of its chunk
    flat = (ids * hkv + torch.arange(hkv, device=ids.device)[:, None]).view(-1)  # [H_kv * k]
    if len(chunks) == 1:
        return chunks[0].view(-1, d).index_select(0, flat).view(hkv, k, d)
    per = chunk_rows * hkv
    cid = torch.div(flat, per, rounding_mode="floor")
    order = torch.argsort(cid, stable=True)  # by chunk: each chunk's vectors are one slice
    counts = torch.bincount(cid, minlength=len(chunks)).tolist()
    sflat = flat[order]
    parts, at = [], 0
    for c, n in enumerate(counts):
        if n:
            parts.append(chunks[c].view(-1, d).index_select(0, sflat[at : at + n] - c * per))
        at += n
    out = torch.empty((hkv * k, d), dtype=chunks[0].dtype, device=chunks[0].device)
    out[order] = torch.cat(parts)
    return out.view(hkv, k, d)


def select_attend(
    q: Tensor, static_k: Tensor, static_v: Tensor, host_k: Sequence[Tensor], host_v: Sequence[Tensor],
    chunk_rows: int, ids: Tensor, *, scale: float, logits: Tensor | None = None, padded: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Attention of one query over the static tier and selected host rows, one softmax.

    q: [H_q, D]; static_k, static_v: [S, H_kv, D]; host_k, host_v: the host tier's chunks,
    each [chunk_rows, H_kv, D]; ids: [H_kv, k] or [k] int64 host rows (-1 = pad, read only
    where `padded`); logits: optional [H_q, N] fp32, q·k (unscaled) of every host row, from
    which the selected rows' logits are read instead of from their keys.
    Returns (out [H_q, D] in q's dtype, lse [H_q] fp32): equal to merging decode_attend over
    the static tier with gather_attend over the selection (GQA: head h reads KV head h // g).
    """
    hq, d = q.shape
    s_n, hkv = static_k.shape[0], static_k.shape[1]
    g = hq // hkv
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    k = ids.shape[1]
    qg = _acc(q).view(hkv, g, d)
    safe = ids.clamp_min(0) if padded else ids
    if not k:
        sel = qg.new_empty((hkv, g, 0))
    elif logits is not None:
        sel = logits.view(hkv, g, -1).gather(2, safe[:, None, :].expand(hkv, g, k))  # [H_kv, g, k]
    else:
        sel = torch.bmm(qg, _acc(head_rows(host_k, chunk_rows, safe)).transpose(1, 2))
    if padded:
        sel = sel.masked_fill((ids < 0)[:, None, :], NEG_INF)
    if cpu_score.applies(q, static_k) and static_v.is_contiguous() and sel.dtype == torch.float32 \
            and (not k or host_v[0].dtype == torch.float32):
        sel_v = head_rows(host_v, chunk_rows, safe) if k else q.new_empty((hkv, 0, d))
        return _select_compiled(q, static_k, static_v, sel, sel_v, scale)
    if cpu_score.applies(q, static_k):  # the static keys scanned in order (~2x bmm's speed)
        static = cpu_score.score_rows(q, static_k).view(hkv, g, s_n)
    else:
        static = torch.bmm(qg, _acc(static_k).permute(1, 2, 0))
    s = torch.cat([static, sel], dim=2).mul_(scale)  # [H_kv, g, S + k]
    lse = torch.logsumexp(s, dim=-1)  # [H_kv, g]
    p = s.sub_(lse.clamp_min(torch.finfo(lse.dtype).min)[..., None]).exp_()
    out = torch.bmm(p[..., :s_n], _acc(static_v).transpose(0, 1))  # [H_kv, g, D]
    if k:
        out = out.baddbmm_(p[..., s_n:], _acc(head_rows(host_v, chunk_rows, safe)))
    return out.view(hq, d).to(q.dtype), lse.view(hq)
