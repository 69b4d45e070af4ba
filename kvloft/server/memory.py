"""Give freed heap memory back to the operating system after sessions are dropped.

A session's host tier is many tensors allocated through malloc; when the session is
deleted, evicted or was a throwaway one, glibc keeps the freed pages in its arenas (one per
worker thread that touched them), so the server's RSS stays at its peak. malloc_trim(0)
returns them. It walks the heap (milliseconds for a GB), so it runs at most once per
`min_interval_s`, in the caller's worker thread. A no-op where the C library has no malloc_trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

_lock = threading.Lock()
_last = 0.0


def _load_trim():
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


_trim = _load_trim()


def trim(min_interval_s: float = 1.0) -> bool:
    """Return freed heap pages to the OS (at most once per interval). True if it ran."""
    global _last
    if _trim is None:
        return False
    with _lock:
        now = time.monotonic()
        if now - _last < min_interval_s:
            return False
        _last = now
    _trim(0)
    return True
