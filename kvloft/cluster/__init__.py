"""Multi-node kvloft on Ray: pipelined sessions (layers split over stage processes), Ray Serve.

    from kvloft.cluster import PipelineConfig, PipelinedSession, StageGroup, deploy

See docs/cluster.md. Ray is imported only when a group, session or deployment is made
(install it with `pip install 'kvloft[ray]'`).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "PipelineConfig": "kvloft.cluster.config",
    "StageGroup": "kvloft.cluster.group",
    "StageUnavailable": "kvloft.cluster.group",
    "StageActor": "kvloft.cluster.stage",
    "StageSpec": "kvloft.cluster.store",
    "StageStore": "kvloft.cluster.store",
    "CorruptRecord": "kvloft.cluster.records",
    "PipelinedSession": "kvloft.cluster.session",
    "deploy": "kvloft.cluster.serve",
    "kvloft_deployment": "kvloft.cluster.serve",
}

__all__ = ["CorruptRecord", "PipelineConfig", "PipelinedSession", "StageActor", "StageGroup", "StageSpec",
           "StageStore", "StageUnavailable", "deploy", "kvloft_deployment"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kvloft.cluster' has no attribute {name!r}")
