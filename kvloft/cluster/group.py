"""Shard processes on a Ray cluster: a placement group, one KVShard actor per bundle.

    group = ShardGroup(n_shards=3, strategy="SPREAD", num_cpus=1)   # reserves, then starts the actors
    group.where()       # [{"node_id": ..., "pid": ...}, ...]
    group.close()       # kills the actors, frees the placement group

A group outlives sessions: a ShardedSession given a group opens its token ranges on the
group's actors (each actor holds the stores of any number of sessions) and closes them when
it is done, so sessions do not pay for process start-up. A session without a group makes
its own and closes it with itself.

When an actor dies (killed, its node lost), the first caller that sees the RayActorError
asks the group to replace it: a new actor in the same bundle. A bundle whose node died is
re-placed by Ray on a live node with room (for STRICT_SPREAD: one holding no other bundle of
the group) as soon as one exists, e.g. when a node joins; `wait_placed` waits for that and
names the fix when it does not happen. The stores are reopened from their files by the
sessions that use them.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from kvloft.cluster.config import STRATEGIES, ShardConfig

_ACTOR_CLASS = None


class ShardUnavailable(RuntimeError):
    """A shard did not come back: no node to place it on, or ShardConfig.max_recoveries
    re-creations all failed."""


def import_ray():
    """The ray module, or a ValueError naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"sharded sessions need Ray ({e}); run: pip install 'kvloft[ray]'") from e
    return ray


def ensure_ray(address: str | None) -> None:
    """Join (or start) a Ray cluster unless this process already did; clear error if unreachable."""
    ray = import_ray()
    if ray.is_initialized():
        return
    _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "a new local cluster"
        raise ValueError(f"no Ray cluster reachable at {where} ({e}); start one with `ray start --head` and pass "
                         "ShardConfig(address='auto') (or the head's host:port), or call ray.init() first") from e


def _probe(address: str | None, timeout_s: float = 5.0) -> None:
    """A "host:port" head address must accept a TCP connection: Ray itself retries an
    unreachable address for minutes before it gives up."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ShardConfig.address must be 'auto', 'host:port' or None, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"no Ray cluster reachable at {address} ({e.strerror or e}); start one with "
                         f"`ray start --head --port {port}` there, or fix ShardConfig.address") from None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        from kvloft.cluster.shard import KVShard

        _ACTOR_CLASS = import_ray().remote(KVShard)
    return _ACTOR_CLASS


class ShardGroup:
    """A placement group of `n_shards` bundles and one KVShard actor in each."""

    def __init__(self, n_shards: int = 2, *, strategy: str = "SPREAD", num_cpus: float = 1.0,
                 timeout_s: float = 120.0, address: str | None = None) -> None:
        if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
            raise ValueError(f"a shard group needs n_shards >= 1, got {n_shards!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not num_cpus > 0:
            raise ValueError(f"num_cpus per shard must be > 0, got {num_cpus!r}")
        ensure_ray(address)
        self.n_shards, self.strategy, self.num_cpus, self.timeout_s = n_shards, strategy, num_cpus, timeout_s
        self.pg = self._reserve()
        self.actors = [self._spawn(i) for i in range(n_shards)]
        self.replacements = [0] * n_shards
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, cfg: ShardConfig) -> ShardGroup:
        return cls(cfg.n_shards, strategy=cfg.strategy, num_cpus=cfg.num_cpus, timeout_s=cfg.timeout_s,
                   address=cfg.address)

    def _reserve(self):
        ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group

        pg = placement_group([{"CPU": self.num_cpus}] * self.n_shards, strategy=self.strategy)
        try:
            ray.get(pg.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            raise ValueError(
                f"could not place {self.n_shards} shards of {self.num_cpus} CPU with strategy {self.strategy} in "
                f"{self.timeout_s:.0f} s (cluster has {ray.cluster_resources().get('CPU', 0)} CPUs on "
                f"{len(ray.nodes())} node(s)); add nodes, lower num_cpus or n_shards, or use SPREAD"
            ) from None
        return pg

    def _spawn(self, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        where = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)
        return _actor_class().options(num_cpus=self.num_cpus, scheduling_strategy=where, max_restarts=0).remote()

    def actor(self, i: int):
        return self.actors[i]

    def replace(self, i: int, dead) -> Any:
        """A fresh actor for slot i, unless another caller already replaced `dead`."""
        ray = import_ray()
        with self._lock:
            if self.actors[i] is dead:
                with contextlib.suppress(Exception):  # already gone is the usual case
                    ray.kill(dead, no_restart=True)
                self.actors[i] = self._spawn(i)
                self.replacements[i] += 1
            return self.actors[i]

    def bundle_node(self, i: int) -> str | None:
        """The live node bundle i is placed on now; None while its node is lost (or Ray has
        not yet noticed) and no live node with room has taken it."""
        from ray.util.placement_group import placement_group_table

        node = placement_group_table(self.pg)["bundles_to_node_id"].get(i)
        if not node:
            return None
        return node if any(n["NodeID"] == node and n["Alive"] for n in import_ray().nodes()) else None

    def wait_placed(self, i: int, timeout_s: float) -> str:
        """Wait until bundle i has a node again (after its node was lost); returns the node id.
        ShardUnavailable naming the fix when none takes it within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (node := self.bundle_node(i)) is None:
            if time.monotonic() > deadline:
                ray = import_ray()
                alive = sum(n["Alive"] for n in ray.nodes())
                one_each = " and holding no other shard of the group" if self.strategy == "STRICT_SPREAD" else ""
                raise ShardUnavailable(
                    f"shard {i} lost its node and none of the {alive} live node(s) has room for it ({self.num_cpus} "
                    f"CPU{one_each}) after {timeout_s:.0f} s; add a node to the cluster (Ray places the shard "
                    "there), free CPUs, or use strategy SPREAD / fewer shards"
                )
            time.sleep(0.05)
        return node

    def where(self) -> list[dict[str, Any]]:
        """Node id and pid of every shard."""
        ray = import_ray()
        return ray.get([a.where.remote() for a in self.actors], timeout=self.timeout_s)

    def close(self) -> None:
        """Kill the actors and free the placement group (store files stay on disk)."""
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        for a in self.actors:
            with contextlib.suppress(Exception):  # closing what is already gone
                ray.kill(a, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
