"""Attention over retrieved host rows on the CPU, next to the host tier (attention_graph on CUDA)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from kvloft.tiers.chunked import ChunkedRows

__all__ = ["cpu_partial_attention"]


def cpu_partial_attention(
    q: Tensor, host_k: ChunkedRows, host_v: ChunkedRows, ids: Tensor, *, scale: float | None = None
) -> tuple[Tensor, Tensor]:
    """Attention of one decode query over per-head retrieved host rows, on the CPU.

    q [H_q, D]; host_k, host_v: ChunkedRows of rows [H_kv, D]; ids [H_kv, k] int64
    (-1 = padding) or [k] shared. Rows are gathered chunk by chunk from the store (no
    copy of the tier). Returns (out [H_q, D] in q.dtype, lse [H_q] fp32), equal to
    kernels.reference.gather_attend on the same rows. scale defaults to 1/sqrt(D).
    """
    hq, d = q.shape
    hkv = host_k.row_shape[0]
    if host_k.row_shape != (hkv, d) or host_v.row_shape[0] != hkv or len(host_v) != len(host_k):
        raise ValueError(
            f"host_k rows must be [H_kv, {d}] and host_v hold as many rows; got "
            f"{host_k.row_shape} ({len(host_k)} rows) and {host_v.row_shape} ({len(host_v)} rows)"
        )
    if hq % hkv:
        raise ValueError(f"H_q ({hq}) must be a multiple of H_kv ({hkv})")
    if ids.dim() == 1:
        ids = ids[None].expand(hkv, -1)
    if ids.shape[0] != hkv:
        raise ValueError(f"ids must be [H_kv={hkv}, k] or [k], got {list(ids.shape)}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if ids.shape[1] == 0:
        return q.new_zeros(q.shape), torch.full((hq,), float("-inf"), dtype=torch.float32, device=q.device)
    acc = torch.promote_types(host_k.dtype, torch.float32)  # fp32 (fp64 for fp64 rows), as the reference
    g = hq // hkv
    ids = ids.to(host_k.device)
    valid = ids >= 0  # [H_kv, k]
    safe = ids.clamp_min(0)
    head = torch.arange(hkv, device=ids.device)[:, None].expand_as(ids)
    k = host_k.rows(safe, head).to(acc)  # [H_kv, k, D], gathered chunk by chunk
    v = host_v.rows(safe, head).to(acc)
    qg = q.to(host_k.device, acc).view(hkv, g, d)  # [H_kv, g, D]
    logits = torch.bmm(qg, k.transpose(1, 2)).mul_(scale)  # [H_kv, g, k]
    logits.masked_fill_(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [H_kv, g]
    p = logits.sub_(lse.clamp_min(torch.finfo(acc).min)[..., None]).exp_()
    out = torch.bmm(p, v)  # [H_kv, g, D]
    return out.reshape(hq, d).to(q.dtype), lse.reshape(hq).float()
