"""Stage processes on a Ray cluster: a placement group, one StageActor per bundle.

    group = StageGroup(model, PipelineConfig(directory=..., n_stages=3))   # plans, reserves, starts
    group.where()       # [{"node_id": ..., "pid": ..., "layers": [0, 10]}, ...]
    group.close()       # kills the actors, frees the placement group

A group is a model split into contiguous layer ranges (kvloft/cluster/plan.py), one stage
actor per range, each holding its layers' weights (sent once through the object store; the
group keeps the references, so a replacement stage gets them without the driver's help). It
outlives sessions: a PipelinedSession given a group opens its state on the group's stages
(each holds any number of sessions), so sessions do not pay for process start-up or weights.

When an actor dies (killed, its node lost), the session that sees it asks the group to
replace it: a new actor in the same bundle. A bundle whose node died is re-placed by Ray on
a live node with room (for STRICT_SPREAD: one holding no other bundle of the group) as soon
as one exists, e.g. when a node joins; `wait_placed` waits for that and names the fix when
it does not happen. The sessions then reopen their state on it from their record files.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Any

from kvloft.cluster.config import PipelineConfig
from kvloft.cluster.plan import layer_cost, split_by_memory, split_even

_ACTOR_CLASS = None


class StageUnavailable(RuntimeError):
    """A stage did not come back: no node to place it on, or PipelineConfig.max_recoveries
    re-creations all failed."""


def import_ray():
    """The ray module, or a ValueError naming the install command."""
    try:
        import ray
    except ImportError as e:
        raise ValueError(f"pipelined sessions need Ray ({e}); run: pip install 'kvloft[ray]'") from e
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
                         "PipelineConfig(address='auto') (or the head's host:port), or call ray.init() first") from e


def _probe(address: str | None, timeout_s: float = 5.0) -> None:
    """A "host:port" head address must accept a TCP connection: Ray itself retries an
    unreachable address for minutes before it gives up."""
    if address is None or address in ("auto", "local") or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"PipelineConfig.address must be 'auto', 'host:port' or None, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(f"no Ray cluster reachable at {address} ({e.strerror or e}); start one with "
                         f"`ray start --head --port {port}` there, or fix PipelineConfig.address") from None


def _actor_class():
    global _ACTOR_CLASS
    if _ACTOR_CLASS is None:
        from kvloft.cluster.stage import StageActor

        _ACTOR_CLASS = import_ray().remote(StageActor)
    return _ACTOR_CLASS


def plan_stages(model, cfg: PipelineConfig) -> list[tuple[int, int]]:
    """The layer range of each stage: by memory when cfg.stage_memory is set, else even."""
    n = model.config.n_layers
    if cfg.memory is None:
        return split_even(n, cfg.n_stages)
    return split_by_memory(n, layer_cost(model.config, model.dtype), cfg.max_tokens, cfg.memory)


class StageGroup:
    """A placement group of `n_stages` bundles and one StageActor (a layer range) in each."""

    def __init__(self, model, cfg: PipelineConfig) -> None:
        from kvloft.runtime.loader import Model

        if not isinstance(model, Model):
            raise TypeError(f"StageGroup needs a model from kvloft.load_model(...), got {type(model).__name__}")
        if not isinstance(cfg, PipelineConfig):
            raise TypeError(f"cfg must be a kvloft.cluster.PipelineConfig, got {type(cfg).__name__}")
        self.cfg, self.model_config = cfg, model.config
        self.layers = plan_stages(model, cfg)  # refuses before anything is started
        self.dtype = str(model.dtype).removeprefix("torch.")
        self.n_stages = cfg.n_stages
        ensure_ray(cfg.address)
        self.weights = self._put_weights(model)
        self.pg = self._reserve()
        self.actors = [self._spawn(i) for i in range(self.n_stages)]
        for i, a in enumerate(self.actors):
            self._load(i, a)
        # a spare reserves no GPU, so Ray hides the GPUs from it: GPU stages restart without one
        self.use_spares = cfg.spares and not cfg.num_gpus
        self.spares = [self._spare(i) if self.use_spares else None for i in range(self.n_stages)]
        self.replacements = [0] * self.n_stages
        self._lock = threading.Lock()

    def _put_weights(self, model) -> list:
        from kvloft.cluster.stage import stage_weights

        ray = import_ray()
        last = self.n_stages - 1
        return [ray.put(stage_weights(model.net, a, b, i == last)) for i, (a, b) in enumerate(self.layers)]

    def _reserve(self):
        ray = import_ray()
        from ray.util.placement_group import placement_group, remove_placement_group

        c = self.cfg
        bundle = {"CPU": c.num_cpus, **({"GPU": c.num_gpus} if c.num_gpus else {})}
        pg = placement_group([bundle] * self.n_stages, strategy=c.strategy)
        try:
            ray.get(pg.ready(), timeout=c.timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            have = ray.cluster_resources()
            raise ValueError(
                f"could not place {self.n_stages} stages of {bundle} with strategy {c.strategy} in "
                f"{c.timeout_s:.0f} s (cluster has {have.get('CPU', 0)} CPUs, {have.get('GPU', 0)} GPUs on "
                f"{len(ray.nodes())} node(s)); add nodes, lower num_cpus/num_gpus or n_stages, or use SPREAD"
            ) from None
        return pg

    def _spawn(self, i: int, spare: bool = False):
        """A StageActor process in bundle i (a spare reserves no CPU: it idles until it takes over)."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        c = self.cfg
        where = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=i)
        cpus, gpus = (0, 0) if spare else (c.num_cpus, c.num_gpus)
        return _actor_class().options(num_cpus=cpus, num_gpus=gpus, scheduling_strategy=where,
                                      max_restarts=0).remote(c.torch_threads)

    def _load(self, i: int, actor, device: str | None = None) -> None:
        """Give actor stage i's layers (submitted; calls after it run once it is loaded)."""
        device = device or ("cuda" if self.cfg.num_gpus else "cpu")
        actor.load.remote(self.model_config, self.layers[i], i == self.n_stages - 1, self.weights[i], self.dtype,
                          device)

    def _spare(self, i: int):
        """A spare for stage i: its process in bundle i, stage i's weights loaded on the CPU."""
        actor = self._spawn(i, spare=True)
        self._load(i, actor, "cpu")
        return actor

    def actor(self, i: int):
        return self.actors[i]

    def replace(self, i: int, dead) -> Any:
        """A live actor for stage i, unless another caller already replaced `dead`: the bundle's
        spare when it answers (a new spare is started behind it), else a new process."""
        ray = import_ray()
        with self._lock:
            if self.actors[i] is dead:
                with contextlib.suppress(Exception):  # already gone is the usual case
                    ray.kill(dead, no_restart=True)
                actor, self.spares[i] = self.spares[i], None
                if actor is None or not self._answers(actor):
                    actor = self._spawn(i)
                    self._load(i, actor)
                self.actors[i] = actor
                self.replacements[i] += 1
            return self.actors[i]

    def refill_spares(self) -> None:
        """Start a spare for every stage that used its own (after a recovery: not during it, so
        the new process does not compete with the stage rebuilding)."""
        with self._lock:
            for i, spare in enumerate(self.spares):
                if spare is None and self.use_spares:
                    self.spares[i] = self._spare(i)

    def _answers(self, actor, timeout_s: float = 1.0) -> bool:
        ray = import_ray()
        try:
            return bool(ray.get(actor.ping.remote(), timeout=timeout_s))
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

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
        StageUnavailable naming the fix when none takes it within timeout_s."""
        deadline = time.monotonic() + timeout_s
        while (node := self.bundle_node(i)) is None:
            if time.monotonic() > deadline:
                ray = import_ray()
                alive = sum(n["Alive"] for n in ray.nodes())
                one_each = " and holding no other stage of the group" if self.cfg.strategy == "STRICT_SPREAD" else ""
                raise StageUnavailable(
                    f"stage {i} lost its node and none of the {alive} live node(s) has room for it "
                    f"({self.cfg.num_cpus} CPU{one_each}) after {timeout_s:.0f} s; add a node to the cluster (Ray "
                    "places the stage there), free CPUs, or use strategy SPREAD / fewer stages"
                )
            time.sleep(0.05)
        return node

    def alive(self, timeout_s: float) -> list[bool]:
        """Whether each stage answers a ping within timeout_s."""
        ray = import_ray()
        refs = [a.ping.remote() for a in self.actors]
        out = []
        for ref in refs:
            try:
                out.append(bool(ray.get(ref, timeout=timeout_s)))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(False)
        return out

    def where(self) -> list[dict[str, Any]]:
        """Node id, pid and layer range of every stage."""
        ray = import_ray()
        return ray.get([a.where.remote() for a in self.actors], timeout=self.cfg.timeout_s)

    def close(self) -> None:
        """Kill the actors and free the placement group (record files stay on disk)."""
        ray = import_ray()
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        for a in [*self.actors, *(s for s in getattr(self, "spares", []) if s is not None)]:
            with contextlib.suppress(Exception):  # closing what is already gone
                ray.kill(a, no_restart=True)
        with contextlib.suppress(Exception):
            remove_placement_group(self.pg)
        self.actors, self.spares = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
