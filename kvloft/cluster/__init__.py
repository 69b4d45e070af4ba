"""Multi-node kvloft on Ray: sharded sessions, shard processes, a Ray Serve deployment.

    from kvloft.cluster import ShardConfig, ShardedSession, ShardGroup, deploy

See docs/cluster.md. Ray is imported only when a group, session or deployment is made
(install it with `pip install 'kvloft[ray]'`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ShardConfig": "kvloft.cluster.config",
    "ShardGroup": "kvloft.cluster.group",
    "KVShard": "kvloft.cluster.shard",
    "ShardStore": "kvloft.cluster.shard",
    "StoreSpec": "kvloft.cluster.shard",
    "CorruptRecord": "kvloft.cluster.records",
    "ShardedAttention": "kvloft.cluster.session",
    "ShardedSession": "kvloft.cluster.session",
    "ShardUnavailable": "kvloft.cluster.group",
    "deploy": "kvloft.cluster.serve",
    "kvloft_deployment": "kvloft.cluster.serve",
}

__all__ = ["CorruptRecord", "KVShard", "ShardConfig", "ShardGroup", "ShardStore", "ShardUnavailable",
           "ShardedAttention", "ShardedSession", "StoreSpec", "deploy", "kvloft_deployment"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvloft.cluster' has no attribute {name!r}")
