"""The decode scheduler (DESIGN.md, Scheduler): plan on the CPU, run on streams.

plan.py     per-step plans of the GPU row cache (plain numpy data)
cache.py    the GPU row cache: LRU token rows per layer, hit statistics
rowcopy.py  zero-copy gather of host rows into a device buffer (Triton + torch twin)
streams.py  gathered buffers, pinned staging ring, copy stream and events
fetch.py    RowFetch: the decode path's pluggable row source (protocol, Retrieved)
overlap.py  OverlapFetch, the scheduler's RowFetch (runtime/scheduled.py plugs it in for
            RuntimeConfig(scheduler="overlap"))
budget.py   the GPU memory plan of a session and its refusal message
workspace.py       the plan's transients: a prefill chunk's and a decode step's workspace
prefill_chunk.py   the auto prefill chunk's rule (candidates, room, cap)
weight_storage.py  bytes of the weights as stored (unquantized, int4/int8, GGUF, tinygemm)
"""

from kvloft.scheduler.budget import MemoryPlan, plan_memory
from kvloft.scheduler.params import SchedulerParams

__all__ = ["MemoryPlan", "SchedulerParams", "plan_memory"]
