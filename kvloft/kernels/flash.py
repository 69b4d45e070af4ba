"""Prefill attention on CUDA through PyTorch's fused kernels.

`attend(q, k, v, scale=..., causal=...)` has the reference's signature (kernels/reference.py:
q [Tq, H_q, D], k, v [Tk, H_kv, D] -> out [Tq, H_q, D], lse [Tq, H_q] fp32, natural log),
so the tiered prefill can merge its partials exactly. `causal` means the queries are the
*last* Tq keys (lower-right aligned). Routes, first that applies:

- flash (`aten._scaled_dot_product_flash_attention`, FlashAttention-2): fp16/bf16, head dim
  a multiple of 8 up to 256, an sm80+ card. One launch per call: this op's causal mask is
  lower-right (what `torch.nn.attention.bias.causal_lower_right` dispatches to), and it
  reads a KV head for its whole query group (GQA without a copy). Returns the lse.
- efficient (`aten._scaled_dot_product_efficient_attention`), for what flash does not take
  (older cards): each KV head is expanded to its query group (a copy of K and V,
  [Tk, H_q, D]) and, its causal mask being top-left, a chunk over a longer prefix is split
  into the unmasked prefix and the causal square, merged by lse.
- the reference (fp32, CPU tensors, other head dims).

On sm90/sm100 cards (where PyTorch itself prefers cuDNN's attention) a causal call whose
queries are fewer than its keys goes to cuDNN instead (`aten._scaled_dot_product_cudnn_attention`),
split into the unmasked prefix and the causal square, both kernels cuDNN runs, merged by their lse:
FlashAttention-2's lower-right kernel ran a 14,336 x 30,720 chunk at ~295 TFLOP/s on an H200,
cuDNN's square causal kernel ~450 (docs/performance.md). Only for chunks of at least
CUDNN_MIN_QUERIES queries: cuDNN plans each new (Tq, Tk) once (a cost per shape, on the host) and
every chunk's prefix has a new Tk, so a short chunk (a chat turn after a long context) would pay
a plan for a kernel that saves it little; FlashAttention-2 has no per-shape plan.

`causal_attend(q, k, v, scale=...)` is the out-only form for callers that merge nothing
(DenseAttention: a chunk over every earlier token): public `F.scaled_dot_product_attention`
with `causal_lower_right(Tq, Tk)` and `enable_gqa`, the same flash kernel on CUDA. The CPU
runs the same call (a materialized mask), so the tests compare it with the reference there.

`workspace_bytes` prices what a call allocates, for the memory plan (scheduler/budget.py).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from kvloft.kernels import reference

__all__ = ["attend", "causal_attend", "cudnn_supported", "flash_supported", "fused_supported", "sdpa_causal",
           "shape_supported", "workspace_bytes"]

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention", None)
_CUDNN = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
FLASH_MAX_HEAD_DIM = 256
CUDNN_MAX_HEAD_DIM = 128
CUDNN_MIN_QUERIES = 4096  # shorter chunks keep the flash route (see the module doc)
EFFICIENT_MAX_HEAD_DIM = 128


def fused_supported(q: Tensor, k: Tensor) -> bool:
    """ATen's efficient attention takes q [.., D] and k (CUDA, fp16/bf16, D % 8 == 0, D <= 128)."""
    d = q.shape[-1]
    return (q.is_cuda and k.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and k.dtype == q.dtype
            and d % 8 == 0 and d <= EFFICIENT_MAX_HEAD_DIM)


@functools.lru_cache(maxsize=16)
def _flash_card(index: int) -> bool:
    """FlashAttention-2 runs on sm80 and newer (read once per device)."""
    return torch.cuda.get_device_capability(index) >= (8, 0)


def flash_supported(q: Tensor, k: Tensor) -> bool:
    """The flash route takes q [Tq, H_q, D], k [Tk, H_kv, D]: CUDA, fp16/bf16, D % 8 == 0 and
    D <= 256, an sm80+ card, the flash backend enabled (torch.backends.cuda)."""
    d = q.shape[-1]
    return (_FLASH is not None and q.is_cuda and k.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k.dtype == q.dtype and d % 8 == 0 and d <= FLASH_MAX_HEAD_DIM
            and q.shape[1] % k.shape[1] == 0 and torch.backends.cuda.flash_sdp_enabled()
            and _flash_card(q.device.index if q.device.index is not None else torch.cuda.current_device()))


@functools.lru_cache(maxsize=16)
def _cudnn_card(index: int) -> bool:
    """Hopper and Blackwell data-center cards (sm90, sm100), where PyTorch ranks cuDNN first."""
    return torch.cuda.get_device_capability(index)[0] in (9, 10)


def cudnn_supported(q: Tensor, k: Tensor) -> bool:
    """The cuDNN route takes q [Tq, H_q, D], k [Tk, H_kv, D] where the flash route does, with
    Tq >= CUDNN_MIN_QUERIES, D <= 128, the cuDNN backend enabled (torch.backends.cuda) and an
    sm90/sm100 card."""
    return (_CUDNN is not None and q.is_cuda and q.shape[0] >= CUDNN_MIN_QUERIES and flash_supported(q, k)
            and q.shape[-1] <= CUDNN_MAX_HEAD_DIM
            and torch.backends.cuda.cudnn_sdp_enabled()
            and _cudnn_card(q.device.index if q.device.index is not None else torch.cuda.current_device()))


def _bhtd(x: Tensor, group: int = 1) -> Tensor:
    """[T, H, D] -> [1, H * group, T, D] (each head repeated `group` times, in query-head order;
    group 1: a view). The kernels need the last dimension contiguous."""
    if group > 1:
        x = x.repeat_interleave(group, dim=1)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.transpose(0, 1).unsqueeze(0)


def _flash(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """One FlashAttention-2 call; causal lower-right; K/V heads read for their group in place."""
    tq = q.shape[0]
    out, lse = _FLASH(_bhtd(q), _bhtd(k), _bhtd(v), 0.0, is_causal=causal, scale=scale)[:2]
    # out [1, H_q, Tq, D] (a view of [Tq, H_q, D] memory); lse [1, H_q, Tq] fp32
    return out[0].transpose(0, 1).contiguous(), lse[0, :, :tq].transpose(0, 1).contiguous().float()


def _efficient(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """ATen's memory-efficient attention (causal: top-left, so square calls only)."""
    tq = q.shape[0]
    g = q.shape[1] // k.shape[1]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        _bhtd(q), _bhtd(k, g), _bhtd(v, g), None, True, 0.0, causal, scale=scale
    )[:2]
    # out [1, H_q, Tq, D]; lse [1, H_q, >= Tq] (padded to the kernel's block)
    return out[0].transpose(0, 1).contiguous(), lse[0, :, :tq].transpose(0, 1).contiguous().float()


def _cudnn(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """One cuDNN call (causal: top-left, so square calls only); K/V heads read for their group."""
    tq, hq = q.shape[:2]
    out, lse = _CUDNN(_bhtd(q), _bhtd(k), _bhtd(v), None, True, 0.0, causal, False, scale=scale)[:2]
    # out [1, H_q, Tq, D]; lse [1, H_q, Tq] or [1, H_q, Tq, 1] fp32
    return out[0].transpose(0, 1), lse.reshape(hq, -1)[:, :tq].transpose(0, 1).float()


def _cudnn_attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """attend() through cuDNN: a lower-right causal chunk with Tq < Tk as its unmasked prefix
    k[:Tk - Tq] and its causal square k[Tk - Tq:], merged."""
    tq, tk = q.shape[0], k.shape[0]
    if not causal or tq == tk:
        out, lse = _cudnn(q, k, v, scale, causal)
        return out.contiguous(), lse.contiguous()
    p = tk - tq
    o1, l1 = _cudnn(q, k[:p], v[:p], scale, False)
    o2, l2 = _cudnn(q, k[p:], v[p:], scale, True)
    # the Triton merge where the op runs (CUDA: one pass over both parts); the reference elsewhere
    # (tests emulate the op on the CPU)
    if q.is_cuda:
        from kvloft.kernels.merge import merge

        return merge([o1, o2], [l1, l2])
    return reference.merge([o1, o2], [l1, l2])


# the fused route of the efficient kernel; tests swap it for an emulation on the CPU
_fused = _efficient


def attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float, causal: bool = False) -> tuple[Tensor, Tensor]:
    """Softmax attention of Tq queries over Tk keys (the reference's contract; see the module doc)."""
    tq, tk = q.shape[0], k.shape[0]
    if tk == 0 or tq == 0 or (causal and tq > tk):
        return reference.attend(q, k, v, scale=scale, causal=causal)
    if causal and tq < tk and cudnn_supported(q, k):
        return _cudnn_attend(q, k, v, scale, causal)
    if flash_supported(q, k):
        return _flash(q, k, v, scale, causal)
    if not fused_supported(q, k):
        return reference.attend(q, k, v, scale=scale, causal=causal)
    if not causal or tq == tk:
        return _fused(q, k, v, scale, causal)
    o1, l1 = _fused(q, k[: tk - tq], v[: tk - tq], scale, False)
    o2, l2 = _fused(q, k[tk - tq :], v[tk - tq :], scale, True)
    return reference.merge([o1, o2], [l1, l2])


# F.scaled_dot_product_attention takes enable_gqa from torch 2.5 (pyproject allows 2.4)
_ENABLE_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def sdpa_causal(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    """q [Tq, H_q, D] over k, v [Tk, H_kv, D] (Tq <= Tk), the queries the last Tq keys, through
    public SDPA with a lower-right causal mask -> out [Tq, H_q, D] in q's dtype.

    GQA through enable_gqa (no copy of K, V) where this torch has it, else K and V expanded."""
    from torch.nn.attention.bias import causal_lower_right

    tq, tk, g = q.shape[0], k.shape[0], q.shape[1] // k.shape[1]
    if tq > tk:
        raise ValueError(f"a causal chunk needs Tq <= Tk (queries are the last keys), got Tq={tq}, Tk={tk}")
    kw = {"enable_gqa": True} if _ENABLE_GQA and g > 1 else {}
    group = 1 if kw or g == 1 else g
    mask = {"is_causal": True} if tq == tk else {"attn_mask": causal_lower_right(tq, tk)}
    out = F.scaled_dot_product_attention(_bhtd(q), _bhtd(k, group), _bhtd(v, group), scale=scale, **mask, **kw)
    return out[0].transpose(0, 1).contiguous()  # [Tq, H_q, D]


def causal_attend(q: Tensor, k: Tensor, v: Tensor, *, scale: float) -> Tensor:
    """attend(q, k, v, causal=True)'s out alone (KernelSet.causal_attend): a chunk shorter than
    its keys through cuDNN's two kernels where that route applies, else public SDPA (a square
    chunk: cuDNN's or flash's causal kernel, PyTorch's choice; a longer one: flash's lower-right
    kernel) where the flash route applies, else `attend`."""
    tq, tk = q.shape[0], k.shape[0]
    if tq and tq < tk and cudnn_supported(q, k):
        return _cudnn_attend(q, k, v, scale, True)[0]
    if tq and tq <= tk and flash_supported(q, k):
        return sdpa_causal(q, k, v, scale=scale)
    return attend(q, k, v, scale=scale, causal=True)[0]


def workspace_bytes(tq: int, tk: int, hq: int, hkv: int, d: int, itemsize: int, *, fused: bool) -> int:
    """Upper bound of the device bytes one attend() of Tq queries over Tk keys allocates
    beyond its inputs. fused (the flash and cuDNN routes): out and lse; the cuDNN split's two
    partial outs and the merge's stacked copy of them; no [Tq, Tk] logits, no copy of K, V. Else the reference on the device: fp32 logits
    [H_q, Tq, Tk], fp32 copies of K and V, fp32 queries and out."""
    if fused:
        return tq * hq * (d * 5 * itemsize + 3 * 4)
    return hq * tq * tk * 4 + 2 * tk * hkv * d * 4 + tq * hq * d * (4 + itemsize)


def shape_supported(head_dim: int, itemsize: int) -> bool:
    """A model with this head dim and compute dtype's item size takes the flash route on sm80+."""
    return itemsize == 2 and head_dim % 8 == 0 and head_dim <= FLASH_MAX_HEAD_DIM
