#!/usr/bin/env bash
# One device call for the whole decode step as one CUDA graph (Engine(graphs="whole"),
# runtime/whole_step.py): its GPU tests and the engine's and graphs' first, then the decode
# benchmark at 32K and 128K, batch 1 and 8, segmented graphs against the whole step, each
# within a time limit and all within TOTAL seconds (default 540), JSON under $OUT.
# Usage (GPU machine, repo root):
#   TOTAL=540 bash bench/gpu_wholegraph.sh
# Rows: "dense" (a Session alone, segmented graphs), "dense@engine" (batch 1 through the Engine,
# segmented graphs), "dense@wholegraph" (one replay a step), "hip:keys_on=host@wholegraph" (not
# capturable: falls back to the segmented graphs, the row says why). Dense at 128K x 8 does not
# fit an 80 GB card (8 x 16 GiB of KV): that row reports not_run. Then exact with its keys on the
# device at 32K, batch 1 and 8: "exact:keys_on=device@engine" / "exact:keys_on=device" (the
# Engine's segmented graphs) against "exact:keys_on=device@wholegraph" (one replay a step: the
# key copy scored, top-k and both attention launches inside; runtime/whole_exact.py).
set -u
O=${OUT:-/tmp/out}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
end=$(( $(date +%s) + ${TOTAL:-540} ))
left() { local l=$(( end - $(date +%s) )); [ "$l" -lt 1 ] && l=1; [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
KVLOFT_TEST_CUDA=1 timeout "$(left 170)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/kernels/test_table_rows.py tests/runtime/test_whole_step.py tests/kernels/test_batched_decode.py \
  tests/kernels/test_sparse_decode.py tests/runtime/test_engine.py tests/runtime/test_graphs.py \
  > "$O/gpu_tests.txt" 2>&1; tail -15 "$O/gpu_tests.txt"
timeout "$(left 180)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k \
  --methods dense,dense@engine,dense@wholegraph,hip:keys_on=host@wholegraph --batch 1 --steps 24 \
  --host-memory 100GiB --tag wholegraph-b1 --out "$O" 2>&1 | grep -v '^{' | tail -12
timeout "$(left 130)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k \
  --methods dense,dense@wholegraph --batch 8 --steps 24 \
  --host-memory 100GiB --tag wholegraph-b8 --out "$O" 2>&1 | grep -v '^{' | tail -8
timeout "$(left 90)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods exact:keys_on=device@engine,exact:keys_on=device@wholegraph --batch 1 --steps 24 \
  --host-memory 100GiB --tag wholegraph-exact-b1 --out "$O" 2>&1 | grep -v '^{' | tail -6
timeout "$(left 120)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
  --methods exact:keys_on=device,exact:keys_on=device@wholegraph --batch 8 --steps 24 \
  --host-memory 100GiB --tag wholegraph-exact-b8 --out "$O" 2>&1 | grep -v '^{' | tail -6
ls "$O"
