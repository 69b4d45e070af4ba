"""Weight-only quantization: packed int4/int8 weights with group scales (packed.py), the
torch reference, Triton kernels (triton_qmm.py) behind launchers (ops.py), and PyTorch's
int4 "tinygemm" ops on the same weights (tinygemm.py).

Triton is imported only when a launcher runs, so the reference works without it.
"""

from kvloft.kernels.quant.packed import (
    GROUPS,
    PackedWeight,
    dequantize,
    pack_nibbles,
    quantize_int4,
    quantize_int8,
    reference_matmul,
    unpack_nibbles,
)

__all__ = ["GROUPS", "PackedWeight", "dequantize", "pack_nibbles", "quantize_int4", "quantize_int8",
           "reference_matmul", "unpack_nibbles"]
