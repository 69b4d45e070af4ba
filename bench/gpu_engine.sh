#!/usr/bin/env bash
# One device call for the batched engine (one attention launch per layer for the batch),
# int4 weights through tinygemm, the 8-bit host tier: the GPU tests of that code first, then
# short benchmarks, each within a time limit and all within TOTAL seconds (default 400), JSON
# under $OUT. Usage (GPU machine, repo root):
#   TOTAL=300 bash bench/gpu_engine.sh
set -u
DEFAULT_TOTAL=400 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf -x --tb=line \
  tests/kernels/test_tinygemm.py tests/kernels/test_batched_decode.py tests/runtime/test_engine.py \
  tests/kernels/test_quant.py tests/runtime/test_quant_linear.py tests/kernels/test_rowquant.py \
  tests/runtime/test_host_dtype_session.py tests/runtime/test_rowspace.py tests/scheduler/test_overlap.py \
  > "$O/gpu_tests.txt" 2>&1; tail -12 "$O/gpu_tests.txt"
timeout "$(left 60)" python3 bench/quant_speed.py --out "$O" > "$O/quant_speed.txt" 2>&1; tail -30 "$O/quant_speed.txt"
timeout "$(left 40)" python3 bench/gpu_kernels.py --skip checks,gather,decode,score,host > "$O/gpu_kernels_batch.txt" 2>&1
grep -v '^{' "$O/gpu_kernels_batch.txt" | tail -8
timeout "$(left 45)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods dense,hip:keys_on=host \
  --steps 32 --host-memory 100GiB --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -4
timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods dense,hip:keys_on=host,hip:keys_on=host@rowlaunch --batch 8 --steps 24 --host-memory 100GiB \
  --tag b8 --out "$O" 2>&1 | grep -v '^{' | tail -5
timeout "$(left 50)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods dense,hip:keys_on=host \
  --weights int4 --steps 32 --host-memory 100GiB --tag int4 --out "$O" 2>&1 | grep -v '^{' | tail -4
timeout "$(left 35)" python3 bench/graph_build.py --shape qwen2.5-0.5b-shape --keys 8192 16384 32768 --device cuda \
  --tag gpu > "$O/graph_build.txt" 2>&1; grep -v '^{' "$O/graph_build.txt" | tail -6; cp bench/results/graph_build_gpu.json "$O"/ 2>/dev/null
ls "$O"
