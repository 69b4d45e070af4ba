"""Row spans of selected blocks widened by a halo, taken in rank order within a token share
(ActQKV's selection, index/actqkv.py): plain host integers, no device reads."""

from __future__ import annotations

__all__ = ["halo_spans"]


def halo_spans(ranked: list[int], block: int, halo: int, tokens: int, n_rows: int) -> list[tuple[int, int]]:
    """Row spans [lo, hi) covered by the blocks `ranked` (best first), each widened by `halo`
    rows on both sides and clipped to [0, n_rows), taken in rank order while the rows of their
    union number at most `tokens` (the first block always). Returns the union as sorted,
    disjoint spans. A span meets only the spans of blocks within ceil(2 * halo / block)."""
    reach = -(-2 * halo // block) if halo else 0
    taken: dict[int, tuple[int, int]] = {}
    count = 0
    for b in ranked:
        lo, hi = max(b * block - halo, 0), min((b + 1) * block + halo, n_rows)
        near = sorted(taken[c] for c in range(b - reach, b + reach + 1) if c in taken)
        new = hi - lo - _covered(near, lo, hi)
        if count and count + new > tokens:
            break
        taken[b] = (lo, hi)
        count += new
    return _union(sorted(taken.values()))


def _covered(spans: list[tuple[int, int]], lo: int, hi: int) -> int:
    """Rows of [lo, hi) inside the union of `spans` (sorted by start)."""
    return sum(b - a for a, b in _union([(max(a, lo), min(b, hi)) for a, b in spans if a < hi and b > lo]))


def _union(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans [lo, hi) merged where they overlap or touch."""
    out: list[tuple[int, int]] = []
    for a, b in spans:
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out
