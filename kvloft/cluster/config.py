"""PipelineConfig: how a pipelined session splits a model's layers over stage processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK")
MAX_STAGES = 64


@dataclass(frozen=True)
class PipelineConfig:
    """Knobs of a pipelined session (docs/cluster.md).

    directory: where each stage appends its layers' KV records, one subdirectory per stage
        (`<directory>/stage-<i>/`). On a multi-node cluster it must be storage every node
        sees (NFS, a shared volume) for a stage re-created on another node to find its files.
    n_stages: stage processes (Ray actors, one placement-group bundle each); stage i runs a
        contiguous range of layers (kvloft/cluster/plan.py), its weights and its tiered KV.
    max_tokens: the most tokens a session on the pipeline may hold (0 = no limit). With
        stage_memory the layers are split so that every stage holds its weights and the KV
        of max_tokens tokens; a setup the cluster cannot hold is refused up front.
    stage_memory: host bytes each stage may use for weights + KV (one int for all stages, or
        one per stage); None = not planned by memory (layers split evenly).
    strategy: placement-group strategy: "SPREAD" (one bundle per node where it can),
        "STRICT_SPREAD" (one per node, or placement fails), "PACK", "STRICT_PACK".
    num_cpus, num_gpus: what each stage's bundle reserves (a GPU stage runs on its GPU).
    torch_threads: torch intra-op threads in each stage process (about its CPUs).
    spares: keep one idle spare process per stage (in its bundle, reserving no CPU, the stage's
        weights loaded in host memory) that takes over a killed stage at once; without it a
        replacement starts a new process and loads the weights (seconds). A node lost takes
        its spares with it. CPU stages only (a spare holds no GPU: GPU stages restart anew).
    fsync: each record append is fsynced (survives node power loss; a disk sync per call).
        Without it appends are flushed to the OS, which survives a killed stage process.
    max_recoveries: stage re-creations tried per call before StageUnavailable is raised.
    timeout_s: wait for the placement group, for a re-created stage to come up, and for a
        node with room to take a stage whose node was lost (then StageUnavailable).
    overwrite: a new session may delete the stage directories an earlier session left in
        `directory` (otherwise that is a ValueError, so no files are lost by mistake).
    address: the Ray cluster to join if Ray is not initialized yet ("auto" = the cluster
        `ray start` runs on this machine, "host:port" = a head node); None starts a local one.
    """

    directory: str
    n_stages: int = 2
    max_tokens: int = 0
    stage_memory: int | tuple[int, ...] | None = None
    strategy: str = "SPREAD"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    spares: bool = True
    fsync: bool = False
    max_recoveries: int = 3
    timeout_s: float = 120.0
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str) or not self.directory:
            raise ValueError(f"PipelineConfig.directory must name a directory (a non-empty str), got "
                             f"{self.directory!r}")
        _check_int("n_stages", self.n_stages, 1, MAX_STAGES)
        _check_int("max_tokens", self.max_tokens, 0)
        _check_int("torch_threads", self.torch_threads, 1, 1024)
        _check_int("max_recoveries", self.max_recoveries, 0, 100)
        if self.stage_memory is not None:
            mem = (self.stage_memory,) if isinstance(self.stage_memory, int) else self.stage_memory
            if not isinstance(mem, tuple) or len(mem) not in (1, self.n_stages) \
                    or not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in mem):
                raise ValueError(f"PipelineConfig.stage_memory must be bytes > 0, one int or a tuple of "
                                 f"n_stages={self.n_stages} ints, got {self.stage_memory!r}")
            if not self.max_tokens:
                raise ValueError("PipelineConfig.stage_memory plans the layers for max_tokens tokens; set "
                                 "max_tokens > 0 too")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"PipelineConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.num_cpus > 0 or not self.num_gpus >= 0 or not self.timeout_s > 0:
            raise ValueError(f"PipelineConfig.num_cpus and timeout_s must be > 0 and num_gpus >= 0, got "
                             f"{self.num_cpus!r}, {self.timeout_s!r}, {self.num_gpus!r}")

    @property
    def memory(self) -> tuple[int, ...] | None:
        """Bytes per stage (n_stages entries), or None."""
        if self.stage_memory is None:
            return None
        mem = (self.stage_memory,) if isinstance(self.stage_memory, int) else self.stage_memory
        return mem * self.n_stages if len(mem) == 1 else mem

    def replace(self, **changes: Any) -> PipelineConfig:
        return dataclasses.replace(self, **changes)


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum \
            or (maximum is not None and value > maximum):
        top = f" and <= {maximum}" if maximum is not None else ""
        raise ValueError(f"PipelineConfig.{name} must be an int >= {minimum}{top}, got {value!r}")
