"""8-bit rows with a scale per row and head: the host tier's packed format (CacheConfig.host_dtype).

A row [..., D] (one token's keys or values of one KV head) is stored as D one-byte codes and
one fp32 scale, s = absmax(row) / QMAX:

  "int8"  codes = round(x / s) in [-127, 127] (int8), x ~ codes * s; error <= s / 2 = absmax / 254
  "fp8"   codes = fp8 e4m3 (float8_e4m3fn, kept as its uint8 bits) of x / s in [-448, 448],
          x ~ codes * s; relative error <= 2^-4 (3 mantissa bits), plus s * 2^-10 near zero
          (e4m3 subnormals)

With D = 128 a bf16 row of 256 bytes becomes 132 (51.6%); D = 64: 68 of 128 (53%). Kernels
read the codes and scales and dequantize in registers (sparse_decode.py, CODES), so the PCIe
bytes per selected row are halved. `PackedChunks` is the read view of a packed chunk list:
a sequence of dequantized chunks (for code that reads chunks as tensors) that also hands the
codes and scales to the kernels that read them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["HOST_DTYPES", "PackedChunks", "code_dtype", "dequantize_rows", "packed_row_bytes", "quantize_rows"]

HOST_DTYPES = ("fp8", "int8")
SCALE_DTYPE = torch.float32
_QMAX = {"int8": 127.0, "fp8": 448.0}
# kernels/sparse_decode.py's CODES flag per format (0: rows in the model dtype)
CODES_FLAG = {None: 0, "int8": 1, "fp8": 2}


def check_host_dtype(kind) -> None:
    """ValueError naming the choices (and the fix) unless kind is None, "fp8" or "int8"."""
    if kind is not None and kind not in HOST_DTYPES:
        raise ValueError(f"host_dtype must be None (the model dtype), 'fp8' or 'int8', got {kind!r}; "
                         "pass CacheConfig(host_dtype='fp8') or 'int8' for 8-bit host rows")
    if kind == "fp8" and not hasattr(torch, "float8_e4m3fn"):
        raise ValueError(f"host_dtype='fp8' needs torch.float8_e4m3fn (torch >= 2.1), not in torch "
                         f"{torch.__version__}; upgrade torch or pass host_dtype='int8'")


def code_dtype(kind: str) -> torch.dtype:
    """Storage dtype of the codes: int8, or uint8 holding fp8 e4m3 bits."""
    return torch.int8 if kind == "int8" else torch.uint8


def packed_row_bytes(row_shape: tuple[int, ...]) -> int:
    """Bytes of one packed row [*heads, D]: a byte per element and an fp32 scale per head."""
    n = 1
    for s in row_shape:
        n *= s
    return n + (n // row_shape[-1]) * SCALE_DTYPE.itemsize if row_shape else 1


def quantize_rows(x: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """x [..., D] float -> (codes [..., D] code_dtype(kind), scales [...] fp32), same device."""
    xf = x.float()
    scale = xf.abs().amax(-1) / _QMAX[kind]  # [...]
    y = xf / torch.where(scale > 0, scale, 1.0)[..., None]  # all-zero rows: codes 0, scale 0
    if kind == "int8":
        return y.round_().clamp_(-127, 127).to(torch.int8), scale
    return y.clamp_(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8), scale


def dequantize_rows(codes: Tensor, scales: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """(codes [..., D], scales [...]) -> rows [..., D] in `dtype` (fp32 product, one rounding),
    as the kernels compute them."""
    c = codes.float() if kind == "int8" else codes.view(torch.float8_e4m3fn).float()
    return (c * scales.float()[..., None]).to(dtype)


class PackedChunks(Sequence):
    """The chunks of a packed row store, read as tensors: item i is chunk i dequantized
    ([R, *row_shape] in `dtype`, a fresh copy; only the store's first n_rows rows are
    dequantized, the rest are zeros). With pinned codes and a CUDA `device`, the copy is made there
    (the filled codes and scales cross PCIe, then dequantize on the device): a pinned host
    copy read by a kernel could be handed to the next allocation while the kernel still
    reads it, a device copy is freed in stream order. Kernels that know the format read
    `codes` / `scales` instead (no copy):
    sparse_decode.gather_attend_chunks does when handed this sequence.

    codes: [R, H, D] tensors; scales: [R, H] fp32 tensors, one per chunk; scale_table(device):
    their base addresses (the store's cached table)."""

    def __init__(self, codes: list[Tensor], scales: list[Tensor], kind: str, dtype: torch.dtype,
                 pin: bool, scale_table: Callable[[torch.device], Tensor], n_rows: int | None = None,
                 device: torch.device | None = None) -> None:
        self.codes, self.scales, self.kind, self.dtype = codes, scales, kind, dtype
        self.device = device if pin and device is not None and device.type == "cuda" else None
        self.n_rows = sum(c.shape[0] for c in codes) if n_rows is None else n_rows
        self.pin = pin
        self.scale_table = scale_table

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        c, s = self.codes[i], self.scales[i]
        i = i % len(self)
        m = max(0, min(c.shape[0], self.n_rows - i * c.shape[0]))  # filled rows (a chunk's first m)
        c, s = c[:m], s[:m]
        if self.device is not None:
            c, s = c.to(self.device, non_blocking=True), s.to(self.device, non_blocking=True)
        out = torch.empty((self.codes[i].shape[0], *c.shape[1:]), dtype=self.dtype, device=c.device)
        out[:m] = dequantize_rows(c, s, self.kind, self.dtype)
        out[m:] = 0  # rows not filled yet: zeros (never NaN bits), as cheap as a memset
        return out

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))
