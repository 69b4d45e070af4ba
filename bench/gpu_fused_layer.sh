#!/usr/bin/env bash
# One device call for the GPU few-row layer route (kernels/gpu_layer.py): its GPU tests and the
# graphed-decode tests it now runs under; one Llama-3-8B layer's decode call, modules against
# the route, eager and graphed, T = 1, 4, 16 (bench/fused_layer.py: us, kernels per call,
# against the weight-read floor); then whole decode steps at 32K, dense, route off and on in
# turn (ABAB). JSON and text under $OUT, packed into one archive.
# Usage (GPU machine, repo root):  TOTAL=540 bash bench/gpu_fused_layer.sh
set -u
DEFAULT_TOTAL=540 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/runtime/test_gpu_route.py tests/runtime/test_graphs.py tests/runtime/test_model_hf.py \
  > "$O/gpu_tests.txt" 2>&1; tail -6 "$O/gpu_tests.txt"
for t in 1 4 16; do
  timeout "$(left 60)" python3 bench/fused_layer.py --rows "$t" --out "$O" 2>&1 | grep -v '^{'
done
i=0
for route in off auto off auto; do
  i=$((i + 1)); [ "$(left 60)" -lt 40 ] && { echo "step $i: no time left"; break; }
  timeout "$(left 90)" python3 bench/decode.py --presets llama3-8b --contexts 32k --methods dense --steps 16 \
    --gpu-route "$route" --tag "route-$i-$route" --out "$O" 2>&1 | grep -v '^{' | tail -1
  python3 -c "import json; r = json.load(open('$O/decode-route-$i-$route.json'))['rows'][0]; print('$i $route', {k: r.get(k) for k in ('ms_per_token', 'floor_ms', 'gpu_route', 'error')})" 2>&1 | tail -1
done
(cd "$O" && tar czf fused_layer.tgz ./*.json ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name fused_layer.tgz -delete)
ls "$O"
