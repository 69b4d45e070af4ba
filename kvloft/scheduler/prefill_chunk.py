"""The auto prefill chunk's rule: the largest of PREFILL_CHUNKS whose workspace fits the room
the GPU budget leaves (less budget // CACHE_HEADROOM), no more than SELECTING_CHUNK_MAX where
chunks select their host rows. The workspace itself is priced by the caller
(scheduler/budget.py pick_prefill_chunk and its plan).
"""

from __future__ import annotations

from collections.abc import Callable

from kvloft.config import RetrievalConfig

__all__ = ["CACHE_HEADROOM", "PREFILL_CHUNKS", "SELECTING_CHUNK_MAX", "auto_chunk", "chunk_room", "selecting"]

PREFILL_CHUNKS = (16384, 8192, 4096, 2048, 512)  # the auto prefill chunk's candidates, largest first
# where a chunk's queries select the host rows it reads (exact past prefill_dense_tokens, extrapolate),
# the chunk size is a quality setting: the auto choice stays at the size the quality runs measured
SELECTING_CHUNK_MAX = 4096
CACHE_HEADROOM = 64  # the row cache leaves budget / CACHE_HEADROOM of the GPU budget free


def chunk_room(budget: int, resident: int, free_bytes: int | None) -> int | None:
    """Bytes a prefill chunk's workspace may take: the budget less the resident bytes and
    budget // CACHE_HEADROOM (what the plan does not model), at most free_bytes; None = no bound."""
    room = None if not budget else budget - budget // CACHE_HEADROOM - resident
    if free_bytes is not None:
        room = free_bytes if room is None else min(room, free_bytes)
    return room


def selecting(rcfg: RetrievalConfig, n: int) -> bool:
    """A prefill growing to n tokens has chunks that select their host rows by their queries
    (runtime/exact_prefill.py sparse, runtime/extrapolate.py), so its chunk size is approximate."""
    if rcfg.method == "dense":
        return False
    return rcfg.position_mode == "extrapolate" or n > rcfg.prefill_dense_tokens


def auto_chunk(prefill: Callable[[int], int], room: int | None, cap: int | None = None) -> int:
    """The largest of PREFILL_CHUNKS (at most `cap`) whose workspace prefill(chunk) fits `room`
    (None: any), the smallest when none does."""
    for c in PREFILL_CHUNKS:
        if (cap is None or c <= cap) and (room is None or prefill(c) <= room):
            return c
    return PREFILL_CHUNKS[-1]
