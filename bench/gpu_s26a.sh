#!/usr/bin/env bash
# One device call: the cuDNN split of a prefill chunk (kernels/flash.py) checked and
# timed, the prefill against HF on the 32K model's shape, then the hip keys_on=host row on the
# snapshot of commit 39a4562 and on HEAD (bench/gpu_bisect.sh; needs `bash bench/bisect_snapshots.sh s22=39a4562`).
# Usage (GPU machine, repo root):  TOTAL=480 bash bench/gpu_s26a.sh      carry [".bisect", ".whl"]
set -u
DEFAULT_TOTAL=480 . bench/gpu_budget.sh
KVLOFT_TEST_CUDA=1 timeout "$(left 120)" python3 -m pytest -q -m gpu tests/kernels/test_flash.py \
  tests/runtime/test_prefill_chunk.py tests/kernels/test_scoring.py 2>&1 | tail -4
timeout "$(left 90)" python3 bench/prefill_attention.py --out "$O" 2>&1 | tail -12
timeout "$(left 60)" python3 bench/score_speed.py --out "$O" 2>&1 | tail -40
timeout "$(left 200)" python3 bench/prefill_speed.py --lengths 8k,30k --chunks 16384,auto --methods dense,exact \
  --repeats 3 --out "$O" 2>&1 | grep -v Warning | tail -12
TOTAL=$(left 600) bash bench/gpu_bisect.sh s22 HEAD
(cd "$O" && tar czf s26a.tgz ./*.json ./*.md ./*.tgz 2>/dev/null; find . -maxdepth 1 -type f ! -name s26a.tgz -delete)
