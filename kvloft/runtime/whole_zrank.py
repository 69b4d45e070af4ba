"""rank="z" HiP rows inside the whole decode step (runtime/whole_hip.py): z-scored logits from fixed buffers.

A HiP row with hip option rank="z" (index/hip_zrank.py, index/key_moments.py) scores each query head's
logit z-scored over the layer's indexed keys: it searches with q'_h = q_h / sigma_h and a bias
b_h = q_h · mu_g / sigma_h, where sigma_h^2 = q_h^T Sigma_g q_h. Both depend on the step's query
(made inside the graph) and on the row's key statistics, which move as rows are added; so the
plan phase copies the statistics into fixed buffers and the graph makes q' and bias from them:

    plan    z row, layer with a stage due (HipPlan.z): mean [H_kv, D] and covariance
            [H_kv, D, D] (fp64) -> ZBuffers [L, B, ...] (two device copies); its z flag in the table
    graph   q', bias = zscore_rows(q, mean, cov) for every row (fp64, as select() computes them);
            a row whose flag is off searches with q and a bias of 0 (the same scores as none)

A step with no z row has no such buffers, flags or launches (HipShape.z).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kvloft.index.key_moments import zscore_rows

__all__ = ["ZBuffers"]


class ZBuffers:
    """The key statistics of z rows in a step's slots: mean [L, B, H_kv, D] and cov
    [L, B, H_kv, D, D] fp64, allocated at the first step (the graph reads their addresses),
    L * B * H_kv * (D^2 + D) * 8 bytes (270 MB for 8 rows of Llama-3-8B). Per-step data: the
    whole steps of one bucket share one set (as the stable buffers, whole_step.py
    share_buffers). A slot no z row filled holds mean 0 and the identity (finite numbers, never
    searched with: its z flag is off)."""

    def __init__(self, n_layers: int, batch: int) -> None:
        self.n_layers, self.batch = n_layers, batch
        self.mean: Tensor | None = None
        self.cov: Tensor | None = None

    def allocate(self, like: Tensor) -> None:
        """The buffers for keys like like [rows, H_kv, D] (once)."""
        if self.cov is not None:
            return
        _, hkv, d = like.shape
        self.mean = torch.zeros((self.n_layers, self.batch, hkv, d), dtype=torch.float64, device=like.device)
        eye = torch.eye(d, dtype=torch.float64, device=like.device)
        self.cov = eye.expand(self.n_layers, self.batch, hkv, d, d).contiguous()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * 8 for t in (self.mean, self.cov) if t is not None)

    def fill(self, layer: int, b: int, hip: Any, n: int) -> int:
        """Slot b's statistics of `layer` from its HipRetriever `hip`, whose layer holds n host rows
        -> 1 (its z flag). The statistics counted them already (incremental) unless remade here
        from the keys as select() remakes them (rare: a tier attached in place or rolled back;
        waits for a copy down in flight)."""
        m = hip.moments.get(layer)
        if m is None or m.count != n:
            m = hip._moments_of(layer, hip._keys_of(layer))
        self.mean[layer, b].copy_(m.mean)
        m.covariance(out=self.cov[layer, b])
        return 1

    def queries(self, layer: int, q: Tensor, flags: Tensor) -> tuple[Tensor, Tensor]:
        """q [B, H_q, D], flags [B] int64 (the table's z flags) -> (the queries [B, H_q, D] fp32,
        bias [B, H_q] fp32) the rows search `layer` with: a flagged row's z-scaled query and bias
        (as its select() makes them), another's q and 0. Per row: H_q quadratic forms of D x D."""
        q_z, bias_z = zscore_rows(q, self.mean[layer], self.cov[layer])
        on = flags > 0  # [B]
        return torch.where(on[:, None, None], q_z, q.float()), torch.where(on[:, None], bias_z, 0.0)
