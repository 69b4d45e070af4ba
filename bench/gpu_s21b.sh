#!/usr/bin/env bash
# One device call for the whole step's graphs per HiP refresh pattern, and 4-bit weights at 1M:
# the whole step's GPU tests, batch 1 at 32K and 128K through the segmented engine (@engine)
# and the whole step (@wholegraph) for hip (keys on the host) and exact (keys on the device),
# then the Qwen2.5-7B-1M shape at 1M with int4 and bf16 weights (hip, keys on the host).
# JSON and text under $OUT. Usage (GPU machine, repo root):  TOTAL=230 bash bench/gpu_s21b.sh
set -u
DEFAULT_TOTAL=230 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 50)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short -x \
  tests/runtime/test_whole_step.py > "$O/gpu_tests.txt" 2>&1; tail -4 "$O/gpu_tests.txt"
M=hip:keys_on=host@engine,hip:keys_on=host@wholegraph,exact:keys_on=device@engine,dense
timeout "$(left 80)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k --methods "$M" --batch 1 \
  --steps 24 --host-memory 100GiB --tag b1 --out "$O" 2>&1 | grep -v '^{' | tail -10
for w in int4 bf16; do
  timeout "$(left 70)" python3 bench/decode.py --presets qwen2.5-7b-1m --contexts 1m --methods hip:keys_on=host \
    --weights $w --steps 16 --host-memory 100GiB --tag 1m-$w --out "$O" 2>&1 | grep -v '^{' | tail -2
done
ls "$O"
