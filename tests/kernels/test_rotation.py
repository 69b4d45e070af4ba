"""RoPE position remapping: rotate_keys and gather_attend with rot_delta (reference and Triton).

Rotating a key stored at position p by delta must equal RoPE applied at p + delta to the
unrotated key (runtime/model.py `rotate`), delta 0 must be the identity, and the Triton
kernel must match the reference under the flash-attention tolerance rule.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvloft.config import ModelConfig
from kvloft.kernels import reference
from kvloft.kernels.sparse_decode import gather_attend
from kvloft.runtime.model import rope_inv_freq, rotate


def make(hq, hkv, d, n_rows):
    return torch.randn(hq, d), torch.randn(n_rows, hkv, d), torch.randn(n_rows, hkv, d)


def random_ids(hkv, n_rows, n, n_pad=0, shared=False):
    """Duplicate-free ids in random order, the last n_pad of each list set to -1."""
    ids = torch.stack([torch.randperm(n_rows)[:n] for _ in range(1 if shared else hkv)])
    ids[:, n - n_pad :] = -1
    return ids[0] if shared else ids


def assert_rule(got, base, exact, what, floor=None):
    """Flash-attention rule: max|got - exact| <= 2 max|base - exact| + floor (4 fp32 ulps of max|exact|)."""
    exact = exact.double()
    fin = torch.isfinite(exact)
    assert torch.equal(torch.isfinite(got), fin), f"{what}: finiteness differs"
    if floor is None:
        floor = 4 * torch.finfo(torch.float32).eps * max(1.0, exact[fin].abs().max().item())
    err = (got.double()[fin] - exact[fin]).abs().max().item()
    base_err = (base.double()[fin] - exact[fin]).abs().max().item()
    assert err <= 2 * base_err + floor, f"{what}: kernel error {err:.3g} > 2 x torch error {base_err:.3g}"


def inv_freq(d: int, theta: float = 100000.0) -> torch.Tensor:
    return rope_inv_freq(ModelConfig(hidden_size=d, n_heads=1, n_kv_heads=1, head_dim=d, rope_theta=theta))


def rope(pos: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [T, D] as Transformer.rope computes them (fp64 angles)."""
    ang = pos.double()[:, None] * inv.double()[None]
    ang = torch.cat((ang, ang), dim=-1)
    return ang.cos().float(), ang.sin().float()


def rotated_oracle(q, k_rows, v_rows, ids, delta, inv, scale):
    """fp64 attention over k_rows[ids], each key rotated by its delta in fp64."""
    hkv = k_rows.shape[1]
    ids = ids if ids.dim() == 2 else ids[None].expand(hkv, -1)
    delta = delta if delta.dim() == 2 else delta[None].expand(hkv, -1)
    k64 = reference.gather_kv(k_rows.double(), ids)  # [n, H_kv, D]
    k64 = reference.rotate_keys(k64, delta, inv)
    rows = k64.transpose(0, 1)  # [H_kv, n, D]
    group = q.shape[0] // hkv
    outs, lses = [], []
    for h in range(q.shape[0]):
        kv = h // group
        keep = ids[kv] >= 0
        if not keep.any():
            outs.append(torch.zeros(q.shape[1], dtype=torch.float64, device=q.device))
            lses.append(torch.tensor(-math.inf, dtype=torch.float64, device=q.device))
            continue
        logits = rows[kv][keep] @ q[h].double() * scale
        lse = torch.logsumexp(logits, 0)
        outs.append(torch.exp(logits - lse) @ v_rows[ids[kv][keep], kv].double())
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("d", [16, 48, 64])
def test_rotation_by_delta_equals_rope_at_new_position(d):
    inv = inv_freq(d)
    k0 = torch.randn(37, 3, d)  # unrotated keys
    p = torch.randint(0, 200_000, (37,))
    delta = torch.randint(-150_000, 900_000, (37,))
    delta = torch.maximum(delta, -p)  # new positions stay >= 0
    stored = rotate(k0, *rope(p, inv))
    moved = reference.rotate_keys(stored, delta, inv)
    want = rotate(k0, *rope(p + delta, inv))
    torch.testing.assert_close(moved, want, rtol=0, atol=2e-5)


def test_per_head_delta_and_identity():
    inv = inv_freq(32)
    k0 = torch.randn(11, 3, 32)
    p = torch.randint(0, 5000, (3, 11))  # a different position per KV head
    delta = torch.randint(0, 5000, (3, 11))
    stored = torch.stack([rotate(k0[:, h : h + 1], *rope(p[h], inv))[:, 0] for h in range(3)], 1)
    moved = reference.rotate_keys(stored, delta, inv)
    want = torch.stack([rotate(k0[:, h : h + 1], *rope(p[h] + delta[h], inv))[:, 0] for h in range(3)], 1)
    torch.testing.assert_close(moved, want, rtol=0, atol=2e-5)
    assert torch.equal(reference.rotate_keys(stored, torch.zeros(11, dtype=torch.long), inv), stored)


@pytest.mark.parametrize(
    "hq,hkv,d,n_rows,n,n_pad,shared",
    [(9, 3, 48, 200, 97, 5, False), (7, 7, 16, 60, 33, 0, False), (9, 3, 32, 150, 97, 0, True)],
)
def test_triton_rotated_gather_matches_reference(hq, hkv, d, n_rows, n, n_pad, shared):
    q, k, v = make(hq, hkv, d, n_rows)
    ids = random_ids(hkv, n_rows, n, n_pad, shared)
    delta = torch.randint(-1_000_000, 1_000_000, ids.shape)
    inv = inv_freq(d, theta=10000.0)
    scale = d**-0.5
    out, lse = gather_attend(q, k, v, ids, scale=scale, rot_delta=delta, inv_freq=inv)
    ref_out, ref_lse = reference.gather_attend(q, k, v, ids, scale=scale, rot_delta=delta, inv_freq=inv)
    ex_out, ex_lse = rotated_oracle(q, k, v, ids, delta, inv, scale)
    assert_rule(out, ref_out, ex_out, "out")
    assert_rule(lse, ref_lse, ex_lse, "lse")
    # the rotation matters: without it the result is far off
    plain, _ = reference.gather_attend(q, k, v, ids, scale=scale)
    assert (plain - ex_out).abs().max() > 100 * (out.double() - ex_out).abs().max()


def test_zero_delta_is_plain_gather():
    q, k, v = make(9, 3, 32, 120)
    ids = random_ids(3, 120, 50, n_pad=4)
    inv = inv_freq(32)
    zero = torch.zeros_like(ids)
    for op in (gather_attend, reference.gather_attend):
        got = op(q, k, v, ids, scale=0.2, rot_delta=zero, inv_freq=inv)
        want = op(q, k, v, ids, scale=0.2)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_rotation_bad_inputs():
    q, k, v = make(9, 3, 32, 20)
    ids = random_ids(3, 20, 8)
    inv = inv_freq(32)
    with pytest.raises(ValueError, match="together"):
        gather_attend(q, k, v, ids, scale=1.0, rot_delta=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="one delta per id"):
        gather_attend(q, k, v, ids, scale=1.0, rot_delta=torch.zeros(3, 7, dtype=torch.long), inv_freq=inv)
    with pytest.raises(ValueError, match=r"D/2=16"):
        gather_attend(q, k, v, ids, scale=1.0, rot_delta=torch.zeros_like(ids), inv_freq=inv[:8])
    with pytest.raises(TypeError, match="int32 or int64"):
        gather_attend(q, k, v, ids, scale=1.0, rot_delta=torch.zeros(3, 8), inv_freq=inv)
    with pytest.raises(ValueError, match="delta must be"):
        reference.rotate_keys(k, torch.zeros(5, dtype=torch.long), inv)


def plain_lowp_rotated(q, k_rows, v_rows, ids, delta, inv, scale):
    """Rotated gather attention in q's dtype with torch ops (the 'same precision' baseline on GPU)."""
    hq, hkv = q.shape[0], k_rows.shape[1]
    ids = ids if ids.dim() == 2 else ids[None].expand(hkv, -1)
    g = hq // hkv
    k = reference.rotate_keys(reference.gather_kv(k_rows, ids), delta, inv)  # [n, H_kv, D] in q.dtype
    k = k.transpose(0, 1).repeat_interleave(g, 0)  # [H_q, n, D]
    v = reference.gather_kv(v_rows, ids).transpose(0, 1).repeat_interleave(g, 0)
    logits = torch.einsum("hd,hnd->hn", q, k) * scale
    logits = logits.masked_fill((ids < 0).repeat_interleave(g, 0), -math.inf)
    return torch.einsum("hn,hnd->hd", torch.softmax(logits, -1), v), torch.logsumexp(logits, -1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_rotated_gather(dtype, d):
    hq, hkv, n_rows = 32, 8, 5000
    q, k, v = (x.to("cuda", dtype) for x in make(hq, hkv, d, n_rows))
    inv = inv_freq(d, theta=500000.0).cuda()
    scale = d**-0.5
    for ids in (random_ids(hkv, n_rows, 3000, 100).cuda(), random_ids(hkv, n_rows, 4097, shared=True).cuda()):
        delta = torch.randint(-1_000_000, 1_000_000, ids.shape, device="cuda")
        out, lse = gather_attend(q, k, v, ids, scale=scale, rot_delta=delta, inv_freq=inv, check_ids=True)
        base_out, base_lse = plain_lowp_rotated(q, k, v, ids, delta, inv, scale)
        ex_out, ex_lse = rotated_oracle(q, k, v, ids, delta, inv, scale)
        assert_rule(out, base_out, ex_out, "out", floor=1e-3)
        assert_rule(lse, base_lse, ex_lse, "lse", floor=1e-3)
    host = gather_attend(
        q, k.cpu().pin_memory(), v.cpu().pin_memory(), ids, scale=scale, rot_delta=delta, inv_freq=inv
    )
    assert torch.equal(host[0], out) and torch.equal(host[1], lse)  # zero-copy rows, same result
