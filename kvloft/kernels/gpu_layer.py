"""A decoder layer's few-row (decode) calls on the GPU: four Triton launches and four GEMMs.

    pre:   h = rmsnorm(x) * w_in                      (kernels/rms_norm.py)
           q, k, v = split(h [Wq; Wk; Wv]^T + b)      (one GEMM where the weights are fused)
           q, k = rope(q, k); v copied out            (kernels/rope_qkv.py)
    (attention: the backend's)
    post:  a = o Wo^T
           x1 = x + a;  h = rmsnorm(x1) * w_post      (one launch: kernels/rms_norm.py)
           s = silu(g) * u,  g, u = split(h [Wg; Wu]^T)   (one GEMM; kernels/silu_mul.py)
           x2 = x1 + s Wd^T                           (one GEMM: x1.addmm_(s, Wd^T), x1 its C)

x [T, hidden] bf16/fp16, T at most MAX_ROWS (a decode token: T = 1; a batched step: B rows).
A prefill chunk (runtime/model.py Block.forward, any T) takes the memory-bound parts alone:
norm_in, add_norm_post and swiglu, with the modules' GEMMs, RoPE and last residual add.
The GEMMs are callables the runtime builds from the layer's modules (runtime/model.py
Block.declare_gpu): one F.linear on fused weights (runtime/fused_weights.py), or the
modules themselves where a linear is a QuantLinear. A layer is then 8 launches (GEMMs
included) where the torch modules made ~41 (the norms' float/pow/mean/rsqrt/mul/cast
chains, rope's chunk/cat/neg/float/addcmul/cast on q and on k, silu and mul, the adds);
9 where down is a QuantLinear (its add stays apart). `FinalNorm` takes the model's norm
before lm_head the same way: one launch for the modules' ~8.

The last residual add rides in the down GEMM (cuBLAS's beta = 1 on the fresh x1) rather than
being carried unsummed into the next layer's input norm (rms_norm's residual input) and the
final norm: both save one launch a layer (32 a Llama-3-8B step), but carrying changes what a
layer hands on from one stream x to a pair (x1, d), which every caller of Block.pre/post
would have to hold: the batched engine (runtime/engine.py), the segmented CUDA graphs
(runtime/graphs.py, one buffer per segment boundary), the whole-step graph
(runtime/whole_step.py) and the CPU and module routes. Folding keeps x one tensor.

The arithmetic is the modules' (HF's): each kernel rounds as the torch ops it replaces, but
for the fp32 sum of squares of the norms (another order), the fused GEMMs (cuBLAS may
tile [Wq; Wk; Wv] otherwise than Wq alone) and the down GEMM's add (x1 + s Wd^T rounded once
from fp32, where the modules round the product first: at most a rounding of the output
apart). tests/runtime/test_gpu_route.py holds a layer and a model to the modules.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from kvloft.kernels import checks
from kvloft.kernels.rms_norm import MAX_HIDDEN, _rms_norm_kernel, rms_norm_unchecked
from kvloft.kernels.rope_qkv import MAX_HEAD_DIM, rope_qkv_unchecked
from kvloft.kernels.silu_mul import silu_mul_unchecked

__all__ = ["MAX_ROWS", "DecodeLayer", "FinalNorm"]

# rows a call (runtime/model.py _GEMV_ROWS); past that (prefill) the modules, compute-bound, but
# for the memory-bound norms and activation (norm_in, add_norm_post, swiglu)
MAX_ROWS = 16


class DecodeLayer:
    """One layer's weights as the modules hold them (no copies) and its few-row calls.

    w_in, w_post [hidden] the norms' weights, eps theirs; qkv: h [T, hidden] -> q [T, H_q D],
    k, v [T, H_kv D] (row-strided views of one GEMM's output do); o: [T, H_q D] -> [T, hidden];
    gate_up: h -> g, u [T, I]; down_add: (s [T, I], x1 [T, hidden] fresh, its own to overwrite)
    -> x1 + s Wd^T; head_dim D. Declared once per layer (runtime/model.py Block.declare_gpu),
    never probed per call."""

    def __init__(self, *, w_in: Tensor, w_post: Tensor, eps_in: float, eps_post: float,
                 qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]], o: Callable[[Tensor], Tensor],
                 gate_up: Callable[[Tensor], tuple[Tensor, Tensor]], down_add: Callable[[Tensor, Tensor], Tensor],
                 head_dim: int) -> None:
        _check_norm(w_in, w_post)
        if head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM:
            raise ValueError(f"the GPU decode route needs an even head_dim <= {MAX_HEAD_DIM}, got {head_dim}; "
                             f"use fused_gpu=False")
        self.w_in, self.w_post, self.eps_in, self.eps_post = w_in, w_post, float(eps_in), float(eps_post)
        self.qkv, self.o, self.gate_up, self.down_add = qkv, o, gate_up, down_add
        self.d = head_dim

    def pre(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden], cos/sin [T, D] fp32 -> q [T, H_q, D], k [T, H_kv, D] (rotated), v [T, H_kv, D]."""
        h, _ = rms_norm_unchecked(x, self.w_in, self.eps_in, None)
        q, k, v = self.qkv(h)
        return rope_qkv_unchecked(q, k, v, cos.contiguous(), sin.contiguous(), self.d)

    def post(self, x: Tensor, o: Tensor) -> Tensor:
        """The residual stream x [T, hidden] and the attention output o [T, H_q, D] -> the next stream."""
        a = self.o(o.reshape(o.shape[0], -1))
        h, x1 = rms_norm_unchecked(a, self.w_post, self.eps_post, x)  # x1 = x + a
        return self.down_add(silu_mul_unchecked(*self.gate_up(h)), x1)

    def norm_in(self, x: Tensor) -> Tensor:
        """The input norm alone, x [T, hidden] -> rmsnorm(x) * w_in, for any T (a prefill chunk's
        rows: one launch where the module makes ~8 passes over [T, hidden], 4 of them in fp32)."""
        return rms_norm_unchecked(x, self.w_in, self.eps_in, None)[0]

    def swiglu(self, h: Tensor) -> Tensor:
        """h [T, hidden], any T -> silu(g) * u [T, I], g, u = the gate/up GEMM of h: one launch for
        the activation where the modules make two passes over [T, I] (silu_, mul_)."""
        return silu_mul_unchecked(*self.gate_up(h))

    def add_norm_post(self, x: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
        """x, a [T, hidden] (last dims contiguous), any T -> (x1 = x + a, rmsnorm(x1) * w_post):
        the residual add and the post-attention norm in one launch (a prefill chunk's rows)."""
        h, x1 = rms_norm_unchecked(a, self.w_post, self.eps_post, x)
        return x1, h


class FinalNorm:
    """The model's norm before lm_head for few rows: x [T, hidden] -> rmsnorm(x) * w [T, hidden],
    one launch (kernels/rms_norm.py) for the module's ~8. w [hidden] contiguous, eps its."""

    def __init__(self, w: Tensor, eps: float) -> None:
        _check_norm(w, w)
        self.w, self.eps = w, float(eps)

    def __call__(self, x: Tensor) -> Tensor:
        return rms_norm_unchecked(x, self.w, self.eps, None)[0]


def _check_norm(w: Tensor, other: Tensor) -> None:
    checks.require_runnable(w.device, _rms_norm_kernel, "the GPU decode route (kernels/gpu_layer.py)")
    if w.dim() != 1 or w.shape != other.shape or not 0 < w.shape[0] <= MAX_HIDDEN \
            or not (w.is_contiguous() and other.is_contiguous()):
        raise ValueError(f"the GPU decode route needs contiguous norm weights [hidden <= {MAX_HIDDEN}], got "
                         f"{tuple(w.shape)} and {tuple(other.shape)}; leave the route off (fused_gpu=False)")
