"""The numba options every compiled CPU kernel shares.

FASTMATH   LLVM's fast-math flags less the no-NaN and no-Inf assumptions: sums may be
           reordered and products fused, but a NaN or Inf in the keys, values or weights
           flows into the output, where the session's non-finite check (runtime/numerics.py)
           reports it.
ERROR_MODEL "numpy": a float division by zero gives inf or nan, as numpy does, instead of
           raising ZeroDivisionError from inside a kernel.
"""

from __future__ import annotations

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
ERROR_MODEL = "numpy"
