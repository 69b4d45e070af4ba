#!/usr/bin/env bash
# The shortest call that answers #23's speed target after the cached-rows fix: the 8-bit tier's
# cached-rows CUDA test, then Llama-3-8B shape at 128K, hip keys_on=host, bf16 + bf16 then
# int4 + fp8 (one process a row). Usage (GPU machine, repo root):  TOTAL=200 bash bench/gpu_s24c.sh
set -u
DEFAULT_TOTAL=200 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 40)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/runtime/test_rowspace.py -k 8bit > "$O/gpu_tests.txt" 2>&1; tail -2 "$O/gpu_tests.txt"
for wh in bf16:bf16 int4:fp8; do
  w=${wh%%:*} h=${wh##*:}
  timeout "$(left 75)" python3 bench/decode.py --presets llama3-8b --contexts 128k --methods hip:keys_on=host \
    --weights "$w" $([ "$h" = bf16 ] || echo --host-dtype "$h") --steps 16 --host-memory 120GiB \
    --tag "l128k-$w-$h" --out "$O" 2>&1 | grep "^| llama"
done
(cd "$O" && tar czf s24c.tgz ./*.json ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s24c.tgz -delete)
