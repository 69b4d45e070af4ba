"""ShardConfig: how a sharded session splits its host tier over shard processes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("SPREAD", "STRICT_SPREAD", "PACK", "STRICT_PACK")


@dataclass(frozen=True)
class ShardConfig:
    """Knobs of a sharded session (docs/cluster.md).

    directory: where the session's token ranges persist, one subdirectory per range
        (`<directory>/range-<i>/`). The shard processes write it; on a multi-node cluster
        it must be storage every node sees (NFS, a shared volume) for a shard re-created
        on another node to find its files.
    n_shards: shard processes (Ray actors, one placement-group bundle each), and the most
        token ranges a session opens; a context whose host tier would outgrow
        n_shards * shard_tokens is refused with a ValueError.
    shard_tokens: host-tier rows per range. Range i holds host rows [i * shard_tokens,
        (i + 1) * shard_tokens) (row 0 = the oldest token that left the window) on shard i;
        it is opened when its first row arrives (a new shard when the last one is full).
    strategy: placement-group strategy: "SPREAD" (one bundle per node where it can),
        "STRICT_SPREAD" (one per node, or placement fails), "PACK", "STRICT_PACK".
    num_cpus: CPUs each shard's bundle reserves (fractions allowed).
    global_topk: False: each shard attends to its own top-`budget` rows per KV head, so a
        step attends to up to n_shards * budget host rows (a superset of the global top
        `budget`; one round trip). True: two round trips; shards return the scores of their
        top-`budget`, the driver keeps the global top `budget` and the shards attend to
        their share (the same rows a single-process session attends to with `exact`).
    fsync: each append is fsynced (survives node power loss; costs a disk sync per call).
        Without it appends are flushed to the OS, which survives a killed shard process.
    max_recoveries: shard re-creations tried per call before ShardUnavailable is raised.
    timeout_s: wait for the placement group, for a re-created shard to come up, and for a
        node with room to take a shard whose node was lost (then ShardUnavailable).
    overwrite: a new session may delete the range directories an earlier session left in
        `directory` (otherwise that is a ValueError, so no files are lost by mistake).
    address: the Ray cluster to join if Ray is not initialized yet ("auto" = the cluster
        `ray start` runs on this machine, "host:port" = a head node); None starts a local one.
    """

    directory: str
    n_shards: int = 2
    shard_tokens: int = 65536
    strategy: str = "SPREAD"
    num_cpus: float = 1.0
    global_topk: bool = False
    fsync: bool = False
    max_recoveries: int = 3
    timeout_s: float = 120.0
    overwrite: bool = False
    address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.directory, str) or not self.directory:
            raise ValueError(f"ShardConfig.directory must name a directory (a non-empty str), got "
                             f"{self.directory!r}")
        for name in ("n_shards", "shard_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ShardConfig.{name} must be an int >= 1, got {value!r}")
        if isinstance(self.max_recoveries, bool) or not isinstance(self.max_recoveries, int) \
                or self.max_recoveries < 0:
            raise ValueError(f"ShardConfig.max_recoveries must be an int >= 0, got {self.max_recoveries!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"ShardConfig.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if not self.num_cpus > 0 or not self.timeout_s > 0:
            raise ValueError(f"ShardConfig.num_cpus and timeout_s must be > 0, got {self.num_cpus!r}, "
                             f"{self.timeout_s!r}")

    @property
    def capacity(self) -> int:
        """Host-tier rows a session can hold: n_shards * shard_tokens."""
        return self.n_shards * self.shard_tokens

    def replace(self, **changes: Any) -> ShardConfig:
        return dataclasses.replace(self, **changes)
