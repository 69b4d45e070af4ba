"""Session.fork: a new session holding the same context, sharing nothing mutable with its parent.

    dense = Session(model, RetrievalConfig(method="dense"))
    dense.feed(prompt)                                    # one prefill
    exact = dense.fork(RetrievalConfig(method="exact"))   # tiers and index built from dense's K/V
    a, b = dense.generate(16), exact.generate(16)         # decoding one never changes the other

Two ways, by the fork's retrieval config:
- the parent's config: a copy (persist.copy_session: what save + load do, in memory): tiers,
  tokens, last logits, timings and the retriever's state_dict(); it continues exactly as the
  parent would.
- another config: the fork's tiers are filled with the parent's keys and values (rows in
  position order, in the chunks its own prefill would use) and its index built from them, as
  if it had prefilled the same tokens. That holds only where both prefills compute the same
  K/V: dense attention on both sides. The parent must be dense, or tiered at exact positions
  with a prefill that never went sparse, no decoded token (a decode step attends to a
  selection, not to every key) and full-precision host rows; the fork must read exact
  positions, keep full-precision host rows (its own prefill attends to what its host tier
  holds), every prefill chunk of it must be dense (at most `prefill_dense_tokens` tokens
  before the context's last), and its retriever must not learn from prefill queries (a dense
  parent keeps none). A dense parent's decoded tokens are rows computed by dense attention,
  so they count as prefilled (equal up to float rounding). check_rebuild lists every reason
  a fork cannot be made.
Tokens the parent has and the fork's limits (max_context, host and disk budgets) are checked
before anything is built.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kvloft.config import RetrievalConfig
from kvloft.runtime.attention import TieredAttention
from kvloft.runtime.dense import DenseAttention
from kvloft.runtime.session_state import copy_session

REFEED = "feed the prompt to a new Session with that config instead"


def fork_session(parent, rcfg: RetrievalConfig):
    """Session.fork: `parent`'s context in a new session of its type with retrieval `rcfg`
    (the parent's model, runtime and cache configs); ValueError naming every reason it cannot,
    before anything is built."""
    check_fork(parent, rcfg)
    child = type(parent)(parent.model, rcfg, parent.runtime, parent.cache_cfg)
    try:
        fill_fork(parent, child)
    except BaseException:
        child.reset()  # its spilled chunks' files, if any, are removed
        raise
    return child


def check_fork(parent, rcfg: RetrievalConfig) -> None:
    """ValueError naming every reason `parent` cannot be forked into `rcfg` (TypeError for a
    config of the wrong type); nothing is built."""
    if not isinstance(rcfg, RetrievalConfig):
        raise TypeError(f"fork(retrieval=...) must be a kvloft.RetrievalConfig or None, got {type(rcfg).__name__}")
    if not isinstance(parent.backend, (DenseAttention, TieredAttention)):
        raise TypeError(f"fork() copies a session's local tiers; this {type(parent).__name__} keeps its KV in "
                        f"{type(parent.backend).__name__}, which it cannot copy: {REFEED}")
    if parent.in_call:
        raise ValueError("cannot fork a session in the middle of a call (a stream() not finished): "
                         "exhaust or close() the stream first")
    if rcfg == parent.retrieval:
        return
    reasons = rebuild_blockers(parent, rcfg)
    if reasons:
        raise ValueError(f"cannot fork this {parent.retrieval.method} session into method={rcfg.method!r}: "
                         + "; ".join(reasons) + f". Fork with the session's own config (fork()), or {REFEED}")


def rebuild_blockers(parent, rcfg: RetrievalConfig) -> list[str]:
    """Every reason the fork's prefill would not compute the parent's K/V (module docstring)."""
    src, n, out = parent.retrieval, len(parent.tokens), []
    if src.method != "dense":
        if src.position_mode != "exact":
            out.append(f"its keys were computed at remapped positions (position_mode={src.position_mode!r})")
        elif parent.backend.prefill_stats["sparse_chunks"]:
            out.append("its prefill attended sparsely (past prefill_dense_tokens), so its K/V are not dense")
        if parent.state_dict()["times"]["decode_tokens"]:
            out.append("it decoded tokens through retrieval, so their K/V are not what a prefill computes")
        if parent.cache_cfg.host_dtype is not None:
            out.append(f"its host tier holds {parent.cache_cfg.host_dtype} rows, not the model's K/V")
    if rcfg.method != "dense":
        if rcfg.position_mode != "exact":
            out.append(f"position_mode={rcfg.position_mode!r} prefills at remapped positions (other K/V)")
        if src.method == "dense" and parent.cache_cfg.host_dtype is not None:
            out.append(f"its host tier would hold {parent.cache_cfg.host_dtype} rows, which its own prefill "
                       "attends to (other K/V than dense attention's)")
        if n - 1 > rcfg.prefill_dense_tokens:
            out.append(f"the context holds {n} tokens, over prefill_dense_tokens + 1 = "
                       f"{rcfg.prefill_dense_tokens + 1}: that prefill would attend sparsely (raise it)")
    return out


def fill_fork(parent, child) -> None:
    """Fill `child` (a new session for the parent's model, runtime and cache configs) with the
    parent's context: a copy for the same retrieval config, else built from the parent's K/V
    (check_fork passed). ValueError if it does not fit the child's limits."""
    n = len(parent.tokens)
    child.limits.check_capacity(child.backend, 0, n)
    if child.retrieval == parent.retrieval:
        copy_session(parent, child)
        return
    if isinstance(child.backend, TieredAttention) and n:
        r = child.backend.retriever
        if getattr(r, "needs_queries", True) and child.retrieval.query_sample:
            raise ValueError(f"cannot fork into method={child.retrieval.method!r}: its index learns from prefill "
                             f"queries, which the parent did not keep (query_sample="
                             f"{child.retrieval.query_sample}); {REFEED}")
    _rebuild(parent, child)
    state = parent.state_dict()
    logits = state["last_logits"]
    child.load_state_dict({"tokens": state["tokens"], "times": state["times"],
                           "last_logits": None if logits is None else logits.clone()})


@torch.inference_mode()  # the tiers' tensors are made and written in inference mode, as in a prefill
def _rebuild(parent, child) -> None:
    """The child's tiers and index from the parent's K/V, layer by layer, in the chunks the
    child's own prefill would append (its index built once at the end, as after a feed)."""
    n, dev = len(parent.tokens), child.model.device
    if n == 0:
        return
    backend = child.backend
    tiered = isinstance(backend, TieredAttention)
    chunk = child.limits.prefill_chunk(backend, 0, n) if tiered else n
    for layer in range(child.model.config.n_layers):
        k, v, pos = layer_kv(parent.backend, layer)
        k, v, pos = k.to(dev), v.to(dev), pos.to(dev)
        if not tiered:
            backend.layers[layer].append(k, v)
            continue
        for a in range(0, n, chunk):
            backend.append_rows(layer, k[a : a + chunk], v[a : a + chunk], pos[a : a + chunk])
    if tiered:
        backend.build_indexes()


def layer_kv(backend, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """One layer's keys (rotated) and values [N, H_kv, D] and positions [N] (int64), in position
    order: a dense backend's rows, or a tiered one's static and host tiers merged."""
    if not isinstance(backend, TieredAttention):
        k, v = backend.layers[layer].kv()
        return k, v, torch.arange(k.shape[0], device=k.device)
    tiers = backend.cache[layer]
    tiers.wait_host()
    sk, sv, sp = tiers.static_kv()
    ids = torch.arange(tiers.n_host)
    hk, hv, hp = (s.rows(ids).to(sk.device) for s in (tiers.host_k, tiers.host_v, tiers.host_pos))
    k, v, pos = torch.cat([hk, sk]), torch.cat([hv, sv]), torch.cat([hp, sp]).long()
    order = torch.argsort(pos)
    return k[order], v[order], pos[order]
