"""Float casts that round to nearest even on the GPU and in the Triton interpreter alike.

`x.to(tl.bfloat16)` rounds to nearest even on a GPU, but the interpreter (TRITON_INTERPRET=1,
the CPU tests) truncates fp32 -> bf16 (and its `fp_downcast_rounding="rtne"` path carries no
rounding into the exponent), so a kernel meant to round as torch does would differ from it in
about half of its bf16 outputs there. `round_to` rounds bf16 on the fp32 bits instead (four
integer ops: nothing next to a memory-bound kernel's loads), NaN kept NaN; fp16 and fp32
casts round to nearest even in both places as they are.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["round_to"]


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) -> dtype, rounded to nearest even (as torch's casts)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)  # round the low 16 bits away, ties to even
        bits = tl.where(x != x, 0x7FC00000, bits)  # noqa: PLR0124 (NaN: a quiet NaN; the carry could reach the sign)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
