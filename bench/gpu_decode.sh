#!/usr/bin/env bash
# GPU call(s) for the scheduler figures: the GPU tests of the newer kernels, then
# bench/decode.py. Usage (GPU machine, repo root):
#   bash bench/gpu_decode.sh llama   # tests + Llama-3-8B shape at 32K-1M
#   bash bench/gpu_decode.sh qwen    # Qwen2.5-7B-1M shape at 128K and 1M, and real prefill rows
#   bash bench/gpu_decode.sh fp8     # HiP keys_on=host over an fp8 host tier: its GPU tests, then
#                                    # Llama-3-8B int4 at 128K and 1M, planned against measured host memory
# HOST_MEMORY: the host memory to plan with (VMs that grow their memory on use report less at start).
set -u
O=${OUT:-bench/results}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
H=${HOST_MEMORY:-240GiB}
case "${1:?llama or qwen}" in
llama)
  KVLOFT_TEST_CUDA=1 timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_flash.py \
    tests/index/test_hip.py tests/runtime/test_offloaded_prefill.py tests/scheduler -k "cuda or host_resident or gpu" 2>&1 | tail -4
  timeout "${T:-420}" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k,512k,1m \
    --methods dense,exact,tokenselect,recycled,hip,hip:keys_on=host,hip@overlap --host-memory "$H" \
    --time-limit "${LIMIT:-360}" --tag h200-llama3-8b 2>&1 | grep -v '^{' ;;
qwen)
  timeout "${T:-420}" python3 bench/decode.py --presets qwen2.5-7b-1m --contexts 128k,1m \
    --methods dense,hip,hip:keys_on=host --prefill 32k,128k --prefill-method hip --host-memory "$H" \
    --time-limit "${LIMIT:-300}" --tag h200-qwen2.5-7b-1m 2>&1 | grep -v '^{'
  timeout 200 python3 bench/decode.py --presets llama3-8b --contexts 1k --methods dense --steps 3 \
    --prefill 32k,128k --prefill-method hip --host-memory "$H" --tag h200-llama3-8b-prefill 2>&1 | grep -v '^{' ;;
fp8)
  KVLOFT_TEST_CUDA=1 timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/index/test_hip_8bit.py \
    tests/index/test_hip.py tests/runtime/test_host_dtype_session.py -k "gpu or cuda or host_resident" 2>&1 | tail -4
  # --host-memory: MemAvailable unless HOST_MEMORY is set (a 125 GB H100 host must not plan with 240 GiB)
  timeout "${T:-500}" python3 bench/decode.py --presets llama3-8b --contexts 128k,1m --methods hip:keys_on=host \
    --weights int4 --host-dtype fp8 ${HOST_MEMORY:+--host-memory "$HOST_MEMORY"} --time-limit "${LIMIT:-420}" \
    --tag h100-llama3-8b-int4-fp8-hiphost 2>&1 | grep -v '^{'
  python3 -c "import json, sys; rows = json.load(open('$O/decode-h100-llama3-8b-int4-fp8-hiphost.json'))['rows']
for r in rows: print(r['context'], r['method'], 'plan host GiB', r.get('plan_host_gib'), 'peak host GiB',
                     r.get('peak_host_gib'), r.get('not_run') or r.get('error') or '')
sys.exit(any('ms_per_token' in r and r['peak_host_gib'] > 1.1 * r['plan_host_gib'] + 8 for r in rows))" ;;
esac
