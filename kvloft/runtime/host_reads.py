"""Counting host reads of tensors: the calls that make the host wait for the device.

On CUDA each of these waits until every launch queued before it has run, so a decode step
that makes many of them cannot queue the next layer's work while the current one runs:

    item, tolist, bool/int/float/index of a tensor     the value itself
    cpu, to("cpu")                                     a copy to the host
    nonzero, argwhere, where(cond), masked_select,
    unique, unique_consecutive, x[mask], x[mask] = t,
    repeat_interleave without output_size              an output shape that depends on values

    with count_host_reads() as reads:
        session.step(token)
    reads.total, reads.sites   # Counter {"kvloft/index/hip.py:120 item": 4, ...}
    decode_reads([session], steps=16)   # the same over 16 greedy steps (Engine.generate for several)

Each read is charged to the innermost kvloft frame that made it (file:line, the kind of read);
reads made by other code (a caller outside kvloft, the Triton interpreter running a kernel)
are not counted, nor a read made inside another counted call (Tensor.unique calling
torch.unique counts once). On the CPU every tensor is on the host, so the count is of the calls
the code makes, the same code a CUDA run makes: a read of a tensor that lives on the host on
CUDA too (a host tier's rows, positions kept on the CPU) is counted though it waits for
nothing there. to(x) counts only where x names the CPU as a string ("cpu"): a device taken from
another tensor cannot be told apart on the CPU. Not counted either: waits that only CUDA code
paths make (an event's or stream's synchronize) and copies of host tensors to the device (on
CUDA a blocking copy from pageable memory waits for the stream too; on the CPU it is a no-op).
Patches the torch.Tensor class and torch functions for the duration of the block; not
thread-safe against other patchers.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["HostReads", "count_host_reads", "decode_reads"]

_ROOT = str(Path(__file__).resolve().parents[1])  # .../kvloft
_SELF = str(Path(__file__).resolve())
_REPO = str(Path(_ROOT).parent)
_TRITON = "/triton/"


@dataclass
class HostReads:
    """Reads counted while a count_host_reads block ran: sites["path:line kind"] -> calls."""

    sites: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sites.values())

    def top(self, n: int = 5) -> list[tuple[str, int]]:
        return self.sites.most_common(n)


def _always(*args: Any, **kwargs: Any) -> bool:
    return True


def _to_cpu(self: Tensor, *args: Any, **kwargs: Any) -> bool:
    targets = [*args, kwargs.get("device")]
    return any(isinstance(t, str) and t.startswith("cpu") for t in targets)


def _has_mask(index: Any) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool for p in parts)


def _mask_get(self: Tensor, index: Any) -> bool:
    return _has_mask(index)


def _mask_set(self: Tensor, index: Any, value: Any) -> bool:
    """x[mask] = scalar is a masked fill (no read); x[mask] = tensor of rows needs the count."""
    return _has_mask(index) and isinstance(value, Tensor) and value.dim() > 0


def _one_arg(*args: Any, **kwargs: Any) -> bool:
    return len(args) + len(kwargs) == 1


def _no_output_size(*args: Any, **kwargs: Any) -> bool:
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return isinstance(repeats, Tensor) and kwargs.get("output_size") is None


# (owner, attribute, when a call reads): the calls counted
_TENSOR_READS: tuple[tuple[str, Callable[..., bool]], ...] = (
    ("item", _always), ("tolist", _always), ("__bool__", _always), ("__int__", _always),
    ("__float__", _always), ("__index__", _always), ("cpu", _always), ("to", _to_cpu),
    ("nonzero", _always), ("argwhere", _always), ("masked_select", _always), ("unique", _always),
    ("unique_consecutive", _always), ("__getitem__", _mask_get), ("__setitem__", _mask_set),
    ("repeat_interleave", _no_output_size),
)
_TORCH_READS: tuple[tuple[str, Callable[..., bool]], ...] = (
    ("nonzero", _always), ("argwhere", _always), ("masked_select", _always), ("unique", _always),
    ("unique_consecutive", _always), ("where", _one_arg), ("repeat_interleave", _no_output_size),
)


class _Counting:
    """The patched calls' shared state: the counter, the files counted, a per-thread depth."""

    def __init__(self, reads: HostReads, root: str) -> None:
        self.reads, self.root = reads, root
        self.local = threading.local()

    def wrap(self, name: str, real: Callable[..., Any], reads: Callable[..., bool]) -> Callable[..., Any]:
        def counted(*args: Any, **kwargs: Any) -> Any:
            depth = getattr(self.local, "depth", 0)
            if depth == 0 and reads(*args, **kwargs):
                site = _site(sys._getframe(1), self.root)
                if site is not None:
                    self.reads.sites[f"{site} {name.strip('_')}"] += 1
            self.local.depth = depth + 1
            try:
                return real(*args, **kwargs)
            finally:
                self.local.depth = depth

        return counted


def _site(frame: Any, root: str) -> str | None:
    """path:line of the innermost frame under root (relative to the repository), or None where
    the read was made outside it or by the Triton interpreter on a kernel's behalf."""
    while frame is not None:
        name = frame.f_code.co_filename
        if _TRITON in name:
            return None
        if name.startswith(root) and name != _SELF:
            return f"{name[len(_REPO) + 1:] if name.startswith(_REPO) else name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


@contextmanager
def count_host_reads(root: str | Path | None = None) -> Iterator[HostReads]:
    """Count the host reads made inside the block by code under `root` (a directory; default the
    kvloft package), see the module docstring."""
    reads = HostReads()
    counting = _Counting(reads, _ROOT if root is None else str(Path(root).resolve()))
    undo: list[Callable[[], None]] = []
    for owner, table in ((torch.Tensor, _TENSOR_READS), (torch, _TORCH_READS)):
        for name, rule in table:
            own = name in vars(owner)
            real = getattr(owner, name)
            setattr(owner, name, counting.wrap(name, real, rule))
            undo.append((lambda o=owner, n=name, r=real: setattr(o, n, r)) if own
                        else (lambda o=owner, n=name: delattr(o, n)))
    try:
        yield reads
    finally:
        for restore in reversed(undo):
            restore()


def decode_reads(sessions: list[Any], steps: int) -> HostReads:
    """Host reads of `steps` greedy decode steps of fed sessions: one session through
    Session.generate, several together through kvloft.Engine.generate. One step runs first,
    uncounted: state made on first use (row spaces, caches) is not a per-step cost."""
    from kvloft.runtime.engine import Engine  # the engine imports the session, not this module

    for s in sessions:
        s.generate(max_new_tokens=1)
    with count_host_reads() as reads:
        if len(sessions) > 1:
            Engine(sessions[0].model, max_batch=len(sessions)).generate(sessions, max_new_tokens=steps)
        else:
            sessions[0].generate(max_new_tokens=steps)
    return reads
