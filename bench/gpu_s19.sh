#!/usr/bin/env bash
# One device call for the flash prefill route with the planned chunk, the batched search and
# 8 sessions x 128K with an 8-bit host tier: the GPU tests of that code first, then short
# benchmarks, each within a time limit and all within TOTAL seconds (default 420); JSON and
# text under $OUT, archived in one file. Usage (GPU machine, repo root):
#   TOTAL=420 bash bench/gpu_s19.sh
set -u
DEFAULT_TOTAL=420 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 130)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=line \
  tests/kernels/test_flash.py tests/runtime/test_prefill_chunk.py tests/runtime/test_host_rows_gather.py \
  tests/runtime/test_offloaded_prefill.py tests/scheduler/test_budget.py tests/index/test_hip_batch.py \
  tests/index/test_exact_batch.py tests/runtime/test_engine.py tests/runtime/test_quant_gguf_k.py \
  > "$O/gpu_tests.txt" 2>&1; tail -8 "$O/gpu_tests.txt"
timeout "$(left 80)" python3 bench/prefill_speed.py --lengths 8k,30k --chunks 4096,16384,auto --methods dense,exact \
  --repeats 2 --out "$O" > "$O/prefill_speed.txt" 2>&1; grep -v '^{' "$O/prefill_speed.txt" | tail -12
timeout "$(left 45)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods hip:keys_on=host \
  --steps 32 --host-memory 100GiB --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -2
timeout "$(left 70)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods hip:keys_on=host,hip:keys_on=host@rowsearch --batch 8 --steps 24 --host-memory 100GiB \
  --tag b8 --out "$O" 2>&1 | grep -v '^{' | tail -3
timeout "$(left 90)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host \
  --host-dtype fp8 --batch 8 --steps 16 --host-memory 110GiB --tag b8-128k-fp8 --out "$O" 2>&1 | grep -v '^{' | tail -2
timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host \
  --prefill 128k --prefill-method hip:keys_on=host --prefill-chunk auto --steps 8 --host-memory 100GiB \
  --tag prefill-128k --out "$O" 2>&1 | grep -v '^{' | tail -3
(cd "$O" && tar czf s19.tgz ./*.json ./*.md ./*.txt 2>/dev/null)
ls "$O"
