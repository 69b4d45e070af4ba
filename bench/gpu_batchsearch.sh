#!/usr/bin/env bash
# One device call for the batched search (HiP's and exact's rows of a batched step searched
# together: index/hip_batch.py, kernels/hip_batched.py, kernels/scoring_batched.py,
# runtime/batch_search.py): its GPU tests first,
# then batch 1 and batch 8 rows with the shared search, the per-row search (@rowsearch) and the
# per-row attention launch (@rowlaunch), each within a time limit and all within TOTAL seconds
# (default 560), JSON under $OUT. Usage (GPU machine, repo root):
#   TOTAL=560 bash bench/gpu_batchsearch.sh
set -u
DEFAULT_TOTAL=560 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf -x --tb=line \
  tests/index/test_hip_batch.py tests/index/test_exact_batch.py tests/index/test_hip.py tests/runtime/test_engine.py \
  > "$O/gpu_tests.txt" 2>&1; tail -12 "$O/gpu_tests.txt"
timeout "$(left 50)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods hip:keys_on=host \
  --steps 32 --host-memory 100GiB --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -3
timeout "$(left 150)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k \
  --methods hip:keys_on=host,hip:keys_on=host@rowsearch --batch 8 --steps 32 --host-memory 100GiB \
  --tag b8 --out "$O" 2>&1 | grep -v '^{' | tail -6
timeout "$(left 80)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods hip:keys_on=host@rowlaunch,dense --batch 8 --steps 24 --host-memory 100GiB \
  --tag b8launch --out "$O" 2>&1 | grep -v '^{' | tail -4
timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods exact,exact@rowsearch \
  --batch 8 --steps 24 --gpu-budget 75GiB --host-memory 100GiB --tag b8exact --out "$O" 2>&1 | grep -v '^{' | tail -4
timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods hip:keys_on=host \
  --batch 8 --steps 8 --cprofile 4 --host-memory 100GiB --tag b8prof --out "$O" > "$O/b8prof.txt" 2>&1
grep -v '^{' "$O/b8prof.txt" | head -60 | tail -45
ls "$O"
