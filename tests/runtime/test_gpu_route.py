"""The GPU few-row route (kernels/gpu_layer.py, declared by runtime/model.py) against the torch
modules: forced on the CPU under the Triton interpreter here, taken for 16-bit CUDA models by
default. Bound (flash-attention's rule): the route's error against an fp64 copy of the same
weights at most 2x the modules' own plus one ulp of the output's largest value; fused GEMMs
may be tiled otherwise than three, the norms sum their squares in their own order, and the
down GEMM adds the residual before rounding."""

from __future__ import annotations

import copy
import dataclasses
from collections import Counter

import pytest
import torch
from dense_backend import DenseBackend
from torch.utils._python_dispatch import TorchDispatchMode

from kvloft.config import PRESETS, ModelConfig
from kvloft.kernels.gpu_layer import DecodeLayer, FinalNorm
from kvloft.runtime.fused_weights import _AddAfter, _AddInto, _Modules
from kvloft.runtime.loader import random_model
from kvloft.runtime.model import MLP_ROWS, Block, RMSNorm, Transformer, rope_inv_freq
from kvloft.runtime.quant_linear import QuantLinear, scheme


def _block(cfg: ModelConfig, dtype, device="cpu") -> Block:
    block = Block(cfg).to(device)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape))
            else:
                p.normal_(std=1.0 if name.endswith("bias") else cfg.hidden_size ** -0.5)
    return block.to(dtype)


def _rope(block: Block, t: int, device="cpu"):  # cos, sin [T, D] fp32 at far positions, as the model makes them
    hq, hkv, d = block.self_attn.shape
    cfg = ModelConfig(hidden_size=hq * d, n_heads=hq, n_kv_heads=hkv, head_dim=d, rope_theta=500000.0)
    net = Transformer.__new__(Transformer)
    torch.nn.Module.__init__(net)
    net.register_buffer("inv_freq", rope_inv_freq(cfg).to(device))
    return Transformer.rope(net, torch.arange(100, 100 + t, device=device) * 31)


def _bound(got, base, exact, what):
    floor = torch.finfo(got.dtype).eps * exact.abs().max().item()
    err, base_err = (got.double() - exact).abs().max().item(), (base.double() - exact).abs().max().item()
    assert err <= 2 * base_err + floor, f"{what}: route error {err:.3g} > 2 x modules' {base_err:.3g} + {floor:.3g}"


def _layer(block: Block, x, cos, sin, chunk=False):  # pre, a stand-in attention output, post
    q, k, v = block.pre(x, cos, sin, chunk=chunk)
    o = (q.float() * 0.5).to(q.dtype)  # [T, H_q, D]: deterministic from q, so both routes see their own
    return q, k, v, block.post(x, o, chunk=chunk)


def _compare(block: Block, t: int, dtype, device="cpu", chunk=False):
    x = torch.randn(t, block.input_layernorm.weight.shape[0], device=device).to(dtype)  # [T, hidden]
    cos, sin = _rope(block, t, device)
    exact_block = copy.deepcopy(block).double()
    exact = _layer(exact_block, x.double(), cos.double(), sin.double())
    base = _layer(block, x, cos, sin)
    block.declare_gpu(True)
    assert isinstance(block.gpu, DecodeLayer) and isinstance(block.gpu.down_add, _AddInto)
    got = _layer(block, x, cos, sin, chunk)
    block.declare_gpu(False)
    for name, g, b, e in zip(("q", "k", "v", "x"), got, base, exact):
        assert g.shape == b.shape and g.dtype == b.dtype
        _bound(g, b, e, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden,d,hkv,group,bias,t", [
    (100, 32, 1, 7, True, 1), (96, 64, 2, 4, False, 3), (100, 32, 3, 1, True, 16), (96, 32, 2, 4, True, 3),
])
def test_layer_matches_the_modules(dtype, hidden, d, hkv, group, bias, t):
    cfg = ModelConfig(hidden_size=hidden, intermediate_size=3 * hidden - 4, n_layers=1, n_heads=hkv * group,
                      n_kv_heads=hkv, head_dim=d, attention_bias=bias)
    _compare(_block(cfg, dtype), t, dtype)


def test_quantized_linears_keep_their_modules():
    net = random_model(PRESETS["tiny"], device="cpu", dtype=torch.bfloat16, quant=scheme("int8")).net
    block = net.layers[0]
    x = torch.randn(2, net.config.hidden_size).to(torch.bfloat16)
    cos, sin = _rope(block, 2)
    base = _layer(block, x, cos, sin)
    block.declare_gpu(True)
    assert isinstance(block.gpu.qkv, _Modules) and isinstance(block.self_attn.q_proj, QuantLinear)
    assert isinstance(block.gpu.down_add, _AddAfter)  # a QuantLinear's output, then the add
    for name, g, b in zip(("q", "k", "v", "x"), _layer(block, x, cos, sin), base):
        floor = 2 * torch.finfo(g.dtype).eps * b.double().abs().max().item()  # norms: their own sum order
        assert (g.double() - b.double()).abs().max() <= floor, name


class _Ops(TorchDispatchMode):
    """The aten ops that launch work (views and allocations left out), by name."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view and not func.__name__.startswith(("empty", "detach")):
            self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_the_down_gemm_takes_the_residual_add():
    cfg = ModelConfig(hidden_size=96, intermediate_size=200, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=24)
    block = _block(cfg, torch.bfloat16)
    block.declare_gpu(True)
    x, o = torch.randn(2, 96).to(torch.bfloat16), torch.randn(2, 4, 24).to(torch.bfloat16)
    with torch.inference_mode(), _Ops() as count:
        out = block.post(x, o)
    # o, gate/up; down with the add; no add (the interpreter's own copies are counted too: not asserted)
    assert (count.ops["linear.default"], count.ops["addmm_.default"], count.ops["add.Tensor"]) == (2, 1, 0)
    a = block.self_attn.out(o)
    want = (x + a) + block.mlp(block.post_attention_layernorm(x + a))  # the modules, rounding the product first
    floor = 2 * torch.finfo(out.dtype).eps * want.double().abs().max().item()  # a rounding; the norm's sum order
    assert (out.double() - want.double()).abs().max() <= floor


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias,t", [(True, 17), (False, 40)])
def test_prefill_chunk_through_the_fused_gemms_matches_the_modules(dtype, bias, t, monkeypatch):
    cfg = ModelConfig(hidden_size=96, intermediate_size=200, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=24,
                      attention_bias=bias)
    monkeypatch.setitem(MLP_ROWS, "cpu", 16)  # the MLP in blocks of rows, each through the fused gate/up GEMM
    block = _block(cfg, dtype)
    _compare(block, t, dtype)  # more rows than the route's: the modules but for the two fused GEMMs
    _compare(block, t, dtype, chunk=True)  # a prefill chunk: the route's norms too
    block.declare_gpu(True)
    x, (cos, sin), o = torch.randn(t, 96).to(dtype), _rope(block, t), torch.randn(t, 8, 24).to(dtype)
    torch_norm = ("pow", "mean", "rsqrt")
    for chunk in (False, True):
        with torch.inference_mode(), _Ops() as pre:
            q, k, v = block.pre(x, cos, sin, chunk=chunk)
        with torch.inference_mode(), _Ops() as post:
            block.post(x, o, chunk=chunk)
        blocks = 1 if chunk else -(-t // 16)  # a chunk: the whole MLP at once (MLP_ROWS is the CPU's modules')
        assert pre.ops["linear.default"] == 1 and post.ops["linear.default"] == 1 + 2 * blocks  # o; gate/up, down
        # a chunk: both norms (and post's residual add) and silu * up in the route's kernels; the last add the modules'
        assert bool([op for op in pre.ops | post.ops if op.startswith(torch_norm)]) == (not chunk)
        assert ("silu_.default" in post.ops) == (not chunk)
        assert post.ops["add.Tensor"] == (1 if chunk else 3)  # the modules: x + a, the norm's + eps, x + mlp
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()  # as the modules hand them on


def _decode(net):  # a 20-token prefill (the modules; the route's fused GEMMs and norms where declared), 3 rows, 1
    dev = net.embed_tokens.weight.device
    ids = torch.randint(0, net.config.vocab_size, (24,), generator=torch.Generator().manual_seed(1)).to(dev)
    be, at = DenseBackend(), lambda a, b: torch.arange(a, b, device=dev)
    return [net(ids[:20], at(0, 20), be, last_only=True), net(ids[20:23], at(20, 23), be),
            net(ids[23:], at(23, 24), be)]


def _model_matches_the_modules(n_layers: int, dtype, device="cpu"):
    """The route's logits (every layer, the final norm) against the modules' and an fp64 copy's."""
    cfg = dataclasses.replace(PRESETS["tiny"], hidden_size=96, intermediate_size=200, n_heads=8, n_kv_heads=2,
                              head_dim=32, attention_bias=True, n_layers=n_layers)
    net = random_model(cfg, device=device, dtype=dtype).net
    net.declare_kernels(fused_gpu=False)
    exact_net = copy.deepcopy(net)
    exact = _decode(exact_net.double())
    base = _decode(net)
    net.declare_kernels(fused_gpu=True)
    assert all(isinstance(b.gpu, DecodeLayer) for b in net.layers) and isinstance(net._gpu_norm, FinalNorm)
    q = net.layers[0].self_attn
    assert q.k_proj.weight.untyped_storage().data_ptr() == q.q_proj.weight.untyped_storage().data_ptr()
    rows, norm_rows, route, norm = [], [], net.layers[-1].gpu, net._gpu_norm
    real_post, real_norm = route.post, norm.__call__
    route.post = lambda x, o: rows.append(x.shape[0]) or real_post(x, o)
    net._gpu_norm = lambda x: norm_rows.append(x.shape[0]) or real_norm(x)
    got = _decode(net)
    assert rows == [3, 1]  # the 20-token prefill took the modules (fused GEMMs, norms), the chunk and the token the route
    assert norm_rows == [1, 3, 1]  # the final norm of every call's (last) rows
    for i, (g, b, e) in enumerate(zip(got, base, exact)):
        _bound(g, b, e, f"logits of call {i}")
        assert g.argmax(-1).tolist() == b.argmax(-1).tolist()


@pytest.mark.parametrize("n_layers,dtype", [(2, torch.bfloat16), (4, torch.bfloat16), (3, torch.float16)])
def test_model_decode_through_the_route_matches_the_modules(n_layers, dtype):
    assert all(b.gpu is None for b in random_model(PRESETS["tiny"], device="cpu", dtype=dtype).net.layers), \
        "not on CUDA: off unless forced"
    _model_matches_the_modules(n_layers, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_final_norm_matches_the_module(dtype, device="cpu"):
    norm = RMSNorm(200, 1e-5).to(device)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(200))
    norm = norm.to(dtype)
    route = FinalNorm(norm.weight, norm.eps)
    exact = copy.deepcopy(norm).double()
    for x in (torch.randn(1, 200), torch.randn(16, 200) * 30, torch.randn(5, 200)[-2:]):  # a row view too
        x = x.to(device, dtype)
        got, base = route(x), norm(x)
        assert got.shape == base.shape and got.dtype == base.dtype
        _bound(got, base, exact(x.double()), f"final norm of {x.shape[0]} rows")


def test_declaration_follows_the_weights_and_the_switch():
    net = random_model(PRESETS["tiny"], device="cpu", dtype=torch.bfloat16).net
    net.declare_kernels(fused_gpu=True)
    assert all(b.gpu is not None for b in net.layers)
    net = net.to(torch.float16)  # declared again, forced still: fused anew in fp16
    assert all(b.gpu is not None for b in net.layers) and net._gpu_norm.w is net.norm.weight
    assert net.layers[0].mlp.gate_proj.weight.dtype == torch.float16
    twin = copy.deepcopy(net)  # nn.Parameter's deep copy clones each one apart: declare again
    twin.declare_kernels(fused_gpu=True)
    twin.layers[0].mlp.up_proj.weight.data.zero_()
    assert twin.layers[0].gpu.gate_up.weight[-1].abs().sum() == 0
    assert net.layers[0].gpu.gate_up.weight[-1].abs().sum() > 0
    net.declare_kernels(fused_gpu=False)
    assert all(b.gpu is None for b in net.layers) and net._gpu_norm is None
    net.declare_kernels()  # auto: CUDA 16-bit weights only
    assert all(b.gpu is None for b in net.layers) and net._gpu_norm is None
    net = net.float()  # fp32 on the CPU: the compiled CPU route, even where the GPU one is forced
    net.declare_kernels(fused_gpu=True)
    assert all(b.cpu is not None and b.gpu is None for b in net.layers)
    assert net._gpu_norm is None and net._cpu_head is not None


@pytest.mark.gpu
def test_llama3_8b_layer_on_cuda_matches_the_modules():
    cfg = dataclasses.replace(PRESETS["llama3-8b"], n_layers=1)
    for t in (1, 4, 16, 64):  # 64: a prefill chunk, through the fused q/k/v and gate/up GEMMs
        _compare(_block(cfg, torch.bfloat16, "cuda"), t, torch.bfloat16, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_model_decode_through_the_route_matches_the_modules(dtype):
    _model_matches_the_modules(4, dtype, "cuda")
    test_final_norm_matches_the_module(dtype, "cuda")


@pytest.mark.gpu
def test_cuda_bf16_model_declares_the_route_by_default():
    net = random_model(PRESETS["tiny"], device="cuda", dtype=torch.bfloat16).net
    assert all(isinstance(b.gpu, DecodeLayer) for b in net.layers) and isinstance(net._gpu_norm, FinalNorm)
    net = net.float()
    assert all(b.gpu is None for b in net.layers) and net._gpu_norm is None
