"""HiP's state per layer (index/hip.py): the cached stage masks, the refresh schedule's step,
and their save and restore (HipRetriever.state_dict / load_state_dict).

A stage's mask is cached until the stage refreshes; rows that entered the host tier after it
was computed are fresh and passed on with it (with_fresh). The key copy is not state: it is
rebuilt from the host tier by build() or attach_host_tier on load, and so are rank="z"'s key
statistics (H_kv * D^2 fp64 per layer, too large for a per-step mark; select remakes them from
the keys wherever their row count differs from the store's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kvloft.index.hip_params import HipParams

__all__ = ["LayerState", "fresh_state", "load_state_dict", "state_dict", "with_fresh"]


@dataclass
class LayerState:
    """Cached stage masks of one layer.

    masks[i]: [M_i] int64 host rows kept by stage i when it last ran (ascending, except
        the last stage: best chunk first); [H_kv, M_i] with heads="kv"; None = never ran or
        invalidated.
    seen[i]: host rows present when stage i last ran (rows >= seen[i] are fresh).
    """

    masks: list[Tensor | None]
    seen: list[int]
    step: int = 0
    offset: int = 0  # layer-dependent phase of the refresh schedule (HipParams.stagger)
    budget: int = -1
    refreshed: tuple[bool, ...] = ()


def fresh_state(params: HipParams, layer: int) -> LayerState:
    """A layer's state before its first select: no mask, its refresh phase."""
    n = params.n_stages
    offset = layer % params.refresh_steps[0] if params.stagger else 0
    return LayerState(masks=[None] * n, seen=[0] * n, offset=offset)


def with_fresh(mask: Tensor, seen: int, n: int, last: bool, count: Tensor | None = None) -> Tensor:
    """A stage's cached rows mask [M] plus the rows that arrived since it ran (seen..n-1;
    count: arange(n)).

    Intermediate stages keep ascending order (the next stage chunks runs of neighbours);
    the last stage puts the fresh rows first, so trimming to the budget drops the tail
    of its lowest-scoring chunk instead.
    """
    if seen >= n:
        return mask
    fresh = count[seen:n] if count is not None else torch.arange(seen, n, device=mask.device)
    return torch.cat([fresh, mask] if last else [mask, fresh])


def state_dict(hip: Any, host: bool = True) -> dict[str, Any]:
    """HipRetriever.state_dict (hip: the retriever; index/hip.py imports this module, not the
    reverse): stage masks, refresh schedules and counters. Masks are tensors, the rest JSON; on
    the host, or (host=False, a session's mark) copied on the retriever's device."""
    s = hip._stats
    out: dict[str, Any] = {**s.counts(host), "refreshes": list(s.extra["refreshes"])}
    masks: dict[str, Tensor] = {}
    for layer, st in hip.state.items():
        p = f"layer{layer}."
        out.update({p + "step": st.step, p + "offset": st.offset, p + "budget": st.budget,
                    p + "seen": list(st.seen), p + "refreshed": list(st.refreshed)})
        masks.update({f"{p}mask{i}": m for i, m in enumerate(st.masks) if m is not None})
    if masks:  # int64 [M_i] (or [H_kv, M_i]) host rows each: one copy for all (a session marks every step)
        flat = torch.cat([m.flatten() for m in masks.values()])  # a new tensor: its parts alias nothing live
        parts = (flat.cpu() if host else flat).split([m.numel() for m in masks.values()])
        out.update({key: (part.clone() if host else part).view(m.shape)  # [M_i], or [H_kv, M_i] (heads="kv")
                    for (key, m), part in zip(masks.items(), parts, strict=True)})
    return out


def load_state_dict(hip: Any, state: dict[str, Any]) -> None:
    """HipRetriever.load_state_dict: restore state_dict() (after build() or attach_host_tier of
    every layer it names); ValueError if it was made with another number of stages."""
    s, n = hip._stats, hip.params.n_stages
    s.load_counts(state)
    refreshes = [int(r) for r in state["refreshes"]]
    if len(refreshes) != n:
        raise ValueError(f"hip state has {len(refreshes)} stages, these options {n}")
    s.extra["refreshes"] = refreshes
    for key in state:
        if not key.endswith(".step"):
            continue
        layer = int(key.removeprefix("layer").split(".")[0])
        p = f"layer{layer}."
        seen, refreshed = [int(x) for x in state[p + "seen"]], tuple(bool(x) for x in state[p + "refreshed"])
        if len(seen) != n or len(refreshed) not in (0, n):
            raise ValueError(f"hip state of layer {layer} does not have {n} stages")
        masks = [state.get(f"{p}mask{i}") for i in range(n)]
        hip.state[layer] = LayerState(masks=[None if m is None else m.to(hip.device) for m in masks],
                                      seen=seen, step=int(state[p + "step"]), offset=int(state[p + "offset"]),
                                      budget=int(state[p + "budget"]), refreshed=refreshed)
