"""Files that survive a crash: written, fsynced, hashed (runtime/persist.py writes saves with them)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["fsync_dir", "fsync_file", "sha256", "write_durable", "write_safetensors"]


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """Write `tensors` to `path` and fsync it; returns {"bytes", "sha256"} of the file."""
    from safetensors.torch import save_file

    save_file({k: t.contiguous() for k, t in tensors.items()}, str(path), metadata=metadata)
    fsync_file(path)
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows cannot open a directory; renames are durable there
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
