#!/usr/bin/env bash
# One device call for the code merged since the last GPU run: the GPU tests of the flash prefill,
# the batched search, the K-quant storage and the whole step as one graph; then prefill against HF
# with the planned chunk, batch 1 with segmented graphs against one replay a step, batch 8 with the
# shared search against @rowsearch, HiP (keys on the host and on the device) through the segmented
# engine against the whole step (@wholegraph: its staged search inside the graph), and 8 x 128K
# with fp8 host tiers; each within a time limit and
# all within TOTAL seconds (default 540); JSON and text under $OUT, archived in one file.
# Usage (GPU machine, repo root):  TOTAL=540 bash bench/gpu_s20.sh
set -u
DEFAULT_TOTAL=540 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/kernels/test_flash.py tests/runtime/test_prefill_chunk.py tests/runtime/test_host_rows_gather.py \
  tests/runtime/test_offloaded_prefill.py tests/scheduler/test_budget.py tests/index/test_hip_batch.py \
  tests/index/test_exact_batch.py tests/runtime/test_engine.py tests/runtime/test_quant_gguf_k.py \
  tests/kernels/test_table_rows.py tests/runtime/test_whole_step.py tests/kernels/test_batched_decode.py \
  tests/kernels/test_sparse_decode.py tests/runtime/test_graphs.py tests/index/test_hip.py tests/kernels/test_scoring.py \
  > "$O/gpu_tests.txt" 2>&1; tail -25 "$O/gpu_tests.txt"
timeout "$(left 60)" python3 bench/prefill_speed.py --lengths 8k,30k --chunks 4096,auto --methods dense \
  --repeats 2 --out "$O" > "$O/prefill_speed.txt" 2>&1; grep -v '^{' "$O/prefill_speed.txt" | tail -8
timeout "$(left 170)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k \
  --methods dense,dense@engine,dense@wholegraph,hip:keys_on=host,hip:keys_on=host@engine,hip:keys_on=host@wholegraph,hip:keys_on=device@wholegraph,exact:keys_on=device@engine,exact:keys_on=device@wholegraph --batch 1 --steps 24 --host-memory 100GiB \
  --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -8
timeout "$(left 140)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods hip:keys_on=host,hip:keys_on=host@rowsearch,hip:keys_on=host@wholegraph,hip:keys_on=device,hip:keys_on=device@wholegraph,dense,dense@wholegraph,exact:keys_on=device,exact:keys_on=device@wholegraph --batch 8 --steps 24 \
  --host-memory 100GiB --tag b8 --out "$O" 2>&1 | grep -v '^{' | tail -6
timeout "$(left 90)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host \
  --host-dtype fp8 --batch 8 --steps 16 --host-memory 110GiB --tag b8-128k-fp8 --out "$O" 2>&1 | grep -v '^{' | tail -2
(cd "$O" && tar czf s20.tgz ./*.json ./*.md ./*.txt 2>/dev/null)
ls "$O"
