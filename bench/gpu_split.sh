#!/usr/bin/env bash
# Two decode benchmarks side by side on a 2-GPU machine, one per GPU, each in its own
# process (bench/decode.py), logs and JSON to $OUT. Usage (GPU machine, repo root):
#   A="--contexts 32k,128k --methods dense,hip:keys_on=host" \
#   B="--contexts 1m --methods hip:keys_on=host --host-memory 200GiB" bash bench/gpu_split.sh
# Each side: preset llama3-8b unless its arguments name --presets; PRE_A: a command run on
# GPU 0 first (e.g. the GPU tests), POST_A one run after A. T: seconds each side may run.
set -u
O=${OUT:-bench/results}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
side() {  # gpu tag args...
  local gpu=$1 tag=$2
  shift 2
  CUDA_VISIBLE_DEVICES=$gpu timeout "${T:-540}" python3 bench/decode.py --tag "$tag" --out "$O" "$@" \
    >"$O/$tag.log" 2>&1
  echo "[$tag] exit $?"
}
(
  if [ -n "${PRE_A:-}" ]; then CUDA_VISIBLE_DEVICES=0 bash -c "$PRE_A" >"$O/pre.log" 2>&1; tail -3 "$O/pre.log"; fi
  [ -n "${A:-}" ] && side 0 "${TAG_A:-gpu0}" $A
  if [ -n "${POST_A:-}" ]; then CUDA_VISIBLE_DEVICES=0 bash -c "$POST_A" >"$O/post.log" 2>&1; fi
) &
[ -n "${B:-}" ] && side 1 "${TAG_B:-gpu1}" $B &
wait
for f in "$O"/*.log; do echo "== $f"; grep -v '^{' "$f" | tail -25; done
