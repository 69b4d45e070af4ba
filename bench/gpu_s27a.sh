#!/usr/bin/env bash
# One device call: the one-launch key scan (index/key_scan.py) checked on CUDA and timed through
# exact and tokenselect at 128K against dense; HiP (plain and scan_stages=1/2, int4 + fp8: the batched
# search now reads the fp8 tier in place) in the engine's batched
# search against plain hip at batch 1 and 8; the Llama-3-8B 128K prefill with the cuDNN split.
# Usage (GPU machine, repo root):  TOTAL=540 bash bench/gpu_s27a.sh      carry [".whl"]
set -u
DEFAULT_TOTAL=540 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 150)" python3 -m pytest -q -m gpu tests/index/test_key_scan.py \
  tests/index/test_exact_batch.py tests/kernels/test_scoring.py tests/kernels/test_scoring_batched.py \
  tests/index/test_hip_batch.py tests/index/test_hip_8bit.py tests/kernels/test_flash.py 2>&1 | tail -4
timeout "$(left 90)" python3 bench/prefill_attention.py --out "$O" 2>&1 | tail -12
timeout "$(left 170)" python3 bench/decode.py --presets llama3-8b --contexts 128k \
  --methods dense,exact:keys_on=device,tokenselect,recycled --steps 16 --host-memory 100GiB --tag scan-128k \
  --out "$O" 2>&1 | grep -v '^{' | tail -6
for b in 1 8; do
  timeout "$(left 110)" python3 bench/decode.py --presets llama3-8b --contexts 128k \
    --methods hip:keys_on=host@engine,hip:keys_on=host:scan_stages=1/2@engine --weights int4 --host-dtype fp8 \
    --batch $b --steps 16 --host-memory 120GiB --tag scan-b$b --out "$O" 2>&1 | grep -v '^{' | tail -4
done
timeout "$(left 120)" python3 bench/decode.py --presets llama3-8b --contexts 128k --prefill 128k \
  --prefill-chunk auto --methods hip:keys_on=host --steps 4 --host-memory 100GiB --tag prefill-128k \
  --out "$O" 2>&1 | grep -v '^{' | tail -4
(cd "$O" && tar czf s27a.tgz ./*.json ./*.md 2>/dev/null; find . -maxdepth 1 -type f ! -name s27a.tgz -delete)
