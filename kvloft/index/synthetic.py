"""Deterministic synthetic attention data with the out-of-distribution property.

Shared by the index tests and bench/index_recall.py (a named workload, labelled
"synthetic-ood" wherever its figures appear). It mimics what RetrievalAttention measured
on real LLM traces: keys and queries come from different distributions.

Keys, per KV head: k = mu_k + z @ S_k + noise, z ~ N(0, I_r): a large shared offset
(as real keys carry), a few structured directions of large variance, N(0, 1) noise.
Queries, per query head: q = mu_q + z' @ S_q + noise, with mu_q in a direction away
from mu_k and S_q a rotation of S_k mixed with fresh directions: the query cloud sits
apart from the key cloud, and a query's top keys (by q . k) lie on the rim of the key
cloud, far (in key-to-key terms) from where a key-only graph would route it.
The query heads of one GQA group read one latent per token (the same hidden state) through
slightly different (jittered) structure matrices, plus their own noise.
`query_scale` sharpens the softmax without changing any ranking: at 2.0 (default), N = 20K,
D = 64, the top 100 keys hold ~88% of a query's attention mass (top 10: ~66%), a
concentration like that of trained heads; at 1.0 they hold ~43%.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["OODData", "ood_attention_data"]


@dataclass
class OODData:
    """keys [H_kv, N, D]; values [H_kv, N, D]; train_queries [H_q, M, D] (the prefill
    sample an index may learn from); test_queries [H_q, T, D] (decode queries, unseen)."""

    keys: Tensor
    values: Tensor
    train_queries: Tensor
    test_queries: Tensor
    label: str


def _orthonormal(d: int, r: int, gen: torch.Generator) -> Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, r, generator=gen))
    return q.T  # [r, D], orthonormal rows


def ood_attention_data(
    n_keys: int,
    n_train: int,
    n_test: int,
    *,
    dim: int = 64,
    n_kv_heads: int = 1,
    group: int = 1,
    rank: int = 8,
    key_offset: float = 6.0,
    query_offset: float = 6.0,
    structure_scale: float = 3.0,
    head_jitter: float = 0.3,
    query_scale: float = 2.0,
    seed: int = 0,
) -> OODData:
    """Per KV head, keys and (train, test) queries of its `group` query heads; all fp32."""
    gen = torch.Generator().manual_seed(seed)
    keys, values, train, test = [], [], [], []
    for _ in range(n_kv_heads):
        basis = _orthonormal(dim, 2 * rank + 2, gen)  # [2r+2, D]
        mu_k, mu_q = basis[0] * key_offset, basis[1] * query_offset
        s_k = basis[2 : 2 + rank] * structure_scale  # [r, D]
        # query structure: half the key directions (rotated sign/scale), half new ones
        mix = torch.cat([basis[2 : 2 + rank // 2], basis[2 + rank : 2 + rank + rank - rank // 2]])
        s_q = mix * structure_scale
        z = torch.randn(n_keys, rank, generator=gen)
        keys.append(mu_k + z @ s_k + torch.randn(n_keys, dim, generator=gen))
        values.append(torch.randn(n_keys, dim, generator=gen))
        # one latent per token, shared by the group's heads (they read the same hidden state)
        z_train = torch.randn(n_train, rank, generator=gen)
        z_test = torch.randn(n_test, rank, generator=gen)
        for _ in range(group):
            s_h = s_q + torch.randn(rank, dim, generator=gen) * head_jitter / dim**0.5
            for store, zq in ((train, z_train), (test, z_test)):
                q = mu_q + zq @ s_h + 0.5 * torch.randn(zq.shape[0], dim, generator=gen)
                store.append(query_scale * q)
    label = (
        f"synthetic-ood(N={n_keys}, D={dim}, H_kv={n_kv_heads}, group={group}, rank={rank}, seed={seed})"
    )
    return OODData(
        keys=torch.stack(keys),
        values=torch.stack(values),
        train_queries=torch.stack(train),
        test_queries=torch.stack(test),
        label=label,
    )
