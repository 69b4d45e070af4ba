#!/usr/bin/env bash
# One device call for this stop's merged work: the GPU tests of HiP over an 8-bit host tier, of
# rank="z" rows in the batched search and the whole step, and of Session.fork; then the Llama-3-8B
# shape at 1M with an fp8 host tier (int4 and bf16 weights, hip keys_on=host: the run that the
# host's OOM killer stopped before HiP read 8-bit tiers in place), and hip against hip:rank=z at
# 32K through the engine (batch 1 and 8). JSON and text under $OUT, packed into one archive.
# Usage (GPU machine, repo root):  TOTAL=480 bash bench/gpu_s22c.sh
# (WEIGHTS="int4" BATCHES="1" for a short call: the 1M row with int4 weights, rank=z at batch 1)
set -u
DEFAULT_TOTAL=480 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 110)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short \
  tests/index/test_hip_8bit.py tests/index/test_hip_zrank.py tests/runtime/test_fork.py \
  tests/runtime/test_host_dtype_session.py tests/runtime/test_whole_step.py -k "8bit or 8-bit or fp8 or int8 or z_ or zrank or fork or cuda" \
  > "$O/gpu_tests.txt" 2>&1; tail -6 "$O/gpu_tests.txt"
for w in ${WEIGHTS:-int4 bf16}; do
  timeout "$(left 100)" python3 bench/decode.py --presets llama3-8b --contexts 1m --methods hip:keys_on=host \
    --weights $w --host-dtype fp8 --steps 16 --host-memory 120GiB --tag l1m-fp8-$w --out "$O" 2>&1 | grep -v '^{' | tail -2
  python3 -c "import json; r = json.load(open('$O/decode-l1m-fp8-$w.json'))['rows'][0]; print({k: r.get(k) for k in ('ms_per_token', 'peak_gpu_gib', 'plan_host_gib', 'peak_host_gib', 'host_gib', 'not_run', 'error')})" 2>&1 | tail -1
done
for b in ${BATCHES:-1 8}; do
  timeout "$(left 80)" python3 bench/decode.py --presets llama3-8b --contexts 32k \
    --methods hip:keys_on=host@engine,hip:keys_on=host:rank=z@engine --batch $b --steps 16 --host-memory 100GiB \
    --tag z32k-b$b --out "$O" 2>&1 | grep -v '^{' | tail -3
done
(cd "$O" && tar czf s22c.tgz ./*.json ./*.md ./*.txt 2>/dev/null && find . -maxdepth 1 -type f ! -name s22c.tgz -delete)
ls "$O"
