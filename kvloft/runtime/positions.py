"""Positions in extrapolation mode: the remapping and the position-free search.

Positions (RetrievalConfig.position_mode; DESIGN.md, Positions). Keys are stored after
RoPE at their true positions. "exact" reads them there: with a covering budget the
result equals dense attention. "extrapolate" moves keys so that no query sees a relative
distance beyond n_sink + budget + n_window (+ the prefill chunk), which lets a model
answer from contexts longer than it was trained on. RoPE is a rotation, so a key stored at
p is read at p' by rotating it once more by p' - p (kernels: rotate_keys, gather_attend's
rot_delta). With w0 the true position of the oldest window key (decode: the ring, which
holds the query's own token; prefill: the ring before the chunk, or the chunk's first
position if the ring is empty):
    window keys (and, in prefill, the chunk's own tokens)   true positions
    the k retrieved keys of a KV head, rank r = 0..k-1 by
    true position, oldest first (padding ignored)           new_pos = w0 - k + r
    the n_s sink keys i = 0..n_s-1                          new_pos = w0 - k - n_s + i
So a decode query at P sees the window at distances 0..n_window-1, the retrieved keys right
before it (n_window .. n_window+k-1, in their order) and the sink before those. When the
retrieved keys are the whole host tier, every key lands on its true position: extrapolate
mode with a covering budget equals dense too. In prefill (extrapolate) a chunk attends to
itself causally, to the window and the remapped sink, and to the host keys per KV head
(at most `budget`) that score highest for the chunk's mean query (the retriever once built,
else exact scores over the host tier), widened into runs (below) and remapped the same way.
The feed's tail selects for itself: its last `prefill_tail` queries in blocks of
`prefill_tail_block` (so a question at the end of a prompt is not read through the chunk's
haystack), then its last query alone, as a decode step would, since its output predicts the
next token; the chunks before take the chunk's selection only (with the chunk's mean
alone, SmolLM2 missed a pass key at 3K tokens that it found this way).

Retrieved keys come as short runs (RetrievalConfig.neighbor_radius = r, widen_selection):
a search picks budget // (2r + 1) keys per KV head and each brings the host keys up to r
positions either side, so the budget is read as runs of consecutive text rather than
scattered single tokens. In a repetitive haystack the single-token top-k is thousands of
copies of one token, remapped into one consecutive stretch ("." after "." ...); as runs,
the same budget reads as coherent text. The picks are also capped (max_similar, by default
4 keys of a SimHash bucket of 8 bits in this mode; index/diversity.py) so that the runs are
not copies of one sentence. With runs, the cap and the tail blocks SmolLM2 read the pass key
in 5 of 5 prompts at 16K and 32K where it read none before (docs/extrapolation.md).

Search in extrapolate mode is position-free: the index gets keys with RoPE undone
(`index_keys`), and the query is rotated to sit `n_window` positions after them, so keys
are ranked by the logit they will have where they are read, not at their true distance
(scored at true distances, SmolLM2 at 12K tokens picked almost none of the pass key's
tokens: RoPE's decay favours near haystack; position-free, most of them in upper layers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from kvloft.kernels import reference
from kvloft.tiers.kvcache import LayerTiers


def remap_deltas(window_start: Tensor, sink_pos: Tensor, ret_pos: Tensor) -> tuple[Tensor, Tensor]:
    """Rotation deltas of the extrapolation mode (the mapping in the module docstring).

    window_start: 0-dim int64, w0, the true position of the oldest window key.
    sink_pos: [n_s] int64 true positions of the sink keys, in slot (= position) order.
    ret_pos: [H_kv, k] (per KV head) or [k] (shared) int64 true positions of the retrieved
        keys in any order, -1 = padding.
    Returns (sink_delta [H_kv, n_s] or [n_s], ret_delta shaped like ret_pos; 0 for padding),
    new_pos - true_pos, on ret_pos's device.
    """
    shared = ret_pos.dim() == 1
    rp = ret_pos[None] if shared else ret_pos  # [H, k]
    valid = rp >= 0
    k = valid.sum(-1, keepdim=True)  # [H, 1] keys kept per head
    order_key = torch.where(valid, rp, torch.iinfo(torch.int64).max)
    rank = order_key.argsort(dim=-1, stable=True).argsort(dim=-1)  # valid keys first, oldest first
    w0 = window_start.to(rp.device)
    ret_delta = torch.where(valid, w0 - k + rank - rp, 0)
    n_s = sink_pos.shape[0]
    slot = torch.arange(n_s, device=rp.device)
    sink_delta = (w0 - k - n_s + slot) - sink_pos.to(rp.device)[None]  # [H, n_s]
    return (sink_delta[0], ret_delta[0]) if shared else (sink_delta, ret_delta)


def widen_selection(ids: Tensor, radius: int, n_host: int) -> Tensor:
    """Selected host rows with their neighbours (extrapolation mode, RetrievalConfig.neighbor_radius).

    ids: [H_kv, m] or [m] int64 host rows, -1 = padding. Returns [H_kv, m * (2 * radius + 1)]
    (or [m * (2 * radius + 1)]): every row within `radius` of a selected row, each row once
    per head, ascending, -1 for padding, duplicates and rows outside [0, n_host).
    """
    off = torch.arange(-radius, radius + 1, device=ids.device)
    cand = ids[..., None] + off  # [..., m, 2r+1]
    ok = (ids[..., None] >= 0) & (cand >= 0) & (cand < n_host)
    rows = torch.where(ok, cand, -1).flatten(-2).sort(dim=-1).values  # [..., m * (2r+1)]
    dup = torch.zeros_like(rows, dtype=torch.bool)
    dup[..., 1:] = rows[..., 1:] == rows[..., :-1]
    return rows.masked_fill(dup, -1)


def neighbor_plan(budget: int, radius: int, n_host: int) -> tuple[int, int]:
    """(host keys to pick per KV head, radius to widen each by): budget // (2r + 1) keys
    with r = RetrievalConfig.neighbor_radius (smaller if the budget holds fewer than
    2r + 1 keys), so the widened selection reads at most `budget` keys; a budget
    covering the host tier picks all of it, unwidened."""
    if budget >= n_host:
        return budget, 0
    radius = min(radius, (budget - 1) // 2)
    return budget // (2 * radius + 1), radius


def position_free(k: Tensor, positions: Tensor, inv_freq: Tensor) -> Tensor:
    """Keys k [n, H_kv, D] stored at positions [n] with their RoPE undone (inv_freq [D/2] fp32)."""
    return reference.rotate_keys(k, -positions.to(k.device), inv_freq)


Rotate = Callable[[Tensor, Tensor], Tensor]  # (k [n, H, D], delta [n] / [H, n]) -> rotated k


def search_queries(q: Tensor, positions: Tensor, n_window: int, inv_freq: Tensor,
                   rotate: Rotate | None = None) -> Tensor:
    """Queries q [T, H_q, D] at positions [T] as seen from `n_window` positions after a
    position-free key: q'.k0 is the logit of the key read at distance n_window, where the
    retrieved keys start. Rank keys by it, not by their true distance: beyond the trained
    length the true-distance logit is noise, and RoPE's decay already favours near keys.
    rotate: rotate_keys' equal (e.g. RotationTable.rotate), default rotate_keys."""
    delta = n_window - positions.to(q.device)
    return rotate(q, delta) if rotate is not None else reference.rotate_keys(q, delta, inv_freq)


def window_start(tiers: LayerTiers, after: Tensor) -> Tensor:
    """w0: true position of the oldest ring key, or `after` (0-dim) if the ring is empty."""
    ring_pos = tiers.static_kv()[2][tiers.sink_fill :]
    return ring_pos.min() if ring_pos.numel() else after


def host_positions(tiers: LayerTiers, ids: Tensor) -> Tensor:
    """True positions of host rows ids ([H_kv, k] or [k], -1 = pad -> -1), on ids' device."""
    n = tiers.n_host
    chunk = tiers.host_pos.chunk_rows
    first = int(tiers.host_pos.chunks[0][0])
    last = int(tiers.host_pos.chunks[(n - 1) // chunk][(n - 1) % chunk])
    if last - first == n - 1:  # consecutive positions (a session's case): no gather, no sync
        pos = ids + first
    else:
        pos = tiers.host_pos.rows(ids.clamp_min(0).to("cpu")).to(ids.device)
    return torch.where(ids >= 0, pos, -1)


def remap_sink(tiers: LayerTiers, ids: Tensor, w0: Tensor, inv_freq: Tensor,
               device: torch.device, rotate: Rotate | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Sink keys rotated to their new positions, their values, and the retrieved keys' deltas.

    ids: [H_kv, k] / [k] host rows (may be empty); w0: 0-dim window start; inv_freq [D/2]
    fp32 on `device`. Returns (sink_k [n_s, H_kv, D], sink_v [n_s, H_kv, D], ret_delta
    shaped like ids, on `device`). rotate: as in search_queries.
    """
    sk, sv, spos = tiers.static_kv()
    ns = tiers.sink_fill
    ret_pos = host_positions(tiers, ids) if ids.numel() else ids.to(device)
    sink_delta, ret_delta = remap_deltas(w0, spos[:ns], ret_pos.to(device))
    sink_k = rotate(sk[:ns], sink_delta) if rotate is not None else reference.rotate_keys(sk[:ns], sink_delta, inv_freq)
    return sink_k, sv[:ns], ret_delta
