#!/usr/bin/env bash
# The fp8 host tier's rows again after the fix of its cached stable rows (runtime/rowspace.py
# gathered and dequantized them on the host each refresh: 88-152 ms a step at 128K in
# gpu_s23a.sh): Llama-3-8B shape, hip keys_on=host, each row its own process, int4 + fp8 against
# bf16 + bf16 in both orders at 128K, then int4 + fp8 against bf16 + fp8 at 1M. Usage: TOTAL=330 bash bench/gpu_s23d.sh
set -u
DEFAULT_TOTAL=330 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 40)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/runtime/test_rowspace.py -k 8bit > "$O/gpu_tests.txt" 2>&1; tail -3 "$O/gpu_tests.txt"
row() {  # TAG CONTEXT WEIGHTS HOST_DTYPE SECONDS
  [ "$(left "$5")" -lt 40 ] && { echo "$1: no time left"; return; }
  timeout "$(left "$5")" python3 bench/decode.py --presets llama3-8b --contexts "$2" --methods hip:keys_on=host \
    --weights "$3" $([ "$4" = bf16 ] || echo --host-dtype "$4") --steps 16 --host-memory 120GiB --tag "$1" --out "$O" 2>&1 | grep "^| llama"
}
i=0
for wh in bf16:bf16 int4:fp8 int4:fp8 bf16:bf16; do
  i=$((i + 1)); row "l128k-$i-${wh/:/-}" 128k "${wh%%:*}" "${wh##*:}" 60
done
row l1m-int4-fp8 1m int4 fp8 110
row l1m-bf16-fp8 1m bf16 fp8 110  # bf16 host rows at 1M (128 GiB) do not fit this host
(cd "$O" && tar czf s23d.tgz ./*.json ./*.md ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s23d.tgz -delete)
