"""kernels/addresses.py: the alignment claimed for table-read rows, and that the claim turns
the rows' reads into 16-byte vector loads in the compiled kernels (sm_90 PTX, no GPU needed)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kvloft.kernels.addresses import table_align


def test_table_align_claims_only_what_holds():
    rows = torch.zeros(64, 8, 128, dtype=torch.bfloat16)
    assert table_align(rows) == 8  # 16 bytes of bf16
    assert table_align(rows[3:]) == 8  # a view at a row boundary: 8 * 128 * 2 bytes per row
    assert table_align(rows.float()) == 4
    assert table_align(rows, rows.to(torch.uint8)) == 8  # the widest element decides
    odd = torch.zeros(64, 3, 59, dtype=torch.bfloat16)  # rows of 354 bytes
    assert table_align(odd) == 1
    assert table_align(rows, odd) == 1
    flat = torch.zeros(8 * 128 + 1, dtype=torch.bfloat16)
    shifted = flat[1:].view(1, 8, 128)  # starts 2 bytes into an allocation
    assert table_align(shifted) == 1


_PTX = """
import re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvloft.kernels.scoring_batched import _score_batched_kernel
from kvloft.kernels.split_kernel import _split_kernel

DIV = [["tt.divisibility", 16]]


def loads(fn, sig, const, aligned_args):
    attrs = {(fn.arg_names.index(n),): DIV for n in aligned_args}
    k = triton.compile(ASTSource(fn, sig | dict.fromkeys(const, "constexpr"), const, attrs),
                       target=GPUTarget("cuda", 90, 32))
    ptx = k.asm["ptx"]
    return ptx.count("ld.global.b16"), ptx.count("cp.async.cg.shared.global") + ptx.count("ld.global.v4")


score_sig = {"q": "*bf16", "table_ptr": "*i64", "k0_ptr": "*bf16", "meta_ptr": "*i64", "scores": "*fp32",
             "n_cols": "i32", "n_group": "i32", "group": "i32", "scale": "fp32", "stride_kn": "i32", "stride_kh": "i32"}
split_ptrs = {"q": "*bf16", "k": "*bf16", "v": "*bf16", "ids": "*i64", "k_table": "*i64", "v_table": "*i64",
              "ks_table": "*i64", "vs_table": "*i64", "rot_delta": "*i64", "inv_freq": "*fp32", "row_meta": "*i64",
              "out_part": "*fp32", "lse_part": "*fp32"}
split_ints = ["chunk_rows", "n_packed", "n_keys", "split_len", "group", "stride_qb", "stride_ib", "stride_qh",
              "stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_ih", "stride_dh"]
split_sig = split_ptrs | {n: "i32" for n in split_ints} | {"qk_scale": "fp32"}
strides = ["stride_kn", "stride_kh", "stride_vn", "stride_vh", "stride_qh", "stride_qb", "stride_ib"]
for align in (1, 8):
    print("score", align, *loads(_score_batched_kernel, score_sig,
          dict(REDUCE=1, HEAD_DIM=128, H_KV=8, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, ALIGN=align),
          ["q", "table_ptr", "k0_ptr", "meta_ptr", "scores", "stride_kn", "stride_kh"]))
    print("split", align, *loads(_split_kernel, split_sig,
          dict(HAS_IDS=True, ROTATE=False, CHUNKED=True, CODES=0, ROW_META=True, EVEN_SPLITS=True, HEAD_DIM=128,
               BLOCK_G=16, BLOCK_N=128, BLOCK_D=128, BLOCK_H=64, ALIGN=align),
          list(split_ptrs) + strides))
"""


def test_aligned_tables_compile_to_vector_loads():
    """With ALIGN = 8 (bf16 rows 16-byte aligned) the batched scoring and the split kernel
    read table rows with no 2-byte load left; with ALIGN = 1 they fall back to 2-byte loads
    (the claim is what makes the difference)."""
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this triton has no CUDA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _PTX], check=False, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = {(w[0], int(w[1])): (int(w[2]), int(w[3])) for w in (line.split() for line in done.stdout.splitlines())}
    for kernel in ("score", "split"):
        scalar, vector = got[(kernel, 8)]
        assert scalar == 0 and vector > 0, (kernel, got)
        assert got[(kernel, 1)][0] > 0, (kernel, got)
