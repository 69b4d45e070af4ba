"""The Triton kernel set: the ops `kernels.kernel_set` swaps in for the reference.

Each op has the reference's signature (kernels/reference.py) plus optional keyword-only
extras (check_ids, num_splits, launch). `attend` (prefill) is PyTorch's fused attention
with the log-sum-exp, `causal_attend` its out-only form through public SDPA with a
lower-right causal mask (kernels/flash.py), the reference where neither applies.
"""

from kvloft.kernels.flash import attend, causal_attend
from kvloft.kernels.merge import merge
from kvloft.kernels.scoring import score_topk
from kvloft.kernels.sparse_decode import decode_attend, gather_attend

__all__ = ["attend", "causal_attend", "decode_attend", "gather_attend", "merge", "score_topk"]
