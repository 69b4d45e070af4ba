"""The numba options every compiled CPU kernel shares.

FASTMATH   LLVM's fast-math flags less the no-NaN and no-Inf assumptions: sums may be
           reordered and products fused, but a NaN or Inf in the keys, values or weights
           flows into the output, where the session's non-finite check (runtime/numerics.py)
           reports it.
FASTMATH_FINITE  FASTMATH plus "ninf" (no infinities), for kernels that hold no infinity of
           their own (kernels/cpu_attend.py): its running maxima vectorize, 24 against 43 ms
           for 30 SmolLM2 layers at 6K here. A NaN still reaches the output; a +inf key does
           not (it is read as a large finite logit), so such a cache is caught by the checks of
           what enters it (runtime/numerics.py FiniteWatch), not by this kernel's output.
ERROR_MODEL "numpy": a float division by zero gives inf or nan, as numpy does, instead of
           raising ZeroDivisionError from inside a kernel.
"""

from __future__ import annotations

FASTMATH = {"reassoc", "contract", "arcp", "nsz", "afn"}
FASTMATH_FINITE = FASTMATH | {"ninf"}
ERROR_MODEL = "numpy"
