"""Streaming safetensors files one tensor at a time, both ways, in bounded host memory.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape,
data_offsets), then raw bytes. Reading uses plain file reads into a tensor we own, not
`safe_open`: its tensors are views of a memory map whose touched pages count in the
process's RSS until the map closes (measured: a 256 MB file read through one `safe_open`
added 256 MB to the peak). Writing streams tensors to disk one by one, where
`safetensors.torch.save_file` first copies them all to bytes. Files stay readable by the
safetensors library (the tests check both ways).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def header(path: Path) -> tuple[dict[str, dict], int]:
    """(name -> {dtype, shape, data_offsets}, byte where the data starts); every tensor checked
    to lie inside the file, so a truncated file fails here, naming the tensor."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {n}, file size {size}); "
                             "download it again")
        try:
            meta = json.loads(f.read(n))
        except ValueError as e:
            raise ValueError(f"{path}: its safetensors header is not valid JSON ({e}); download it again") from None
    meta.pop("__metadata__", None)
    start = 8 + n
    for name, info in meta.items():
        if info.get("dtype") not in _DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info.get('dtype')!r}; "
                             f"kvloft reads {', '.join(_DTYPES)}")
        end = start + info["data_offsets"][1]
        if end > size:
            raise ValueError(f"{path}: file ends at byte {size}, tensor {name} needs {end - size} more bytes; "
                             "the file is truncated: download it again")
    return meta, start


def keys(path: Path) -> list[str]:
    """The tensor names of one file (reads only its header)."""
    return list(header(path)[0])


def read(path: Path, dtype: torch.dtype | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) one at a time, each a fresh CPU tensor in `dtype` (None: the file's).

    A tensor to convert is read into one staging buffer reused for the whole file: a fresh
    temporary per tensor leaves the allocator's heap fragmented (measured: +2x the weights'
    bytes when reading fp32 files as bf16).
    """
    meta, start = header(path)
    staging = torch.empty(0, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        for name, info in meta.items():
            lo, hi = info["data_offsets"]
            stored = _DTYPES[info["dtype"]]
            n = hi - lo
            numel = 1
            for d in info["shape"]:
                numel *= d
            if numel * stored.itemsize != n:
                raise ValueError(f"{path}: tensor {name} holds {n} bytes, its shape {info['shape']} "
                                 f"needs {numel * stored.itemsize}; the file is corrupt")
            same = dtype in (None, stored)
            if not same and staging.numel() < n:
                staging = torch.empty(n, dtype=torch.uint8)
            buf = torch.empty(n, dtype=torch.uint8) if same else staging[:n]
            f.seek(start + lo)
            if f.readinto(memoryview(buf.numpy())) != n:
                raise ValueError(f"{path}: file ends inside tensor {name}; download it again")
            t = buf.view(stored).reshape(info["shape"])
            yield name, t if same else t.to(dtype)


def write(path: Path, tensors: Iterable[tuple[str, Tensor]]) -> None:
    """Write named tensors (fp32/fp16/bf16, any device) to `path` directly (not atomic)."""
    items = [(name, t) for name, t in tensors]
    header, offset = {}, 0
    for name, t in items:
        if t.dtype not in _DTYPE_NAMES:
            raise TypeError(f"tensor {name} has dtype {t.dtype}; expected one of {list(_DTYPE_NAMES)}")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, t in items:
            f.write(memoryview(t.detach().contiguous().cpu().view(torch.uint8).reshape(-1).numpy()))
        f.flush()
        os.fsync(f.fileno())
