#!/usr/bin/env bash
# One device call for HiP rows' stable selections on the device inside the whole step
# (runtime/whole_stable.py): the whole step's GPU tests, then batch 1 at 32K and 128K through the
# segmented engine (@engine) and the whole step (@wholegraph), hip with its keys on the host.
# JSON and text under $OUT. Usage (GPU machine, repo root):  TOTAL=230 bash bench/gpu_s22.sh
set -u
DEFAULT_TOTAL=230 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 70)" python3 -m pytest -q -p no:cacheprovider -m gpu -rf --tb=short -x \
  tests/runtime/test_whole_step.py > "$O/gpu_tests.txt" 2>&1; tail -4 "$O/gpu_tests.txt"
timeout "$(left 150)" python3 bench/decode.py --presets llama3-8b --contexts 32k,128k \
  --methods hip:keys_on=host@engine,hip:keys_on=host@wholegraph --batch 1 --steps 24 --host-memory 100GiB \
  --out "$O" 2>&1 | grep -v '^{' | tail -10
ls "$O"
