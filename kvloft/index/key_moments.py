"""Running mean and covariance of a layer's indexed keys, per KV head, for z-scored logits.

HiP's rank="z" (index/hip.py, index/hip_zrank.py) compares query heads whose logits sit on
different scales (a KV head whose keys share a large mean component): for query head h over
KV head g the mean over keys of q_h · k is q_h · mu_g and the variance q_h^T Sigma_g q_h, so

    z_h(k) = (q_h · k - q_h · mu_g) / sigma_h = q'_h · k - b_h,
    q'_h = q_h / sigma_h,  b_h = q_h · mu_g / sigma_h,

and the search kernel scores max_h (q'_h · k - b_h) with q' as its query and b as its bias.

Statistics are merged batch by batch (Chan et al.'s pairwise update of the mean and the
centred second moment, fp64: no E[kk^T] - mu mu^T cancellation on keys with a large mean):
O(n * D^2) per H_kv for a batch of n rows, nothing rescanned. Per select: H_q dot products of
D and H_q quadratic forms of D x D (a D-vector and a scalar per query head).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["KeyMoments", "zscore_rows"]

# The variance floor relative to |q_h|^2 * trace(Sigma_g) / D: a head whose query is
# orthogonal to every direction the keys vary in scores all keys alike instead of by noise.
_VAR_FLOOR = 1e-10


class KeyMoments:
    """count, mean [H_kv, D] and centred second moment m2 [H_kv, D, D] (fp64) of the rows added."""

    def __init__(self, n_kv_heads: int, head_dim: int, device: torch.device) -> None:
        self.count = 0
        self.mean = torch.zeros(n_kv_heads, head_dim, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_kv_heads, head_dim, head_dim, dtype=torch.float64, device=device)

    def add(self, rows: Tensor) -> None:
        """rows [n, H_kv, D] (token-major, as the key store holds them), any float dtype/device."""
        n = rows.shape[0]
        if n == 0:
            return
        x = rows.to(self.mean.device, torch.float64).transpose(0, 1)  # [H_kv, n, D]
        mean_b = x.mean(dim=1)  # [H_kv, D]
        xc = x - mean_b[:, None]
        m2_b = torch.bmm(xc.transpose(1, 2), xc)  # [H_kv, D, D]
        total = self.count + n
        delta = mean_b - self.mean  # [H_kv, D]
        self.m2 += m2_b + torch.einsum("hi,hj->hij", delta, delta) * (self.count * n / total)
        self.mean += delta * (n / total)
        self.count = total

    def covariance(self, out: Tensor | None = None) -> Tensor:
        """[H_kv, D, D] fp64 population covariance (divided by count) of the rows added; written
        into out (a fixed buffer of that shape and dtype, e.g. a captured step's) where given."""
        return torch.div(self.m2, max(self.count, 1), out=out)

    def zscore(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """q [H_q, D] -> (q' [H_q, D] fp32, bias [H_q] fp32) on q's device: q'_h · k - bias_h is
        head h's logit z-scored over the rows added (GQA: head h reads KV head h // group)."""
        q_z, bias = zscore_rows(q.to(self.mean.device)[None], self.mean[None], self.covariance()[None])
        return q_z[0].to(q.device), bias[0].to(q.device)


def zscore_rows(q: Tensor, mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor]:
    """KeyMoments.zscore for B rows at once, each with its own statistics (the whole decode step
    runs it inside its graph, runtime/whole_hip.py): q [B, H_q, D] any float dtype, mean
    [B, H_kv, D] and cov [B, H_kv, D, D] fp64 on q's device -> (q' [B, H_q, D] fp32, bias [B, H_q]
    fp32). Per row: H_q quadratic forms of D x D and H_q dot products of D, in fp64."""
    nb, hkv, d = mean.shape
    group = q.shape[1] // hkv
    qg = q.to(torch.float64).view(nb, hkv, group, d)  # [B, H_kv, G, D]
    var = torch.einsum("bhgi,bhij,bhgj->bhg", qg, cov, qg)  # [B, H_kv, G]
    scale = qg.square().sum(-1) * (cov.diagonal(dim1=2, dim2=3).sum(-1, keepdim=True) / d)
    sigma = torch.maximum(var, _VAR_FLOOR * scale).clamp_min(1e-300).sqrt()  # [B, H_kv, G]
    bias = torch.einsum("bhgi,bhi->bhg", qg, mean) / sigma
    q_z = qg / sigma[..., None]
    return q_z.reshape(q.shape).to(torch.float32), bias.reshape(nb, -1).to(torch.float32)
