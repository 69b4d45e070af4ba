#!/usr/bin/env bash
# One device call for the 8-bit host tier on the GPU: the GPU tests of HiP over an 8-bit tier,
# rank="z" rows in the batched search and the whole step, and Session.fork; the Llama-3-8B shape
# at 1M with an fp8 host tier and int4 weights (hip keys_on=host: the row the host's OOM killer
# stopped before HiP read 8-bit tiers in place); then at 128K, each row its own process, the
# configuration 4-bit weights + fp8 host tier against bf16 + bf16 in both orders, with bf16
# weights + fp8 host between them (what the host tier alone gains); bf16 weights at 1M fp8 last,
# while time is left. JSON and text under $OUT, packed into one archive.
# Usage (GPU machine, repo root):  TOTAL=540 bash bench/gpu_s23a.sh
set -u
DEFAULT_TOTAL=540 . bench/gpu_budget.sh
# the few-row GPU layer route is new: its GPU tests first, and the rows below take the modules if they fail
KVLOFT_TEST_CUDA=1 timeout "$(left 60)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/runtime/test_gpu_route.py > "$O/gpu_route_tests.txt" 2>&1 && ROUTE=auto || ROUTE=off
tail -3 "$O/gpu_route_tests.txt"; echo "gpu route: $ROUTE"
KVLOFT_TEST_CUDA=1 timeout "$(left 110)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/index/test_hip_8bit.py tests/index/test_hip_zrank.py tests/runtime/test_fork.py \
  tests/runtime/test_host_dtype_session.py tests/runtime/test_whole_step.py -k "8bit or 8-bit or fp8 or int8 or z_ or zrank or fork or cuda" \
  > "$O/gpu_tests.txt" 2>&1; tail -6 "$O/gpu_tests.txt"
row() {  # TAG CONTEXT WEIGHTS HOST_DTYPE SECONDS
  [ "$(left "$5")" -lt 40 ] && { echo "$1: no time left"; return; }
  timeout "$(left "$5")" python3 bench/decode.py --presets llama3-8b --contexts "$2" --methods hip:keys_on=host \
    --weights "$3" $([ "$4" = bf16 ] || echo --host-dtype "$4") --steps 16 --gpu-route $ROUTE --host-memory 120GiB --tag "$1" --out "$O" 2>&1 | grep -v '^{' | tail -2
  python3 -c "import json; r = json.load(open('$O/decode-$1.json'))['rows'][0]; print('$1', {k: r.get(k) for k in ('ms_per_token', 'peak_gpu_gib', 'plan_host_gib', 'floor_ms', 'not_run', 'error')})" 2>&1 | tail -1
}
row l1m-int4-fp8 1m int4 fp8 120
i=0
for wh in bf16:bf16 int4:fp8 bf16:fp8 int4:fp8 bf16:bf16; do
  i=$((i + 1)); row "l128k-$i-${wh/:/-}" 128k "${wh%%:*}" "${wh##*:}" 60
done
row l1m-bf16-fp8 1m bf16 fp8 120
(cd "$O" && tar czf s23a.tgz ./*.json ./*.md ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s23a.tgz -delete)
ls "$O"
