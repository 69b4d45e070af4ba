"""A session's state as tensors and JSON, taken and put back through its public methods.

    tensors, retriever_tensors, meta = collect_state(session)   # views of the tiers, no copy
    restore_state(new_session, source, meta)                    # source: get_tensor/keys
    restore_retriever(new_session.backend, state)               # rebuild, then load_state_dict
    copy_session(src, dst)                                      # the three above, in memory

persist.py writes what collect_state returns to files and reads it back (safetensors'
safe_open is a source); copy_session hands it over in memory (Session.fork). `meta` holds the
manifest's "session", "tiers" (each layer's ring state and host chunk count, the backend's
scalars) and "retriever" (its class and JSON scalars; its tensors come apart) fields.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import torch
from torch import Tensor

from kvloft.runtime.attention import TieredAttention
from kvloft.tiers.packed import PackedRows


def copy_session(src, dst) -> None:
    """Fill `dst`, a new session built with `src`'s configs for the same model, with `src`'s
    tiers, tokens, last logits, timings and retriever state, in memory: what save_session and
    restore_session do, without files (Session.fork). Every tensor is copied, so the two share
    nothing mutable; the retriever is rebuilt from the copied host tier and its state_dict()
    restored on top, as a load does (the same retrievers continue exactly)."""
    tensors, retr_tensors, meta = collect_state(src)
    restore_state(dst, _Tensors(tensors), meta)
    if isinstance(dst.backend, TieredAttention):
        state = copy.deepcopy(meta["retriever"]["state"])  # its lists are the parent's own
        if state is not None:
            state.update({k.removeprefix("retriever."): t.clone() for k, t in retr_tensors.items()})
        restore_retriever(dst.backend, state)


class _Tensors:
    """A dict of tensors read as safetensors' safe_open reads a file (get_tensor, keys)."""

    def __init__(self, tensors: dict[str, Tensor]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, name: str) -> Tensor:
        return self._tensors[name]


def collect_state(session) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Any]]:
    """The session's tensors (views where the tiers hold them, on their devices), the retriever's
    tensors, and the JSON state: the manifest's "session", "tiers" and "retriever" fields."""
    state = session.state_dict()
    tensors: dict[str, Tensor] = {"session.tokens": torch.tensor(state["tokens"], dtype=torch.int64)}
    if state["last_logits"] is not None:
        tensors["session.last_logits"] = state["last_logits"]
    meta: dict[str, Any] = {"session": {"times": state["times"], "n_tokens": len(state["tokens"])}}
    retr_tensors: dict[str, Tensor] = {}
    backend = session.backend
    if isinstance(backend, TieredAttention):
        meta["tiers"] = _collect_tiers(backend, tensors)
        retr_json, retr_tensors = _collect_retriever(backend.retriever)
        meta["retriever"] = retr_json
    else:
        for i, store in enumerate(backend.layers):
            k, v = store.kv()
            tensors[f"dense.{i}.k"], tensors[f"dense.{i}.v"] = k, v
    return tensors, retr_tensors, meta


def _collect_tiers(backend, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Static buffers and host chunks of every layer into `tensors`; ring state as JSON."""
    layers = []
    for i, t in enumerate(backend.cache.layers):
        tensors[f"static.{i}.k"], tensors[f"static.{i}.v"], tensors[f"static.{i}.pos"] = t.k, t.v, t.pos
        for name, store in (("k", t.host_k), ("v", t.host_v), ("pos", t.host_pos)):
            if isinstance(store, PackedRows):  # 8-bit rows (the manifest's CacheConfig.host_dtype) as stored
                for c, (_, codes, scales) in enumerate(store.iter_packed()):
                    tensors[f"host.{i}.{name}.{c}"], tensors[f"host.{i}.{name}.scale.{c}"] = codes, scales
                continue
            for c, (_, rows) in enumerate(store.iter_chunks()):
                tensors[f"host.{i}.{name}.{c}"] = rows  # a view of the filled part of chunk c
        layers.append({**t.ring_state(), "evict_batch": t.evict_batch,
                       "n_host": t.n_host, "host_chunks": len(list(t.host_pos.iter_chunks()))})
    return {"layers": layers, **backend.state_dict()}


def _collect_retriever(retriever) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Split retriever.state_dict() into JSON scalars and tensors (None if it has no state_dict)."""
    out: dict[str, Any] = {"class": type(retriever).__name__, "state": None}
    if not hasattr(retriever, "state_dict"):
        return out, {}
    scalars, tensors = {}, {}
    for key, val in retriever.state_dict().items():
        if isinstance(val, Tensor):
            tensors[f"retriever.{key}"] = val
        else:
            scalars[key] = val
    try:
        json.dumps(scalars)
    except TypeError as e:
        raise ValueError(f"{type(retriever).__name__}.state_dict() holds a value that is neither a tensor "
                         f"nor JSON ({e}); make it a tensor or a plain number/str/list") from e
    out["state"] = scalars
    out["tensor_keys"] = sorted(tensors)
    return out, tensors


def restore_state(session, f, meta: dict[str, Any]) -> None:
    """Tiers, tokens and last logits from `f` (safetensors' get_tensor/keys: a file or _Tensors),
    whose tensors the tiers copy in (the logits are cloned)."""
    keys = set(f.keys())
    dev = session.model.device
    if isinstance(session.backend, TieredAttention):
        _restore_tiers(session.backend, f, meta["tiers"])
    else:
        for i, store in enumerate(session.backend.layers):
            store.append(f.get_tensor(f"dense.{i}.k").to(dev), f.get_tensor(f"dense.{i}.v").to(dev))
    logits = f.get_tensor("session.last_logits").to(dev, copy=True) if "session.last_logits" in keys else None
    session.load_state_dict({"tokens": f.get_tensor("session.tokens").tolist(), "last_logits": logits,
                             "times": dict(meta["session"]["times"])})


def _restore_tiers(backend, f, meta: dict[str, Any]) -> None:
    for i, (t, m) in enumerate(zip(backend.cache.layers, meta["layers"], strict=True)):
        for name in ("k", "v", "pos"):
            saved = f.get_tensor(f"static.{i}.{name}")
            buf = getattr(t, name)
            if saved.shape != buf.shape or saved.dtype != buf.dtype:
                raise RuntimeError(f"static.{i}.{name}: saved {tuple(saved.shape)} {saved.dtype}, "
                                   f"expected {tuple(buf.shape)} {buf.dtype}; load with the n_sink, n_window "
                                   f"and CacheConfig.evict_batch it was saved with (evict_batch "
                                   f"{m.get('evict_batch', 0)}; the default is 64 on CUDA, 0 on the CPU) "
                                   "and the same dtype")
            buf.copy_(saved)
        t.set_ring_state(m["sink_fill"], m["ring_fill"], m["ring_head"])
        for name, store in (("k", t.host_k), ("v", t.host_v), ("pos", t.host_pos)):
            for c in range(m["host_chunks"]):
                if isinstance(store, PackedRows):
                    key = f"host.{i}.{name}"
                    store.append_packed(f.get_tensor(f"{key}.{c}"), f.get_tensor(f"{key}.scale.{c}"))
                else:
                    store.append(f.get_tensor(f"host.{i}.{name}.{c}"))
        if t.n_host != m["n_host"] or len(t.host_v) != m["n_host"] or len(t.host_pos) != m["n_host"]:
            raise RuntimeError(f"layer {i}: host tier holds {t.n_host} rows, the manifest says {m['n_host']}")
    backend.load_state_dict(meta)


def restore_retriever(backend, state: dict[str, Any] | None) -> None:
    """Rebuild every built layer from the host tier, then restore the retriever's state on top."""
    r = backend.retriever
    backend.rebuild_indexes()
    if state is not None and hasattr(r, "load_state_dict"):
        r.load_state_dict(state)
