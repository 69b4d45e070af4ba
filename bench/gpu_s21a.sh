#!/usr/bin/env bash
# One device call after the table-row alignment fix (kernels/addresses.py) and the on-device
# rollback marks: the GPU tests of every kernel and path that reads rows through address tables
# (8-bit host rows included), then batch 1 at 32K and 128K through the segmented engine
# (@engine) and the whole step (@wholegraph) for dense, hip (keys on the host) and exact (keys
# on the device), with the torch profiler of one row. JSON and text under $OUT.
# Usage (GPU machine, repo root):  TOTAL=300 bash bench/gpu_s21a.sh
set -u
DEFAULT_TOTAL=300 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 120)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short -x \
  tests/kernels/test_sparse_decode.py tests/kernels/test_batched_decode.py tests/kernels/test_table_rows.py \
  tests/kernels/test_rowquant.py tests/kernels/test_scoring.py tests/index/test_hip_batch.py tests/index/test_exact_batch.py \
  tests/index/test_hip.py tests/runtime/test_whole_step.py tests/runtime/test_host_rows_gather.py \
  tests/runtime/test_host_dtype_session.py tests/scheduler/test_cache.py tests/runtime/test_rowspace.py \
  > "$O/gpu_tests.txt" 2>&1; tail -6 "$O/gpu_tests.txt"
M=dense,dense@engine,dense@wholegraph,hip:keys_on=host@engine,hip:keys_on=host@wholegraph,exact:keys_on=device@engine,exact:keys_on=device@wholegraph
timeout "$(left 150)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k --methods "$M" --batch 1 \
  --steps 16 --host-memory 100GiB --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -16
timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods hip:keys_on=host@wholegraph,exact:keys_on=device@wholegraph --batch 1 --steps 8 --profile 4 \
  --host-memory 100GiB --tag prof --out "$O" 2> "$O/prof_err.txt" | grep -v '^{' | tail -3
ls "$O"
