"""Weight-only quantization: packed int4/int8 weights with group scales (packed.py), the
torch reference, and Triton kernels (triton_qmm.py) behind launchers (ops.py).

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
