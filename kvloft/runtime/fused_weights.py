"""Linears that read one input, held as row slices of one weight, so a few-row call is one GEMM.

A layer's q/k/v projections (and biases, as Qwen has) become row slices of one
[(H_q + 2 H_kv) D, hidden] tensor, gate/up of one [2 I, hidden]: row slices of a row-major
matrix are contiguous, so each module keeps working through F.linear on its own slice, its
parameter keeps its name (state dicts, fingerprints, HF comparisons unchanged) and no memory
is doubled. `fuse` then hands back the whole tensor for one F.linear. Only plain nn.Linear
weights fuse (a QuantLinear's packed weight stays as it is: `fuse` returns None).

The down projection and the residual add after it are one GEMM where down is a plain 16-bit
nn.Linear without bias: x.addmm_(s, Wd^T) on the fresh residual stream x (cuBLAS reads x as
its C, beta = 1: one launch instead of the GEMM and an add); a QuantLinear keeps its add.

Fusing is idempotent: slices that already lie end to end in one storage are recognized from
their storage (nothing else is kept), so declaring again after `.to()` (which gives each
parameter its own storage) fuses anew, and declaring twice copies nothing. A deep copy of the
network (nn.Parameter's __deepcopy__ clones each parameter apart) holds a copy of the route
over copies of the weights: declare it again before changing its weights in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["decode_layer", "fuse"]

_16BIT = (torch.bfloat16, torch.float16)


def fuse(linears: Sequence[nn.Module]) -> tuple[Tensor, Tensor | None] | None:
    """Linears of one input -> (weight [sum out, in], bias [sum out] or None) whose row slices
    are now the linears' weights (biases); None (nothing changed) where any is not a plain
    nn.Linear with a contiguous weight, or they differ in dtype, device, input width or bias."""
    if not _fusible(linears):
        return None
    weight = _whole([m.weight for m in linears])
    return weight, None if linears[0].bias is None else _whole([m.bias for m in linears])


def _whole(params: list[Tensor]) -> Tensor:
    joined = _joined(params)
    return _rebind(params) if joined is None else joined


def _fusible(linears: Sequence[nn.Module]) -> bool:
    first = linears[0]
    if not all(isinstance(m, nn.Linear) for m in linears):  # a QuantLinear is not one: its packing stays
        return False
    ws = [m.weight for m in linears]
    return all(w.dim() == 2 and w.is_contiguous() and w.shape[1] == ws[0].shape[1] and w.dtype == ws[0].dtype
               and w.device == ws[0].device and not w.is_meta for w in ws) \
        and all((m.bias is None) == (first.bias is None) for m in linears) \
        and all(m.bias is None or (m.bias.is_contiguous() and m.bias.dtype == ws[0].dtype) for m in linears)


def _joined(parts: list[Tensor]) -> Tensor | None:
    """The tensor `parts` are consecutive row slices of (already fused), else None."""
    head = parts[0]
    storage = head.untyped_storage().data_ptr()
    end = head.data_ptr()
    for p in parts:
        if p.untyped_storage().data_ptr() != storage or p.data_ptr() != end:
            return None
        end += p.numel() * p.element_size()
    rows = sum(p.shape[0] for p in parts)
    shape = (rows, *head.shape[1:])
    return head.detach().as_strided(shape, (head.shape[1], 1) if head.dim() == 2 else (1,))


def _rebind(params: list[Tensor]) -> Tensor:
    """Concatenate `params` (rows) into one new tensor and make each a view of its rows."""
    with torch.no_grad():
        whole = torch.cat([p.detach() for p in params])
        start = 0
        for p in params:
            p.data = whole[start:start + p.shape[0]]
            start += p.shape[0]
    return whole


def decode_layer(block: nn.Module):
    """A runtime/model.py Block -> its kernels/gpu_layer.DecodeLayer: q/k/v and gate/up fused
    where plain Linears (one F.linear each), the modules themselves where not (a QuantLinear)."""
    from kvloft.kernels.gpu_layer import DecodeLayer

    a, m = block.self_attn, block.mlp
    hq, hkv, d = a.shape
    return DecodeLayer(
        w_in=block.input_layernorm.weight, w_post=block.post_attention_layernorm.weight,
        eps_in=block.input_layernorm.eps, eps_post=block.post_attention_layernorm.eps,
        qkv=_split_call((a.q_proj, a.k_proj, a.v_proj), (hq * d, hkv * d, hkv * d)), o=a.o_proj,
        gate_up=_split_call((m.gate_proj, m.up_proj), (m.gate_proj.out_features,) * 2),
        down_add=_down_add(m.down_proj), head_dim=d)


def _split_call(linears: Sequence[nn.Module], widths: tuple[int, ...]):
    fused = fuse(linears)
    return _Modules(tuple(linears)) if fused is None else _Fused(*fused, widths)


def _down_add(linear: nn.Module):
    w = getattr(linear, "weight", None)
    plain = isinstance(linear, nn.Linear) and linear.bias is None and w.dim() == 2 and w.dtype in _16BIT
    return _AddInto(linear) if plain else _AddAfter(linear)


@dataclass
class _AddInto:
    """s [T, in], x [T, out] (fresh, contiguous: overwritten) -> x + s W^T in one GEMM, rounded once
    (the module's x + (s W^T) rounds twice: within a rounding of the output of it)."""

    linear: nn.Linear  # the module, not its weight: a deep copy of the network maps it to its copy

    def __call__(self, s: Tensor, x: Tensor) -> Tensor:
        return x.addmm_(s, self.linear.weight.t())


@dataclass
class _AddAfter:
    """s [T, in], x [T, out] -> x + module(s): the module's call, then torch's add."""

    linear: nn.Module

    def __call__(self, s: Tensor, x: Tensor) -> Tensor:
        return x + self.linear(s)


@dataclass
class _Fused:
    """h [T, in] -> each linear's output [T, width]: row-strided views of one GEMM's output, each
    its own slice (narrow, not split: prefill's MLP runs silu in place on the gate's, which
    autograd refuses on one of several views split hands back, where grad mode is on).
    (Objects, not closures: a deep copy of the network then copies the weights they hold.)"""

    weight: Tensor  # [sum widths, in]
    bias: Tensor | None  # [sum widths]
    widths: tuple[int, ...]

    def __call__(self, h: Tensor) -> tuple[Tensor, ...]:
        out, start, parts = F.linear(h, self.weight, self.bias), 0, []
        for w in self.widths:
            parts.append(out.narrow(-1, start, w))
            start += w
        return tuple(parts)


@dataclass
class _Modules:
    """h [T, in] -> each module's output (a QuantLinear among them: not fused)."""

    linears: tuple[nn.Module, ...]

    def __call__(self, h: Tensor) -> tuple[Tensor, ...]:
        return tuple(li(h) for li in self.linears)
