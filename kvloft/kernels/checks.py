"""Argument checks shared by the Triton launchers (sparse_decode, merge, scoring).

Every check raises ValueError/TypeError with what was expected, what came, and the fix.
Nothing here queries CUDA at import time.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (decided once, at import)."""
    return type(kernel).__name__ == "InterpretedFunction"


def require_runnable(device: torch.device, kernel, op: str) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors through the interpreter only."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and is_interpreted(kernel):
        return
    raise ValueError(
        f"{op}: Triton kernels need CUDA tensors (got device {device}); on the CPU use "
        "kernels='reference' (or set TRITON_INTERPRET=1 before importing kvloft, for tests)"
    )


def require_float(name: str, x: Tensor, dtype: torch.dtype | None = None) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}; cast it first")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but q has {dtype}; cast both to one dtype")


def require_index(name: str, ids: Tensor) -> None:
    if ids.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {ids.dtype}; use ids.long()")


def require_dim(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")


def require_same_device(op: str, ref: Tensor, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.device != ref.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but q is on {ref.device}; move them to one device"
            )


def require_rows_device(op: str, q: Tensor, **rows: Tensor) -> None:
    """Row buffers live on q's device, or (CUDA only) in pinned host memory read zero-copy."""
    for name, t in rows.items():
        if t.device == q.device:
            continue
        if q.device.type == "cuda" and t.device.type == "cpu" and t.is_pinned():
            continue
        raise ValueError(
            f"{op}: {name} is on {t.device} but q is on {q.device}; move it to q's device "
            "(or, with q on CUDA, pin it: rows.pin_memory() is read zero-copy over PCIe)"
        )


def require_last_dim_contiguous(name: str, x: Tensor) -> None:
    # Copying a row buffer of a million tokens would cost more than the attention itself.
    if x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(
            f"{name} must have a contiguous last (head-dim) axis, got strides {x.stride()}; "
            "pass x.contiguous() (one copy of the buffer)"
        )


def require_batched_store(op: str, q: Tensor, k0: Tensor, kernel, codes: bool = False) -> None:
    """A launch over every row's chunked store: q [G, H_q, D] float; k0 one store chunk
    [chunk_rows, H_kv, D] float (codes: 8-bit codes, checked by the caller), last dim contiguous,
    with q's D and H_kv dividing H_q; `kernel` runnable on q's device."""
    require_dim("q", q, 3, "[G, H_q, D]")
    require_dim("store chunk", k0, 3, "[chunk_rows, H_kv, D]")
    require_float("q", q)
    if not codes:
        require_float("store chunk", k0)
    require_runnable(q.device, kernel, op)
    require_last_dim_contiguous("store chunk", k0)
    hkv, d = k0.shape[1], k0.shape[2]
    if q.shape[2] != d or q.shape[1] % hkv:
        raise ValueError(f"{op}: q must be [G, H_q, {d}] with H_q a multiple of {hkv}, got {tuple(q.shape)}")


def require_row_meta(op: str, meta: Tensor, fields: tuple[str, ...], q: Tensor) -> None:
    """meta [len(fields), G] int64 on q's device (q [G, H_q, D]): each row's fields, one column a row."""
    g = q.shape[0]
    if meta.shape != (len(fields), g) or meta.dtype != torch.int64 or meta.device != q.device:
        raise ValueError(f"{op}: meta must be [{len(fields)}, {g}] int64 on {q.device} ({', '.join(fields)}), "
                         f"got {tuple(meta.shape)} {meta.dtype} on {meta.device}")


def check_ids_range(op: str, ids: Tensor, n_rows: int, allow_padding: bool) -> None:
    """One min/max over the ids. On CUDA this waits for the device (a sync, ~10 us + the
    queue), so launchers run it by default only for ids on the CPU."""
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    low_ok = -1 if allow_padding else 0
    if lo < low_ok or hi >= n_rows:
        pad = " (-1 marks padding)" if allow_padding else ""
        raise ValueError(
            f"{op}: ids must lie in [{low_ok}, {n_rows - 1}]{pad}, got min {lo}, max {hi}; "
            "drop or clamp the bad ids"
        )


def want_id_check(check_ids: bool | None, ids: Tensor) -> bool:
    """None -> check when the ids are on the CPU (no device sync); True/False force it."""
    return ids.device.type == "cpu" if check_ids is None else bool(check_ids)


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


@functools.lru_cache(maxsize=8)
def sm_count(device_index: int) -> int:
    """Multiprocessors of a CUDA device (queried on first use, then cached)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def address_table(chunks, device: torch.device) -> Tensor:
    """[n_chunks] int64 base addresses of the chunks (tensors of one row layout, or views
    into one) on `device` (copied down without a wait), for kernels that find a row's chunk
    through them and read it in place."""
    return torch.tensor([c.data_ptr() for c in chunks], dtype=torch.int64).to(device, non_blocking=True)
