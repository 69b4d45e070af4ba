"""A backend for Transformer.forward that keeps every key so far and attends with torch's SDPA
(causal across a chunk of several rows): the same arithmetic whichever layer route is compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseBackend:
    def __init__(self):
        self.kv = {}

    def attend(self, layer, q, k, v, positions):
        """q [T, H_q, D], k, v [T, H_kv, D] of this call's tokens -> [T, H_q, D]."""
        ks, vs = self.kv.get(layer, (k[:0], v[:0]))
        ks, vs = torch.cat((ks, k)), torch.cat((vs, v))
        self.kv[layer] = ks, vs
        g = q.shape[1] // k.shape[1]
        kk, vv = ks.repeat_interleave(g, 1).transpose(0, 1), vs.repeat_interleave(g, 1).transpose(0, 1)
        mask = torch.ones(q.shape[0], ks.shape[0], dtype=torch.bool, device=q.device).tril(ks.shape[0] - q.shape[0])
        return F.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, attn_mask=mask).transpose(0, 1)
