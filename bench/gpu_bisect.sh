#!/usr/bin/env bash
# One device call: the same decode row on each snapshot under .bisect/ (bench/bisect_snapshots.sh)
# and on the working tree, one process each, in the order given and then reversed, to find the
# commit range where a step got slower. Default row: Llama-3-8B shape, 128K, hip keys_on=host,
# bf16 weights and tier, 16 steps.
# Usage (GPU machine, repo root):  TOTAL=420 bash bench/gpu_bisect.sh [NAME ...]   (default: every snapshot, then HEAD)
set -u
DEFAULT_TOTAL=420 . bench/gpu_budget.sh
ROW=${ROW:---presets llama3-8b --contexts 128k --methods hip:keys_on=host --steps 16 --host-memory 100GiB}
names=("$@"); [ ${#names[@]} -eq 0 ] && names=($(ls .bisect 2>/dev/null) HEAD)
rev=(); for ((i=${#names[@]}-1; i>=0; i--)); do rev+=("${names[i]}"); done
for name in "${names[@]}" "${rev[@]}"; do
  [ "$(left 70)" -lt 50 ] && { echo "$name: no time left"; continue; }
  dir=$PWD; [ "$name" = HEAD ] || dir=$PWD/.bisect/$name
  ( cd "$dir" && PYTHONPATH=$dir:${PYTHONPATH#.:} timeout "$(left 70)" python3 bench/decode.py $ROW \
      --tag "bisect-$name" --out "$O" 2>&1 | grep "^| llama\|^| qwen" | sed "s/^/$name /" )
done
(cd "$O" && tar czf bisect.tgz ./*.json ./*.md 2>/dev/null && find . -maxdepth 1 -type f ! -name bisect.tgz -delete)
