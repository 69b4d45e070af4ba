"""A Llama-family decoder written plainly (Llama 2/3, Mistral, Qwen2/2.5, SmolLM2).

Batch size 1, a sequence of T tokens at given positions. Each layer makes exactly one
attention call, `backend.attend(layer, q, k, v)`, with keys already rotated (RoPE), so
the KV tiers, retrievers and kernels plug in behind it (runtime/attention.py).
Parameter names follow HF transformers (minus the "model." prefix), so a HF state dict
loads as is.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvloft.config import ModelConfig


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q [T, H_q, D], k/v [T, H_kv, D] (rotated keys), positions [T] -> out [T, H_q, D]."""

    # Optional: kv_rows(layer, t) -> (k, v) [t, H_kv, D] contiguous, the store's rows the next
    # attend() of t tokens of `layer` keeps, or None. A prefill chunk's rotated keys and its
    # values are then written there and handed to attend() as those very views, which keeps
    # them without a copy (DenseAttention): the rotation's fp32 result is rounded straight into
    # the store and v copied once from the projection's output.


class Linear(nn.Linear):
    """nn.Linear whose few-row calls (decode) take the compiled CPU GEMV once declared.

    `few_rows` is declared by Transformer.declare_kernels for fp32 weights on the CPU, never
    probed per call: x [..., in] of at most cpu_gemv.MAX_ROWS rows then goes through
    kernels/cpu_gemv.py (~1.6x torch's fp32 GEMV on one thread here), anything larger
    through F.linear.
    Parameter names are nn.Linear's, so state dicts and HF comparisons are unchanged."""

    few_rows = False

    def forward(self, x: Tensor) -> Tensor:
        if self.few_rows and x.numel() <= _GEMV_ROWS * self.in_features:
            return _gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


_GEMV_ROWS = 16  # kernels/cpu_gemv.MAX_ROWS, checked against it where declared (numba imports lazily)
_gemv = None  # kernels/cpu_gemv.linear_unchecked once a network declares it


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # ATen's fused op: the same arithmetic (bit for bit), one call
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [D/2], with Llama 3 ("llama3") scaling when configured."""
    d = cfg.head_dim
    # on the CPU even while a loader builds on meta (a first meta op imports ~150 MB of torch)
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device="cpu") / d))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv.float()
    if kind == "linear":
        return (inv / rs["factor"]).float()
    if kind == "llama3":
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3 are)")


# devices whose elementwise kernels cast operands of another dtype as they read them (no copy)
PROMOTE_IN_KERNEL = ("cuda",)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor | None = None) -> Tensor:
    """RoPE in the HF (rotate-half) layout. x [T, H, D] (any strides); cos/sin [T, D] fp32 (each
    the same angles repeated over its two halves, Transformer.rope). Computed in fp32, rounded
    to x's dtype once: into `out` [T, H, D] where given (a store's rows), else a new tensor.

    x*cos + rotate_half(x)*sin, rotate_half(x) = cat(-x2, x1): each half's product summed in the
    pass that takes it (addcmul, value -1 for -x2: an exact sign flip), so the same rounding as
    building rotate_half, in three passes over x instead of five (no negated copy, no cat).
    On CUDA 16-bit x is read as it is: the fp32 ops promote it element by element inside their
    kernels (exact), so no fp32 copy of x is written and read back (the same bits). The CPU's
    elementwise ops would instead copy each operand of another dtype to fp32 first (x and its
    two halves: twice the one copy of x.float()), so there x is copied once, up front."""
    xf = x if x.device.type in PROMOTE_IN_KERNEL else x.float()  # fp32 x: itself either way
    h = x.shape[-1] // 2
    x1, x2 = xf[..., :h], xf[..., h:]
    s1, s2 = sin[:, None, :h], sin[:, None, h:]
    rot = xf * cos[:, None]  # fp32 (cos is)
    rot[..., :h].addcmul_(x2, s1, value=-1.0)
    rot[..., h:].addcmul_(x1, s2)
    if out is None:
        return rot.to(x.dtype)
    return out.copy_(rot)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hq, hkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
        self.q_proj = Linear(cfg.hidden_size, hq * d, bias=cfg.attention_bias)
        self.k_proj = Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.v_proj = Linear(cfg.hidden_size, hkv * d, bias=cfg.attention_bias)
        self.o_proj = Linear(hq * d, cfg.hidden_size, bias=False)
        self.shape = (hq, hkv, d)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, proj=None, rows=None) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden] -> q [T, H_q, D], k [T, H_kv, D] (both rotated), v [T, H_kv, D] (contiguous).
        proj: None (the three modules) or x -> q, k, v [T, H D] at once (row-strided views of one
        fused GEMM's output do: runtime/fused_weights.py). rows: None or a store's (k, v) rows
        [T, H_kv, D] (AttentionBackend.kv_rows): k and v are written there and returned."""
        t = x.shape[0]
        hq, hkv, d = self.shape
        q, k, v = (self.q_proj(x), self.k_proj(x), self.v_proj(x)) if proj is None else proj(x)
        q = rotate(q.view(t, hq, d), cos, sin)
        if rows is not None:
            return q, rotate(k.view(t, hkv, d), cos, sin, rows[0]), rows[1].copy_(v.view(t, hkv, d))
        return q, rotate(k.view(t, hkv, d), cos, sin), v.contiguous().view(t, hkv, d)  # a module's v: no copy

    def out(self, o: Tensor) -> Tensor:
        """Attention output o [T, H_q, D] -> [T, hidden]."""
        return self.o_proj(o.reshape(o.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor, gate_up=None) -> Tensor:
        """x [T, hidden] -> [T, hidden]; on a device with a row limit (MLP_ROWS) a longer input
        goes through in equal blocks of rows, written into one output. gate_up: None (the two
        modules) or x -> g, u [T, I] at once (views of one fused GEMM's output do)."""
        limit = MLP_ROWS.get(x.device.type)
        n = x.shape[0]
        if limit is None or n <= limit:
            return self._rows(x, gate_up)
        step = -(-n // -(-n // limit))  # equal blocks: 6000 rows in two of 3000, not 4096 + 1904
        out = x.new_empty(n, self.down_proj.out_features)
        for i in range(0, n, step):
            out[i : i + step] = self._rows(x[i : i + step], gate_up)
        return out

    def _rows(self, x: Tensor, gate_up=None) -> Tensor:
        # silu and the product in place on the gate's output: two [T, intermediate] tensors
        # instead of four (the model runs under inference_mode: nothing keeps them for backward)
        g, u = (self.gate_proj(x), self.up_proj(x)) if gate_up is None else gate_up(x)
        return self.down_proj(F.silu(g, inplace=True).mul_(u))


# Rows of one MLP call per compute device, above which it runs in blocks. On the CPU a prefill
# chunk of 6K SmolLM2 tokens makes [T, 1536] fp32 intermediates of 37 MB: over glibc's largest
# mmap threshold (32 MiB), so each one is mapped afresh and page-faulted in (1.2M minor faults,
# ~4.5 s of system time a 6K prefill here); 4096 rows keep them at most 25 MB, reused from the heap.
# Not on CUDA: the caching allocator reuses its blocks, and the prefill plan prices whole chunks.
MLP_ROWS = {"cpu": 4096}


class Block(nn.Module):
    """One decoder layer. `cpu` (declared by Transformer.declare_kernels for fp32 weights on the
    CPU): its few-row calls (decode) in four compiled calls (kernels/cpu_layer.py) instead of the
    modules' ~9 torch calls; the same arithmetic up to fp32 summation order."""

    cpu = None  # a kernels/cpu_layer.DecodeLayer once declared
    gpu = None  # a kernels/gpu_layer.DecodeLayer once declared (declare_gpu)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def pre(self, x: Tensor, cos: Tensor, sin: Tensor, rows=None, chunk: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """The residual stream x [T, hidden] -> this layer's q, k, v (Attention.qkv). rows: None
        or the store rows k and v go to (Attention.qkv; the modules' route only, else ignored).
        chunk: x is a prefill chunk (Block.forward): more rows than the GPU route's take its norm."""
        if self.cpu is not None and x.shape[0] <= _GEMV_ROWS:
            return self.cpu.pre(x, cos, sin)
        if self.gpu is not None:  # few rows: the route; more: the fused GEMM (a chunk: the norm too), the modules' rest
            if x.shape[0] <= _GEMV_ROWS:
                return self.gpu.pre(x, cos, sin)
            h = self.gpu.norm_in(x) if chunk else self.input_layernorm(x)
            return self.self_attn.qkv(h, cos, sin, self.gpu.qkv, rows)
        return self.self_attn.qkv(self.input_layernorm(x), cos, sin, rows=rows)

    def post(self, x: Tensor, o: Tensor, chunk: bool = False) -> Tensor:
        """The residual stream x and the attention output o [T, H_q, D] -> the next stream.
        chunk: as in pre (on the GPU route, x + a and the norm in one launch, silu(g) * u in one)."""
        if self.cpu is not None and x.shape[0] <= _GEMV_ROWS:
            return self.cpu.post(x, o)
        if self.gpu is not None and x.shape[0] <= _GEMV_ROWS:
            return self.gpu.post(x, o)
        if self.gpu is not None and chunk:  # the route's norm (with x + a) and activation, the modules' GEMMs
            x, h = self.gpu.add_norm_post(x, self.self_attn.out(o))
            return x + self.mlp.down_proj(self.gpu.swiglu(h))  # the modules' add (rounded after the GEMM, as HF)
        x = x + self.self_attn.out(o)
        return x + self.mlp(self.post_attention_layernorm(x), None if self.gpu is None else self.gpu.gate_up)

    def declare_cpu(self, on: bool, split) -> None:
        """Take kernels/cpu_layer.py for few rows where `on` and every weight of the layer is a
        plain fp32 CPU tensor, contiguous (not a QuantLinear's packing); else the modules."""
        a, m = self.self_attn, self.mlp
        lins = (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj)
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        ok = on and all(isinstance(li, Linear) and li.few_rows for li in lins) and a.o_proj.bias is None \
            and all(li.bias is None for li in lins[3:]) and all(_cpu_fp32(w) for w in norms)
        self.cpu = None
        if ok:
            from kvloft.kernels.cpu_layer import DecodeLayer

            self.cpu = DecodeLayer(
                w_in=norms[0], eps=self.input_layernorm.eps, wq=a.q_proj.weight, wk=a.k_proj.weight,
                wv=a.v_proj.weight, bq=a.q_proj.bias, bk=a.k_proj.bias, bv=a.v_proj.bias, wo=a.o_proj.weight,
                w_post=norms[1], wg=m.gate_proj.weight, wu=m.up_proj.weight, wd=m.down_proj.weight,
                head_dim=a.shape[2], split=split)

    def declare_gpu(self, on: bool) -> None:
        """Take kernels/gpu_layer.py for few rows where `on` (16-bit weights on CUDA, or forced):
        q/k/v and gate/up fused into one weight each where plain Linears (runtime/fused_weights.py),
        which more rows then take too: one GEMM for q/k/v, one for gate/up; and a prefill chunk
        (Block.forward) the route's norms (one launch each, the post-attention one with the
        residual add, where the modules make ~8 passes over [T, hidden]; HF's arithmetic but the
        fp32 sum's order) and activation (silu(g) * u in one launch; torch's but the fp32 exp)."""
        self.gpu = None
        if on:
            from kvloft.runtime.fused_weights import decode_layer

            self.gpu = decode_layer(self)

    def forward(self, x, cos, sin, layer, backend, positions):
        rows = None
        if x.shape[0] > _GEMV_ROWS and hasattr(backend, "kv_rows"):  # a prefill chunk: k, v into the store
            rows = backend.kv_rows(layer, x.shape[0])
        q, k, v = self.pre(x, cos, sin, rows, chunk=True)
        return self.post(x, backend.attend(layer, q, k, v, positions), chunk=True)


def _cpu_fp32(t: Tensor | None) -> bool:
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


class Transformer(nn.Module):
    """The decoder. forward(ids [T], positions [T], backend) -> logits [T, V] fp32."""

    compiled_cpu: bool | None = None  # as last declared (declare_kernels); None: never
    split_cpu: bool | None = None  # as last declared: a helper thread for the compiled calls (None: where 2+ cores)
    fused_gpu: bool | None = None  # as last declared: the GPU few-row route (None: for 16-bit weights on CUDA)
    _cpu_head = None  # (norm weight, eps, lm_head weight, helper) once declared
    _gpu_norm = None  # a kernels/gpu_layer.FinalNorm: the final norm of few rows, with the GPU route

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        # Left uninitialized (loaders fill every parameter): a first normal_ on the meta device,
        # where loaders build, costs seconds of lazy imports.
        empty = torch.empty(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=empty)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def declare_kernels(self, compiled_cpu: bool = True, split: bool | None = None,
                        fused_gpu: bool | None = None) -> bool:
        """Declare which compiled CPU paths this network takes, from where its weights are:
        fp32 weights on the CPU (and `compiled_cpu`) -> every Linear's few-row calls through
        kernels/cpu_gemv.py, each layer's few-row calls through kernels/cpu_layer.py, and the
        compiled CPU kernels loaded in a background thread (kernels/cpu_warmup.py) so the first
        decode step does not compile them. `split`: share the layer, lm_head and dense decode
        attention calls with a helper thread (kernels/cpu_split.py; None: where this process
        may run on 2+ cores). `fused_gpu`: each layer's few-row calls through kernels/gpu_layer.py
        (Block.declare_gpu) and the final norm's through its FinalNorm; None: where the weights
        are bf16/fp16 on CUDA; True forces it (the CPU tests, under TRITON_INTERPRET=1). Loaders
        call this once the weights are in place; moving or casting the network (`.to`, `.float`)
        declares again. Returns whether the compiled CPU paths are on."""
        self.compiled_cpu, self.split_cpu, self.fused_gpu = compiled_cpu, split, fused_gpu
        w = self.embed_tokens.weight  # always a plain parameter (a linear may be a QuantLinear)
        on = compiled_cpu and w.device.type == "cpu" and w.dtype == torch.float32
        if on:
            global _gemv
            from kvloft.kernels import cpu_gemv, cpu_warmup

            assert cpu_gemv.MAX_ROWS == _GEMV_ROWS
            _gemv = cpu_gemv.linear_unchecked
            cpu_warmup.start()
        for m in self.modules():
            if isinstance(m, Linear):
                m.few_rows = on and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32 \
                    and m.weight.is_contiguous()
        helper = None
        if on:
            from kvloft.kernels import cpu_attend, cpu_split

            helper = cpu_split.helper(split)
            cpu_attend.SPLIT = helper  # one helper thread a process: the last declared model's choice
        for block in self.layers:
            block.declare_cpu(on, helper)
        gpu = w.device.type == "cuda" and w.dtype in (torch.bfloat16, torch.float16) if fused_gpu is None else fused_gpu
        for block in self.layers:  # the CPU route, where declared, is the one taken: no second one
            block.declare_gpu(gpu and block.cpu is None)
        if gpu and w.device.type == "cuda":  # the unfused weights' freed blocks fit no fused one: return them
            torch.cuda.empty_cache()
        head_ok = on and isinstance(self.lm_head, Linear) and self.lm_head.few_rows and self.lm_head.bias is None \
            and _cpu_fp32(self.norm.weight)
        self._cpu_head = (self.norm.weight, self.norm.eps, self.lm_head.weight, helper) if head_ok else None
        self._gpu_norm = None
        if not head_ok and any(b.gpu is not None for b in self.layers):
            from kvloft.kernels.gpu_layer import FinalNorm

            self._gpu_norm = FinalNorm(self.norm.weight, self.norm.eps)
        return on

    def _apply(self, fn, recurse=True):  # .to(), .float(), .cuda(): the declaration follows the weights
        out = super()._apply(fn, recurse)
        if self.compiled_cpu is not None and not self.embed_tokens.weight.is_meta:
            self.declare_kernels(self.compiled_cpu, fused_gpu=self.fused_gpu)
        return out

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions [T] int64 -> cos, sin [T, D] fp32 (fp64 angles: exact at 1M positions)."""
        ang = positions.double()[:, None] * self.inv_freq.double()[None]
        ang = torch.cat((ang, ang), dim=-1)
        return ang.cos().float(), ang.sin().float()

    def head(self, x: Tensor) -> Tensor:
        """The last residual stream x [T, hidden] -> logits [T, V] fp32."""
        if self._cpu_head is not None and x.shape[0] <= _GEMV_ROWS:
            from kvloft.kernels.cpu_layer import head

            return head(x, *self._cpu_head)
        if self._gpu_norm is not None and x.shape[0] <= _GEMV_ROWS:
            return self.lm_head(self._gpu_norm(x)).float()
        return self.lm_head(self.norm(x)).float()

    @torch.inference_mode()
    def forward(self, ids: Tensor, positions: Tensor, backend: AttentionBackend, last_only: bool = False) -> Tensor:
        x = self.embed_tokens(ids)  # [T, hidden]
        cos, sin = self.rope(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, i, backend, positions)
        if last_only:
            x = x[-1:]
        return self.head(x)
