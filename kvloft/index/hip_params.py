"""Options of the HiP retriever (kvloft/index/hip.py), validated: stage chunk sizes, kept
tokens and refresh periods, probe, where the keys live and which kernels run the stages."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from kvloft.index.base import params_from_options
from kvloft.kernels.hip_stage import PROBES

__all__ = ["HEADS", "RANKS", "HipParams"]

RANKS = ("logit", "z")
HEADS = ("shared", "kv")


@dataclass(frozen=True)
class HipParams:
    """Method options (RetrievalConfig.options), with InfiniteHiP's decode defaults.

    chunk_sizes: tokens per chunk at each stage (powers of two, non-increasing).
    kept_tokens: tokens each stage keeps (non-increasing; the last entry is replaced by
        select's budget).
    refresh_steps: a stage's mask is recomputed every this many decode steps (per layer;
        non-increasing, since a refreshed stage refreshes every later one).
    stagger: layer l runs its refreshes l % refresh_steps[0] steps later in the cycle, so
        every decode step refreshes a few layers instead of one step in refresh_steps[0]
        refreshing stage 1 of every layer (a step of 2-4x the usual time); the work per
        layer is the same.
    probe: which key of each half the search reads: "first" (HiP) or "middle".
    chunk_rows: rows per chunk of the retriever's key copy (a multiple of chunk_sizes[0],
        so no stage-1 chunk straddles two).
    kernel: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch": how the stages
        run (kernels/hip_stage.py: stage 1 per store chunk, later stages one launch each).
    keys_on: where the keys HiP searches live. "device": a copy on the compute device (on
        CUDA it grows with the context: N * H_kv * D * 2 bytes per layer). "host": in
        pinned host memory, the stage kernels reading only the probe rows over PCIe
        (zero-copy through unified addressing), so no GPU memory grows with the context.
        In a session these are the host tier's own keys, read in place (attach_host_tier:
        no copy at all; an 8-bit tier, CacheConfig.host_dtype, as its codes + scales),
        unless the tier spills to disk or its chunk size is not a multiple of
        chunk_sizes[0]; then a pinned model-dtype copy;
        a refresh of stage 1 reads 2 * log2(chunk_sizes[0]) / chunk_sizes[0] of the keys
        (1/16 with the defaults), the later stages a few thousand rows. For contexts whose
        keys do not fit the GPU budget (512K-1M tokens on a 24 GiB card). Needs the Triton
        kernels on CUDA; on the CPU both are the same.
    rank: how a probe row is scored. "logit": the max over query heads of q_h · k (HiP).
        "z": the max over query heads of head h's logit z-scored over the layer's indexed
        keys, (q_h · k - q_h · mu_g) / sigma_h with mu_g, Sigma_g the running mean and
        covariance of KV head g's keys (index/key_moments.py): one mask then serves KV
        heads whose logits sit on different scales. Costs O(n * D^2) per KV head for n added
        rows and a D-vector and scalar per query head per select; rows of either rank search
        together in select_batch (index/hip_batch.py).
    heads: "shared": one mask per layer for all KV heads, chunks ranked by the max over every
        query head (Selection.ids [k]). "kv": each KV head keeps its own stage masks, its
        chunks ranked by the max over its own query-head group only (Selection.ids [H_kv, k]),
        so a KV head whose logits sit on a smaller scale than another's still keeps its own
        best chunks (the HiP paper's masks are per head). Costs H_kv searches per refreshed
        stage (each a launch reading the full [H_kv, D] probe rows, the other groups' heads
        masked out); such rows decline the batched search and the whole step (per-row path).
    scan_stages: indices of the stages that score every row of their candidate chunks
        instead of the probe search: a chunk's score is the max over its rows of the row
        score rank defines (index/hip_stages.py scan_scores), so a chunk whose best row sits
        between the probe rows is not lost. A scanned stage i > 0 reads at most
        max(kept_tokens[i - 1], budget) rows per refresh (32768 with the defaults, every 8
        steps), whatever the context length; stage 0 reads every row. An int (one stage) or
        "1/2" (a command line: kvloft eval --methods hip:scan_stages=1/2) are read as a
        tuple. The batched search scans them too (index/hip_batch.py: rows of equal scan_stages
        search together); such rows decline the whole step (per-row path).
    """

    chunk_sizes: tuple[int, ...] = (256, 32, 8)
    kept_tokens: tuple[int, ...] = (32768, 8192, 2048)
    refresh_steps: tuple[int, ...] = (16, 8, 4)
    stagger: bool = True
    probe: str = "first"
    chunk_rows: int = 16384
    kernel: str = "auto"
    keys_on: str = "device"
    rank: str = "logit"
    heads: str = "shared"
    scan_stages: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("chunk_sizes", "kept_tokens", "refresh_steps"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or not value:
                raise ValueError(f"hip option {name} must be a non-empty tuple of ints, got {value!r}")
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"hip option {name} must hold ints >= 1, got {value!r}")
            object.__setattr__(self, name, tuple(value))
            if any(a < b for a, b in itertools.pairwise(value)):
                raise ValueError(f"hip option {name} must be non-increasing stage by stage, got {value!r}")
        n = len(self.chunk_sizes)
        if len(self.kept_tokens) != n or len(self.refresh_steps) != n:
            raise ValueError(
                f"hip options chunk_sizes, kept_tokens, refresh_steps need one entry per stage; got "
                f"{len(self.chunk_sizes)}, {len(self.kept_tokens)}, {len(self.refresh_steps)} entries"
            )
        if any(c & (c - 1) for c in self.chunk_sizes):
            raise ValueError(f"hip chunk_sizes must be powers of two (the search halves them), got {self.chunk_sizes}")
        bad = [(k, c) for k, c in zip(self.kept_tokens[:-1], self.chunk_sizes[:-1]) if k < c]
        if bad:
            raise ValueError(f"hip kept_tokens must be >= the stage's chunk size, got (kept, chunk) {bad}")
        if self.probe not in PROBES:
            raise ValueError(f"hip option probe must be one of {PROBES}, got {self.probe!r}")
        if not isinstance(self.chunk_rows, int) or self.chunk_rows % self.chunk_sizes[0]:
            raise ValueError(
                f"hip option chunk_rows ({self.chunk_rows!r}) must be a multiple of chunk_sizes[0] "
                f"({self.chunk_sizes[0]})"
            )
        if self.kernel not in ("auto", "triton", "torch"):
            raise ValueError(f"hip option kernel must be auto, triton or torch, got {self.kernel!r}")
        if self.stagger not in (True, False):  # 0 / 1 from a command line are fine
            raise ValueError(f"hip option stagger must be true or false, got {self.stagger!r}")
        object.__setattr__(self, "stagger", bool(self.stagger))
        if self.keys_on not in ("device", "host"):
            raise ValueError(f"hip option keys_on must be 'device' or 'host', got {self.keys_on!r}")
        if self.rank not in RANKS:
            raise ValueError(f"hip option rank must be one of {RANKS} (raw logits or z-scored per query head), "
                             f"got {self.rank!r}")
        if self.heads not in HEADS:
            raise ValueError(f"hip option heads must be one of {HEADS} (one mask for all KV heads, or one per KV "
                             f"head), got {self.heads!r}")

        object.__setattr__(self, "scan_stages", _stage_indices(self.scan_stages, n))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> HipParams:
        return params_from_options(cls, options, "hip")

    @property
    def n_stages(self) -> int:
        return len(self.chunk_sizes)


def _stage_indices(value: Any, n_stages: int) -> tuple[int, ...]:
    """scan_stages as a sorted tuple of distinct stage indices in [0, n_stages): from a tuple or
    list of ints, one int, or a string of indices split by "/" or "," ("1/2": method specs are
    comma-separated lists, kvloft/eval/cli.py)."""
    if isinstance(value, str):
        try:
            value = tuple(int(v) for v in value.replace("/", ",").split(",") if v.strip())
        except ValueError:
            raise ValueError(f"hip option scan_stages must list stage indices, e.g. scan_stages=1 or "
                             f"\"1/2\", got {value!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ValueError(f"hip option scan_stages must be a tuple of stage indices (ints), got {value!r}")
    bad = [v for v in value if not 0 <= v < n_stages]
    if bad:
        raise ValueError(f"hip option scan_stages holds {bad}, not stage indices of the {n_stages} stages "
                         f"(chunk_sizes {n_stages} entries): use indices in 0..{n_stages - 1}")
    return tuple(sorted(set(value)))
