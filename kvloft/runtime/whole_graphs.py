"""The captured graphs of one whole decode step (runtime/whole_step.py), one per refresh pattern.

A step of HiP rows refreshes, per layer, only the stages some row's schedule has due this step
(whole_hip.py HipTables._pattern: per layer a bit per stage, the union over the rows). A graph
captured for a pattern holds no launch for the stages outside it; rows that do not refresh a
stage inside it keep their masks through the step's data, as in the graph of every stage. With
the default staggered schedule a batch of fixed rows cycles through lcm(refresh_steps)
patterns (16 for (16, 8, 4)), so a few graphs serve every step.

Bounded: at most `cap` pattern graphs (an LRU) besides the graph of every stage (key None,
right for any step: the table decides per row). A new pattern that finds the LRU full takes the
place of the least recently replayed graph only where that one has not run for `stale` steps
(its rows left the batch); otherwise the step replays the graph of every stage. So patterns that
outnumber the cap cost the old step time, never a capture per step, and the step never fails.
All graphs are captured into one memory pool (they never run at the same time, so their
intermediates share memory) and write their logits into one buffer outside it.

Eager steps (capture=False: the CPU through the Triton interpreter) choose their pattern through
the same LRU and run it (the stages outside it skipped), so the tests exercise both.
"""

from __future__ import annotations

import gc
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable

import torch
from torch import Tensor

__all__ = ["MAX_PATTERN_GRAPHS", "PatternGraphs"]

log = logging.getLogger(__name__)

MAX_PATTERN_GRAPHS = 32  # pattern graphs per whole step (bucket, shape): two default cycles of 16
MAX_GRAPHS_LIMIT = 1024  # a cap past this holds more graph memory than any schedule needs


class PatternGraphs:
    """forward(pattern) -> logits [B, V] fp32: the step over the static buffers running the stages
    of `pattern` (None: every stage). run(pattern) replays (capturing first) the graph of
    `pattern` where the LRU admits it, else the graph of every stage; eagerly where not capture."""

    def __init__(self, forward: Callable[[Hashable | None], Tensor], capture: bool, cap: int = MAX_PATTERN_GRAPHS,
                 stale: int | None = None) -> None:
        if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= MAX_GRAPHS_LIMIT:
            raise ValueError(f"the pattern graph cap must be an int in [0, {MAX_GRAPHS_LIMIT}], got {cap!r}")
        self._forward, self.capture, self.cap = forward, capture, cap
        self.stale = 4 * cap if stale is None else stale  # steps: four default cycles at the default cap
        self._lru: OrderedDict[Hashable, int] = OrderedDict()  # pattern -> the step it last ran, oldest first
        self._graphs: dict[Hashable | None, torch.cuda.CUDAGraph] = {}
        self._pool: tuple[int, int] | None = None
        self._out: Tensor | None = None  # [B, V] fp32: every graph's logits
        self._clock = 0
        self.last: Hashable | None = None  # the pattern the last step ran (None: every stage)
        self.counts = {"patterns": 0, "captures": 0, "evictions": 0, "fallbacks": 0}

    @property
    def held(self) -> int:
        """Graphs held now (pattern graphs and the graph of every stage)."""
        return len(self._graphs)

    def patterns(self) -> list[Hashable]:
        """The patterns the LRU holds, least recently run first."""
        return list(self._lru)

    def run(self, pattern: Hashable | None) -> Tensor:
        """The step of `pattern` (see the class doc) -> logits [B, V] fp32 (the shared buffer once
        captured: copy what you keep)."""
        self._clock += 1
        key = self.last = self._admit(pattern)
        if not self.capture:
            return self._forward(key)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key)
            if graph is None:  # capture failed: eager from now on
                return self._forward(key)
        graph.replay()
        return self._out

    def _admit(self, pattern: Hashable | None) -> Hashable | None:
        """The key the step runs under: `pattern` where the LRU holds or admits it, else None."""
        if pattern is None:
            return None
        if pattern in self._lru:
            self._lru.move_to_end(pattern)
            self._lru[pattern] = self._clock
            return pattern
        if len(self._lru) >= self.cap:
            old, used = next(iter(self._lru.items()), (None, self._clock))
            if self.cap == 0 or self._clock - used <= self.stale:
                self.counts["fallbacks"] += 1
                return None
            del self._lru[old]
            self._graphs.pop(old, None)  # its memory goes back to the pool
            self.counts["evictions"] += 1
        self._lru[pattern] = self._clock
        self.counts["patterns"] += 1
        return pattern

    def _capture(self, key: Hashable | None) -> torch.cuda.CUDAGraph | None:
        """Eager passes on a side stream (two before the first capture, one after: they write the
        rows and masks the replay writes), then one capture into the shared pool. A failed capture
        leaves the step eager (its launch overhead returns)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(1 if self._pool else 2):
                warm = self._forward(key)
        torch.cuda.current_stream().wait_stream(side)
        if self._out is None:
            self._out = torch.empty_like(warm)
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        gc_was_on = gc.isenabled()
        gc.disable()  # a collection inside a capture can free pinned buffers (an event query: capture breaks)
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                self._out.copy_(self._forward(key))
        except RuntimeError as e:
            log.warning("CUDA graph capture of the whole decode step failed (%s); running it eagerly",
                        str(e).splitlines()[0])
            self.capture = False
            self._graphs.clear()
            torch.cuda.synchronize()
            return None
        finally:
            if gc_was_on:
                gc.enable()
        self._graphs[key] = graph
        self.counts["captures"] += 1
        return graph
