"""The GPU route's kernels (RMSNorm, RoPE on q/k/v, silu*mul) compile for an H100 (sm_90)
without one: the interpreter runs Python, so a typing error only the compiler sees (a value
of two types out of a branch, a cast it cannot lower) would pass every CPU test. A fresh
process, as the interpreter is chosen at import; Triton's bundled ptxas makes the cubin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvloft.kernels.rms_norm import _rms_norm_kernel
from kvloft.kernels.rope_qkv import _rope_qkv_kernel
from kvloft.kernels.silu_mul import _silu_mul_kernel

p = "*bf16"
norm = {"x": p, "res": p, "w": p, "out": p, "res_out": p, "n_cols": "i32", "eps": "fp32", "stride_x": "i32",
        "stride_r": "i32", "HAS_RES": "constexpr", "BLOCK": "constexpr"}
rope = {"q_src": p, "k_src": p, "v_src": p, "cos": "*fp32", "sin": "*fp32", "q_out": p, "k_out": p, "v_out": p,
        "n_q": "i32", "n_kv": "i32", "stride_q": "i32", "stride_k": "i32", "stride_v": "i32",
        "HEAD_DIM": "constexpr", "BLOCK_D": "constexpr"}
silu = {"gate": p, "up": p, "out": p, "n_cols": "i32", "stride_g": "i32", "stride_u": "i32", "BLOCK": "constexpr"}
for fn, sig, const in ((_rms_norm_kernel, norm, {"HAS_RES": True, "BLOCK": 4096}),
                       (_rms_norm_kernel, norm, {"HAS_RES": False, "BLOCK": 4096}),
                       (_rope_qkv_kernel, rope, {"HEAD_DIM": 128, "BLOCK_D": 128}),
                       (_silu_mul_kernel, silu, {"BLOCK": 1024})):
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"], fn
print("compiled")
"""


@pytest.mark.slow  # ~15 s of compiling on a shared 2-core CPU
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2]) + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run([sys.executable, "-c", SCRIPT], check=False, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
