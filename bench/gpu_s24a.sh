#!/usr/bin/env bash
# One device call: the GPU tests of the decode route's fusions (down GEMM with the residual add,
# the final norm, prefill's fused GEMMs) and of the 8-bit tier's cached stable rows; one
# Llama-3-8B layer's graphed decode call (bench/fused_layer.py, T = 1); then the fp8 host tier
# against bf16 after the cached-rows fix (Llama-3-8B shape, hip keys_on=host, one process a row):
# int4 + fp8 against bf16 + bf16 at 128K, int4 + fp8 at 1M, the 128K pair in the other order,
# then bf16 + fp8 at 1M (rows past the call's time are skipped).
# Usage (GPU machine, repo root):  TOTAL=420 bash bench/gpu_s24a.sh
set -u
DEFAULT_TOTAL=420 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 80)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/runtime/test_gpu_route.py tests/runtime/test_rowspace.py tests/runtime/test_graphs.py \
  > "$O/gpu_tests.txt" 2>&1; tail -4 "$O/gpu_tests.txt"
timeout "$(left 50)" python3 bench/fused_layer.py --rows 1 --out "$O" 2>&1 | grep -v '^{'
row() {  # TAG CONTEXT WEIGHTS HOST_DTYPE SECONDS
  [ "$(left "$5")" -lt 40 ] && { echo "$1: no time left"; return; }
  timeout "$(left "$5")" python3 bench/decode.py --presets llama3-8b --contexts "$2" --methods hip:keys_on=host \
    --weights "$3" $([ "$4" = bf16 ] || echo --host-dtype "$4") --steps 16 --host-memory 120GiB --tag "$1" --out "$O" 2>&1 | grep "^| llama"
}
row l128k-1-bf16-bf16 128k bf16 bf16 60
row l128k-2-int4-fp8 128k int4 fp8 60
row l1m-int4-fp8 1m int4 fp8 110
row l128k-3-int4-fp8 128k int4 fp8 60
row l128k-4-bf16-bf16 128k bf16 bf16 60
row l1m-bf16-fp8 1m bf16 fp8 110  # bf16 host rows at 1M (128 GiB) do not fit this host
(cd "$O" && tar czf s24a.tgz ./*.json ./*.md ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s24a.tgz -delete)
