"""Row pointers built from address tables, with their alignment known to the compiler.

Kernels that find a row's chunk through a table of base addresses (host-tier chunks read in
place, every sequence's KV buffer in the whole decode step) turn each loaded int64 into a
pointer. Triton knows nothing of a loaded value, so a pointer made by casting it is assumed
1-byte aligned and every row is read one element at a time (2-byte loads for bf16: the
scoring of the whole step's exact rows ran ~12x slower on an H100 than the same scan through
a plain pointer). `rebase` instead writes the row as `first + offset`, where `first` is a
kernel argument (16-byte aligned, specialized by Triton) and the offset a multiple of ALIGN
elements, so row reads become 16-byte vector loads.

ALIGN comes from `table_align(first)`: 16 bytes' worth of elements when `first` starts on a
16-byte boundary and each of its rows and heads spans a multiple of 16 bytes, else 1 (no
claim). The tables' other chunks share `first`'s layout and are allocations of their own or
views of one buffer at row boundaries (every table in kvloft is built so), so they sit a
multiple of 16 bytes from `first` whenever `first`'s rows do.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

__all__ = ["VECTOR_BYTES", "rebase", "table_align"]

VECTOR_BYTES = 16  # one vector load


def table_align(first: Tensor, *more: Tensor) -> int:
    """Elements every chunk base of tables like `first` (and `more`, read through the same
    ALIGN) is a multiple of, counted from its own first chunk: VECTOR_BYTES / element size
    when every given tensor starts on a 16-byte boundary with rows and heads of whole 16-byte
    multiples, else 1."""
    tensors = (first, *more)
    size = max(t.element_size() for t in tensors)
    ok = all(
        t.data_ptr() % VECTOR_BYTES == 0 and all(s * t.element_size() % VECTOR_BYTES == 0 for s in t.stride()[:-1])
        for t in tensors
    )
    return VECTOR_BYTES // size if ok else 1


@triton.jit
def rebase(first, addr, ALIGN: tl.constexpr):
    """Pointers (of `first`'s element type) to the byte addresses `addr` (int64, any shape),
    written as `first` plus an element offset the compiler takes as a multiple of ALIGN."""
    elt: tl.constexpr = first.dtype.element_ty.primitive_bitwidth // 8
    rel = (addr - first.to(tl.int64, bitcast=True)) // elt
    return first + tl.multiple_of(rel, ALIGN)
