"""A decoder layer's few-row (decode) arithmetic on the CPU, fp32, compiled (numba), in four calls.

    pre:     h = rmsnorm(x) * w_in;  q, k = rope(h Wq^T + bq, h Wk^T + bk);  v = h Wv^T + bv
    (attention: the backend's)
    out:     x = x + o Wo^T
    gate_up: h = rmsnorm(x) * w_post;  s = silu(h Wg^T) * (h Wu^T)
    down:    x = x + s Wd^T
    head:    logits = (rmsnorm(x) * w_norm) W_lm^T

x [T, hidden] with T at most MAX_ROWS (a decode token: T = 1), weights [out, in] fp32 contiguous,
as the model holds them (no copies). Through nn.Linear, RMSNorm and rope a SmolLM2 token made 271
torch and numba calls, ~25 us of Python each on top of their arithmetic (norms 110 us, rope
88 us each at load ~3 here); here a layer is four calls, each weight row read once, dotted with
every input row while in L1 (kernels/cpu_gemv.py's loop, dot_rows). Every call splits its rows between
the caller and the helper thread (kernels/cpu_split.py: never waits on a descheduled thread).

Equal to the torch modules up to fp32 summation order (fast-math: vector lanes, fused
multiply-add); tests/kernels/test_cpu_layer.py bounds it against runtime/model.py's modules.
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit
from torch import Tensor

from kvloft.kernels import cpu_split
from kvloft.kernels.cpu_gemv import dot_rows
from kvloft.kernels.cpu_split import claim, commit, done, settle
from kvloft.kernels.numba_flags import ERROR_MODEL, FASTMATH

MAX_ROWS = 16  # input rows per call (cpu_gemv.MAX_ROWS, which says why 16): past that a GEMM (F.linear)
ROWS = 64  # weight rows per chunk of split work: 147 KB of SmolLM2's hidden 576, read in ~15 us

_jit = njit(fastmath=FASTMATH, error_model=ERROR_MODEL, nogil=True, cache=True)


@_jit
def _norm(x, w, eps):  # x [T, I], w [I] -> rmsnorm(x) * w [T, I] (each thread makes its own: 2 KB)
    t_n, n = x.shape
    h = np.empty((t_n, n), np.float32)
    for t in range(t_n):
        ss = np.float32(0.0)
        for i in range(n):
            ss += x[t, i] * x[t, i]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for i in range(n):
            h[t, i] = w[i] * (x[t, i] * r)
    return h


@_jit
def _dots(h, w, r0, n, tmp):  # tmp[t, j] = h[t] . w[r0 + j] for j < n; w[r] read once for every t
    for j in range(n):
        dot_rows(h, w, r0 + j, np.float32(0.0), tmp, j)


@_jit
def _linear(role, x, nw, eps, has_norm, w, res, has_res, out, ctl):
    # out [T, O] = (rmsnorm(x) * nw if has_norm else x) [T, I] @ w[O, I]^T (+ res [T, O]); chunks of ROWS
    h = _norm(x, nw, eps) if has_norm else x
    t_n, o_n = h.shape[0], w.shape[0]
    tmp = np.empty((t_n, ROWS), np.float32)
    while True:
        c = claim(ctl, role)
        if c < 0:
            break
        r0 = c * ROWS
        n = min(ROWS, o_n - r0)
        _dots(h, w, r0, n, tmp)
        if commit(ctl, c, role):
            for t in range(t_n):
                for j in range(n):
                    out[t, r0 + j] = tmp[t, j] + res[t, r0 + j] if has_res else tmp[t, j]
            done(ctl, c, role)
    settle(ctl, role)


@_jit
def _gate_up(role, x, nw, eps, wg, wu, s, ctl):  # s [T, F] = silu(h @ wg^T) * (h @ wu^T), h = rmsnorm(x) * nw
    h = _norm(x, nw, eps)
    t_n, f_n = h.shape[0], wg.shape[0]
    tg = np.empty((t_n, ROWS), np.float32)
    tu = np.empty((t_n, ROWS), np.float32)
    while True:
        c = claim(ctl, role)
        if c < 0:
            break
        r0 = c * ROWS
        n = min(ROWS, f_n - r0)
        _dots(h, wg, r0, n, tg)
        _dots(h, wu, r0, n, tu)
        if commit(ctl, c, role):
            for t in range(t_n):
                for j in range(n):
                    g = tg[t, j]
                    s[t, r0 + j] = g / (np.float32(1.0) + np.exp(-g)) * tu[t, j]
            done(ctl, c, role)
    settle(ctl, role)


@_jit
def _qkv(role, x, nw, eps, wq, wk, wv, bq, bk, bv, has_bias, cos, sin, q, k, v, ctl):
    # h = rmsnorm(x) * nw [T, I]; q [T, Hq*D] = rope(h wq^T + bq), k likewise [T, Hkv*D], v = h wv^T + bv;
    # cos, sin [T, D]; one chunk per head (D rows), so a head's rope stays in its chunk
    h = _norm(x, nw, eps)
    t_n, d = h.shape[0], cos.shape[1]
    half = d // 2
    nq, nk = wq.shape[0] // d, wk.shape[0] // d
    tmp = np.empty((t_n, d), np.float32)
    rot = np.empty((t_n, d), np.float32)
    while True:
        c = claim(ctl, role)
        if c < 0:
            break
        if c < nq:
            w, b, dst, r0, rope = wq, bq, q, c * d, True
        elif c < nq + nk:
            w, b, dst, r0, rope = wk, bk, k, (c - nq) * d, True
        else:
            w, b, dst, r0, rope = wv, bv, v, (c - nq - nk) * d, False
        _dots(h, w, r0, d, tmp)
        for t in range(t_n):
            for j in range(d):
                if has_bias:
                    tmp[t, j] += b[r0 + j]
        if rope:  # rotate-half: x * cos + [-x2, x1] * sin
            for t in range(t_n):
                for j in range(half):
                    rot[t, j] = tmp[t, j] * cos[t, j] - tmp[t, j + half] * sin[t, j]
                    rot[t, j + half] = tmp[t, j + half] * cos[t, j + half] + tmp[t, j] * sin[t, j + half]
            src = rot
        else:
            src = tmp
        if commit(ctl, c, role):
            for t in range(t_n):
                for j in range(d):
                    dst[t, r0 + j] = src[t, j]
            done(ctl, c, role)
    settle(ctl, role)


_NONE = np.zeros((1, 1), np.float32)  # the absent residual
_NO_BIAS = np.zeros(1, np.float32)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


class DecodeLayer:
    """One decoder layer's weights as numpy views (no copies) and its four compiled calls.

    Declared once per layer at load (runtime/model.py Transformer.declare_kernels): every weight
    fp32, on the CPU, contiguous, [out, in]. `split`: the helper thread to share the work with
    (kernels/cpu_split.py), or None for the caller alone."""

    def __init__(self, *, w_in: Tensor, eps: float, wq: Tensor, wk: Tensor, wv: Tensor, bq: Tensor | None,
                 bk: Tensor | None, bv: Tensor | None, wo: Tensor, w_post: Tensor, wg: Tensor, wu: Tensor,
                 wd: Tensor, head_dim: int, split: cpu_split.Helper | None) -> None:
        self.w_in, self.w_post = _np(w_in), _np(w_post)
        self.eps = np.float32(eps)
        self.wq, self.wk, self.wv, self.wo = _np(wq), _np(wk), _np(wv), _np(wo)
        self.has_bias = bq is not None
        self.bq, self.bk, self.bv = ((_np(bq), _np(bk), _np(bv)) if self.has_bias else (_NO_BIAS,) * 3)
        self.wg, self.wu, self.wd = _np(wg), _np(wu), _np(wd)
        self.d = head_dim
        self.split = split

    def pre(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden] (T <= MAX_ROWS), cos/sin [T, D] -> q [T, H_q, D], k [T, H_kv, D] (rotated), v [T, H_kv, D]."""
        t, d = x.shape[0], self.d
        q = torch.empty((t, self.wq.shape[0]), dtype=torch.float32)
        k = torch.empty((t, self.wk.shape[0]), dtype=torch.float32)
        v = torch.empty((t, self.wv.shape[0]), dtype=torch.float32)
        ctl = cpu_split.new_ctl((self.wq.shape[0] + 2 * self.wk.shape[0]) // d)
        cpu_split.run(_qkv, (_np(x.contiguous()), self.w_in, self.eps, self.wq, self.wk, self.wv, self.bq, self.bk,
                             self.bv, self.has_bias, _np(cos.contiguous()), _np(sin.contiguous()), q.numpy(),
                             k.numpy(), v.numpy(), ctl), self.split)
        return q.view(t, -1, d), k.view(t, -1, d), v.view(t, -1, d)

    def post(self, x: Tensor, o: Tensor) -> Tensor:
        """The residual stream x [T, hidden] and the attention output o [T, H_q, D] -> the next stream [T, hidden]."""
        t = x.shape[0]
        xn = _np(x.contiguous())
        x1 = np.empty_like(xn)
        cpu_split.run(_linear, (_np(o.reshape(t, -1).contiguous()), _NO_BIAS, self.eps, False, self.wo, xn, True,
                                x1, cpu_split.new_ctl(_chunks(self.wo))), self.split)
        s = np.empty((t, self.wg.shape[0]), np.float32)
        cpu_split.run(_gate_up, (x1, self.w_post, self.eps, self.wg, self.wu, s, cpu_split.new_ctl(_chunks(self.wg))),
                      self.split)
        x2 = torch.empty((t, xn.shape[1]), dtype=torch.float32)
        cpu_split.run(_linear, (s, _NO_BIAS, self.eps, False, self.wd, x1, True, x2.numpy(),
                                cpu_split.new_ctl(_chunks(self.wd))), self.split)
        return x2


def head(x: Tensor, norm_w: Tensor, eps: float, w: Tensor, split: cpu_split.Helper | None) -> Tensor:
    """logits [T, V] fp32 = (rmsnorm(x) * norm_w) @ w^T: x [T, hidden] (T <= MAX_ROWS), norm_w [hidden],
    w [V, hidden] fp32 contiguous (the lm_head, often the tied embedding)."""
    out = torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32)
    wn = _np(w)
    cpu_split.run(_linear, (_np(x.contiguous()), _np(norm_w), np.float32(eps), True, wn, _NONE, False, out.numpy(),
                            cpu_split.new_ctl(_chunks(wn))), split)
    return out


def _chunks(w: np.ndarray) -> int:
    return -(-w.shape[0] // ROWS)


def warm() -> None:
    """Compile (or load from numba's cache) the four kernels on the caller's thread."""
    x = np.ones((1, 4), np.float32)
    w = np.ones((4, 4), np.float32)
    nw = np.ones(4, np.float32)
    out = np.empty((1, 4), np.float32)
    eps = np.float32(1e-5)
    for has in (False, True):
        _linear(cpu_split.CALLER, x, nw, eps, has, w, x, has, out, cpu_split.new_ctl(1))
        _qkv(cpu_split.CALLER, x, nw, eps, w, w, w, nw, nw, nw, has, x, x, out, out.copy(), out.copy(),
             cpu_split.new_ctl(3))
    _gate_up(cpu_split.CALLER, x, nw, eps, w, w, out, cpu_split.new_ctl(1))
