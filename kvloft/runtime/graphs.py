"""One decode token through the model with its dense parts replayed as CUDA graphs.

A decode step (T = 1) is a few hundred small kernels; launched one by one from Python the
launches, not the GPU, set its latency (on the H200 the Llama-3-8B shape spent ~30 ms a
step outside attention against a 3.8 ms weight-read floor). Attention cannot be captured:
retrievers pick different rows, sizes and host transfers every step. Everything else can,
so a step is cut at each attention call into n_layers + 1 segments:

    segment 0      embed(id), cos/sin(pos), layer 0 pre            -> q0, k0, v0
    segment i      layer i-1 post (o_proj, residual, MLP), layer i pre -> qi, ki, vi
    segment L      layer L-1 post, norm, lm_head                    -> logits

and a step is: replay segment 0, then for each layer attend eagerly (the backend, as in
Transformer.forward) and replay the next segment. The segments read fixed input buffers
(the token id, its position, the attention output) and write fixed outputs; they share
one memory pool and replay in capture order, as torch requires.

The outputs q, k, v of a layer are the same tensors every step (overwritten at the next
step's replay): a backend may read them during attend(), and must copy what it keeps.
Without CUDA (or with capture off) the same segments run eagerly, which is how the
cutting is tested on the CPU: a segmented step equals Transformer.forward exactly.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable

import torch
from torch import Tensor

from kvloft.runtime.model import AttentionBackend, Transformer

log = logging.getLogger(__name__)


class DecodeGraphs:
    """Decode steps of `net` (`batch` rows of one token each, default 1), graphed on CUDA
    when `capture`.

    Graphs are captured on the first step (after two eager warm-up passes of each
    segment on a side stream) and kept for the model's life; they hold pointers to the
    weights, so weights must be updated in place (load_state_dict does). With batch B the
    rows are B sequences decoded together (runtime/engine.py); the backend's attend() then
    gets q [B, H_q, D], k, v [B, H_kv, D] and positions [B] and answers [B, H_q, D].
    """

    def __init__(self, net: Transformer, capture: bool | None = None, batch: int = 1) -> None:
        dev = net.embed_tokens.weight.device
        self.net = net
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need a model on a CUDA device; use capture=False")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an int >= 1, got {batch!r}")
        cfg = net.config
        self.batch = batch
        self.ids = torch.zeros(batch, dtype=torch.long, device=dev)  # [B] the tokens
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)  # [B] their positions
        self.o = torch.zeros(batch, cfg.n_heads, cfg.head_dim, dtype=net.embed_tokens.weight.dtype,
                             device=dev)  # [B, H_q, D] the attention output fed to the next segment
        self._segments = self._build_segments()
        self._live: list[tuple[Tensor, ...]] = []  # each segment's outputs (the graphs' once captured)
        self._graphs: list[torch.cuda.CUDAGraph] = []

    def _build_segments(self) -> list[Callable[[], tuple[Tensor, ...]]]:
        net, n = self.net, len(self.net.layers)
        state: dict[str, Tensor] = {}

        def first() -> tuple[Tensor, ...]:
            x = net.embed_tokens(self.ids)  # [B, hidden]
            state["cos"], state["sin"] = net.rope(self.pos)
            return (x, *net.layers[0].pre(x, state["cos"], state["sin"]))

        def middle(i: int) -> Callable[[], tuple[Tensor, ...]]:
            def run() -> tuple[Tensor, ...]:
                x = net.layers[i - 1].post(self._x(i - 1), self.o)
                return (x, *net.layers[i].pre(x, state["cos"], state["sin"]))
            return run

        def last() -> tuple[Tensor, ...]:
            return (net.head(net.layers[n - 1].post(self._x(n - 1), self.o)),)

        return [first, *(middle(i) for i in range(1, n)), last]

    def _x(self, seg: int) -> Tensor:
        return self._live[seg][0]

    @torch.inference_mode()
    def step(self, token: Tensor, position: Tensor, backend: AttentionBackend) -> Tensor:
        """token [B] long, position [B] long (on the model's device) -> logits [B, V] fp32
        (B = batch; the logits are this object's buffer once captured: copy what you keep)."""
        self.ids.copy_(token)
        self.pos.copy_(position)
        if self.capture and not self._graphs:
            self._capture()
        n = len(self.net.layers)
        if not self._graphs:
            self._live = []
        for i in range(n + 1):
            if i:
                _, q, k, v = self._live[i - 1]
                self.o.copy_(backend.attend(i - 1, q, k, v, self.pos))
            if self._graphs:
                self._graphs[i].replay()
            else:
                self._live.append(self._segments[i]())
        return self._live[n][0]

    def _capture(self) -> None:
        """Warm each segment up twice on a side stream, then capture them in order."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._live = []
                for seg in self._segments:
                    self._live.append(seg())
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        self._live = []
        graphs = []
        gc_was_on = gc.isenabled()
        gc.disable()  # a collection inside a capture can free pinned buffers (an event query: capture breaks)
        try:
            for seg in self._segments:
                g = torch.cuda.CUDAGraph()
                # thread_local: CUDA calls of other threads (copy workers) do not break this capture
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    self._live.append(seg())
                graphs.append(g)
        except RuntimeError as e:  # the step stays correct eagerly; only its launch overhead returns
            log.warning("CUDA graph capture of the decode step failed (%s); decoding without graphs",
                        str(e).splitlines()[0])
            self.capture, self._live = False, []
            torch.cuda.synchronize()
            return
        finally:
            if gc_was_on:
                gc.enable()
        self._graphs = graphs
