#!/usr/bin/env bash
# One device call for the batched engine, quantized weights, the 8-bit host tier and prefill
# speed: the GPU tests of that code first, then short benchmarks, each within a time limit and
# all within TOTAL seconds (default 400), JSON under $OUT. Usage (GPU machine, repo root):
#   TOTAL=300 bash bench/gpu_engine.sh
set -u
O=${OUT:-/tmp/out}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
end=$(( $(date +%s) + ${TOTAL:-400} ))
left() { local l=$(( end - $(date +%s) )); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
KVLOFT_TEST_CUDA=1 timeout "$(left 110)" python3 -m pytest -q -p no:cacheprovider -m gpu tests/runtime/test_engine.py \
  tests/kernels/test_quant.py tests/runtime/test_quant_linear.py tests/kernels/test_rowquant.py \
  tests/runtime/test_host_dtype_session.py tests/runtime/test_row_fetch.py tests/runtime/test_rowspace.py \
  tests/scheduler/test_overlap.py tests/runtime/test_graphs.py 2>&1 | tail -6
timeout "$(left 70)" python3 bench/quant_speed.py --out "$O" 2>&1 | tail -16
for b in 1 8; do
  timeout "$(left 55)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods dense,hip:keys_on=host \
    --batch $b --steps 32 --host-memory 100GiB --tag b$b --out "$O" 2>&1 | grep -v '^{' | tail -6
done
timeout "$(left 80)" python3 bench/prefill_speed.py --lengths 8k,30k --chunks 512,4096,16384 --methods dense,exact \
  --repeats 2 --out "$O" 2>&1 | grep -v "^{" | tail -12
ls "$O"
