#!/usr/bin/env bash
# One device call for 4-bit weights against bf16 at batch 1, hip with its keys on the host, each
# row its own process, in both orders (the last stop's single int4-first pair at 1M disagreed with
# the model part's own timing): Llama-3-8B shape at 128K (bf16, int4, int4, bf16), then the
# Qwen2.5-7B-1M shape at 1M (bf16, int4, then int4, bf16 while time is left). Also the rank=z
# search's GPU tests. JSON and text under $OUT. Usage (GPU machine, repo root):
#   TOTAL=300 bash bench/gpu_s22b.sh
set -u
DEFAULT_TOTAL=300 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 40)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/index/test_hip_zrank.py > "$O/gpu_tests_zrank.txt" 2>&1; tail -3 "$O/gpu_tests_zrank.txt"
i=0
for w in bf16 int4 int4 bf16; do
  i=$((i + 1))
  timeout "$(left 60)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host \
    --weights $w --steps 16 --host-memory 100GiB --tag 128k-$i-$w --out "$O" 2>&1 | grep -v '^{' | tail -2
done
i=0
for w in bf16 int4 int4 bf16; do
  i=$((i + 1))
  [ "$(left 75)" -lt 75 ] && break
  timeout "$(left 75)" python3 bench/decode.py --presets qwen2.5-7b-1m --contexts 1m --methods hip:keys_on=host \
    --weights $w --steps 16 --host-memory 100GiB --tag 1m-$i-$w --out "$O" 2>&1 | grep -v '^{' | tail -2
done
ls "$O"
