"""Weight-only quantized linear layers: `QuantLinear` and `quantize_linears(net, scheme)`.

    net = quantize_linears(model.net, "int4")   # q/k/v/o/gate/up/down (+ an untied lm_head)

A QuantLinear holds a packed weight (kernels/quant/packed.py) as buffers and has
nn.Linear's forward signature: x [..., K] -> [..., N]. On CUDA an int4 weight is converted
once to PyTorch's tinygemm layout (kernels/quant/tinygemm.py) and decode rows (T <= 16)
run `aten._weight_int4pack_mm`, prefill chunks dequantize from that layout + cuBLAS;
int8, and int4 the ops do not take, run the Triton dequantizing GEMV for T <= 16 rows
and dequantize + cuBLAS matmul above (kernels/quant/ops.py). On the CPU, or with kernels="reference", it dequantizes in torch
and calls F.linear (kernels/quant/packed.py is the reference); set_kernels(net,
"tinygemm") opts the CPU into the tinygemm CPU op for few rows (tinygemm.MAX_T).

Schemes (RuntimeConfig.weights): "bf16" = not quantized (the weights stay in the compute
dtype); "int4" = 4-bit, asymmetric (scale and min per group of `group` inputs, fp16);
"int8" = 8-bit symmetric, one fp16 scale per output channel. Embeddings and norms stay
in the compute dtype. `group` applies to float weights quantized here; GGUF blocks kept
as they are hold group 32 whatever it says, and a GGUF type of more than 4 bits stays
int8 (group 32) under "int4" (runtime/quant_gguf.py): a net may mix int4 and int8 layers,
each QuantLinear choosing its kernel from its own bits (tinygemm takes int4 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kvloft.kernels.quant import tinygemm
from kvloft.kernels.quant.packed import GROUPS, PackedWeight, dequantize, quantize_int4, quantize_int8

SCHEMES = ("bf16", "int8", "int4")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class QuantScheme:
    """How linear weights are stored: bits 4 or 8; group inputs per scale (None = per output
    channel); symmetric int4 has no mins (ggml Q4_0); lm_head: quantize an untied head too."""

    bits: int
    group: int | None
    symmetric: bool = False
    lm_head: bool = True

    def quantize(self, w: Tensor) -> PackedWeight:
        """w [N, K] float -> PackedWeight on w's device."""
        if self.bits == 8:
            return quantize_int8(w, self.group)
        return quantize_int4(w, self.group or 128, self.symmetric)


def scheme(name: str, group: int = 128, lm_head: bool = True) -> QuantScheme | None:
    """A scheme name ("bf16", "int8", "int4") -> QuantScheme, or None for "bf16"."""
    if name not in SCHEMES:
        raise ValueError(f"weights must be one of {SCHEMES}, got {name!r}")
    if group not in GROUPS:
        raise ValueError(f"quant_group must be one of {GROUPS}, got {group!r}")
    if name == "bf16":
        return None
    return QuantScheme(bits=4, group=group, lm_head=lm_head) if name == "int4" else QuantScheme(8, None, lm_head=lm_head)


KERNELS = ("auto", "tinygemm", "triton", "reference")


class QuantLinear(nn.Module):
    """nn.Linear with a packed weight. forward(x [..., K]) -> [..., N] in x's dtype.

    kernels: "auto" (tinygemm where the layer holds its layout and x fits, else Triton on
    CUDA and the reference elsewhere), "tinygemm" (convert now if the ops take this weight;
    then as "auto"), "triton" or "reference". dtype: the model's compute dtype, which the
    tinygemm layout is converted for (None: no tinygemm).

    Which int4 form is held where (decided here, once, by tinygemm.supported_reasons):
      CUDA, "auto"/"tinygemm", the ops take it: tinygemm's layout only (tg_weight,
        tg_scales_zeros) plus our fp16 scales/mins. Prefill chunks (T > tinygemm.MAX_T)
        dequantize from the layout with our scales (ops.dequantize_tiny) for cuBLAS: the
        same weight as before. `packed` rebuilds qweight from the layout (fingerprints;
        the reference and Triton keep it once chosen).
      CPU, "tinygemm": both forms (the CPU layout is opaque: prefill chunks need ours).
      otherwise: our packed form only (`tinygemm_off` says why).
    """

    def __init__(self, packed: PackedWeight, bias: Tensor | None = None, kernels: str = "auto",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        packed.validate()
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        self.out_features, self.in_features = packed.shape
        self.bits, self.group, self.dtype = packed.bits, packed.group, dtype
        self.register_buffer("qweight", packed.qweight)
        self.register_buffer("scales", packed.scales)
        self.register_buffer("mins", packed.mins)
        self.register_buffer("tg_weight", None)
        self.register_buffer("tg_scales_zeros", None)
        self.tinygemm_off = "not converted"
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernels = kernels
        if kernels == "tinygemm" or (kernels == "auto" and packed.qweight.is_cuda):
            self._to_tinygemm(packed, required=kernels == "tinygemm")

    def _to_tinygemm(self, packed: PackedWeight, required: bool) -> None:
        if self.dtype is None:
            reasons = ["the compute dtype is not known: pass dtype= (QuantLinear, install)"]
        else:
            reasons = tinygemm.supported_reasons(packed, self.dtype)
        if reasons:
            self.tinygemm_off = "; ".join(reasons)
            if required:
                raise ValueError(f"kernels='tinygemm' cannot run this weight: {self.tinygemm_off}; "
                                 "use kernels='auto'")
            return
        tw = tinygemm.convert(packed, self.dtype)
        self.tg_weight, self.tg_scales_zeros, self.tinygemm_off = tw.packed, tw.scales_zeros, ""
        if tw.packed.is_cuda:  # the layout gives the values back: hold one copy on the GPU
            self.qweight = None

    @property
    def tiny(self) -> tinygemm.TinyGemmWeight | None:
        if self.tg_weight is None:
            return None
        return tinygemm.TinyGemmWeight(self.tg_weight, self.tg_scales_zeros, (self.out_features, self.in_features),
                                       self.group, self.dtype)

    @property
    def packed(self) -> PackedWeight:
        """Our packed form (kernels/quant/packed.py); rebuilt from the CUDA layout where only
        that is held (torch permutations over N x K bytes: for fingerprints and switches)."""
        if self.qweight is None:
            return tinygemm.packed_from_cuda(self.tiny, self.scales, self.mins)
        return PackedWeight(self.qweight, self.scales, self.mins, (self.out_features, self.in_features),
                            self.bits, self.group)

    @property
    def backend(self) -> str:
        """"tinygemm" when decode rows run PyTorch's int4 kernel, else "triton" or "reference"."""
        if self.tg_weight is not None and self.kernels in ("auto", "tinygemm"):
            return "tinygemm"
        on_cuda = self.scales.is_cuda
        return "triton" if self.kernels == "triton" or (self.kernels == "auto" and on_cuda) else "reference"

    @property
    def packed_bytes(self) -> int:
        """Bytes the layer holds for its weight (every form it keeps); the bias is a parameter."""
        held = (self.qweight, self.scales, self.mins, self.tg_weight, self.tg_scales_zeros)
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def set_kernels(self, kernels: str) -> None:
        """Choose the kernels; "tinygemm" converts the weight now (once) or raises naming why not."""
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "tinygemm" and self.tg_weight is None:
            self._to_tinygemm(self.packed, required=True)
        if kernels in ("triton", "reference") and self.qweight is None:
            self.qweight = self.packed.qweight  # kept from now on: both forms on the GPU
        self.kernels = kernels

    def extra_repr(self) -> str:
        kind = f"int{self.bits}" + ("" if self.mins is None else "+min")
        return (f"in_features={self.in_features}, out_features={self.out_features}, {kind}, group={self.group}, "
                f"kernels={self.kernels} ({self.backend})")

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        tw = self.tiny if self.kernels in ("auto", "tinygemm") else None
        if tw is not None and x2.dtype == tw.dtype and x2.shape[0] <= tw.max_t:
            y = tinygemm.matmul(x2, tw)
        elif tw is not None and self.qweight is None:  # prefill chunks: dequantize from the layout, cuBLAS
            from kvloft.kernels.quant.ops import dequantize_tiny

            y = F.linear(x2, dequantize_tiny(tw, self.scales, self.mins, x2.dtype))
        elif self.kernels == "triton" or (self.kernels == "auto" and x.is_cuda):
            from kvloft.kernels.quant.ops import quant_matmul

            y = quant_matmul(x2 if x2.stride(-1) == 1 else x2.contiguous(), self.packed)
        else:
            y = F.linear(x2, dequantize(self.packed).to(x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


def linear_names(net: nn.Module, with_head: bool) -> list[str]:
    """Names of the quantizable linears of a Transformer: each block's seven, then lm_head
    (when `with_head` and the head is not tied to the embeddings)."""
    names = [f"layers.{i}.{leaf}" for i in range(len(net.layers)) for leaf in LINEARS]
    if with_head and not net.config.tie_word_embeddings:
        names.append("lm_head")
    return names


def install(net: nn.Module, name: str, packed: PackedWeight, kernels: str = "auto",
            dtype: torch.dtype | None = None) -> QuantLinear:
    """Replace the module `name` (an nn.Linear, possibly on meta) by a QuantLinear of `packed`,
    keeping its bias; dtype: the compute dtype (the old weight's when it is not on meta)."""
    owner, _, leaf = name.rpartition(".")
    parent = net.get_submodule(owner) if owner else net
    old = getattr(parent, leaf)
    bias = old.bias.data if getattr(old, "bias", None) is not None else None
    if dtype is None and getattr(old, "weight", None) is not None and not old.weight.is_meta:
        dtype = old.weight.dtype
    ql = QuantLinear(packed, bias, kernels, dtype)
    setattr(parent, leaf, ql)
    return ql


@torch.no_grad()
def quantize_linears(net: nn.Module, scheme_: QuantScheme | str, kernels: str = "auto") -> nn.Module:
    """Replace q/k/v/o/gate/up/down (and an untied lm_head, if the scheme says so) by
    QuantLinear modules, in place, one at a time: peak memory is the weights plus one
    layer's packed copy. Already quantized modules are left as they are. Returns net."""
    sch = scheme(scheme_) if isinstance(scheme_, str) else scheme_
    if sch is None:
        return net
    for name in linear_names(net, sch.lm_head):
        mod = net.get_submodule(name)
        if isinstance(mod, nn.Linear):
            packed = sch.quantize(mod.weight.data)
            install(net, name, packed, kernels)
            del mod
    return net


def set_kernels(net: nn.Module, kernels: str) -> None:
    """Set every QuantLinear's kernel choice ("auto", "tinygemm", "triton", "reference");
    "tinygemm" converts each int4 layer the ops take (on the CPU an opt-in: it keeps both
    forms) and leaves the others as they are."""
    for m in net.modules():
        if isinstance(m, QuantLinear):
            if kernels == "tinygemm" and (m.dtype is None or tinygemm.supported_reasons(m.packed, m.dtype)):
                m.kernels = "auto"
                continue
            m.set_kernels(kernels)


def packed_bytes(net: nn.Module) -> int:
    """Bytes of every QuantLinear's packed weight in net."""
    return sum(m.packed_bytes for m in net.modules() if isinstance(m, QuantLinear))


def weights_scheme(net: nn.Module) -> str:
    """"bf16" (no QuantLinear), "int8" (every quantized linear 8-bit) or "int4" (any 4-bit:
    a GGUF loaded as "int4" keeps its types of more than 4 bits at 8, runtime/quant_gguf.py)."""
    bits = {m.bits for m in net.modules() if isinstance(m, QuantLinear)}
    if not bits:
        return "bf16"
    return "int4" if 4 in bits else "int8"


def apply_weights(net: nn.Module, held: str, runtime) -> None:
    """Make net's weights what RuntimeConfig `runtime` asks (runtime.weights, quant_group,
    kernels): "auto" keeps them; an unquantized net is quantized in place; a net quantized
    otherwise is refused, naming the fix. Sets every QuantLinear's kernels to runtime.kernels."""
    want = runtime.weights
    if want not in ("auto", held):
        if held != "bf16":
            raise ValueError(f"the model holds {held} weights but RuntimeConfig.weights={want!r}; load it "
                             f"again with load_model(..., weights={want!r}) or use weights='auto'")
        quantize_linears(net, scheme(want, runtime.quant_group))
    set_kernels(net, runtime.kernels)
