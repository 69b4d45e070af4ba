#!/usr/bin/env bash
# One device call: the `kvloft eval` processes listed in a jobs file, all at once, each within a
# time limit, on the Qwen2.5-Coder-0.5B GGUF in bf16 with the model's chat template and 4096-token
# prefill chunks (at CUDA's default of 512, 64K extrapolation prefills took 380 s each with 19
# processes sharing an H100, against 19 s for dense); then
# kvloft.eval.report merges every runs file in OUT_DIR (earlier calls' too). A jobs file holds one
# process a line: NAME followed by `kvloft eval` options (blank lines and # comments skipped), e.g.
#   x64-s0  --methods exact+x --lengths 64k --tasks passkey,niah_single_number --samples 5 --seed 0 --budget 2048
# Usage: bash bench/gpu_qwen_jobs.sh GGUF OUT_DIR JOBS_FILE SECONDS
set -u
G=$1 O=$2 J=$3 S=$4
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
n=$(grep -cvE '^\s*(#|$)' "$J")
export OMP_NUM_THREADS=$(( $(nproc) / n > 0 ? $(nproc) / n : 1 ))
python3 -c "import kvloft,sys; kvloft.load_model(sys.argv[1], device='cuda', dtype='bfloat16')" "$G" 2>&1 | tail -1
# the loop reads the jobs from a redirection, not a pipe: a piped loop runs in a subshell, whose
# background processes this shell's `wait` would not wait for
while read -r name args; do
  ( timeout "$S" python3 -m kvloft.cli eval --model "$G" --device cuda --dtype bfloat16 --chat --no-progress \
      --sink 64 --window 512 --prefill-chunk 4096 $args --name "$name" --out "$O" > "$O/log_$name.txt" 2>&1
    echo "$name: exit $?" >> "$O/status.txt" ) &
done < <(grep -vE '^\s*(#|$)' "$J")
wait
cat "$O/status.txt"
python3 -m kvloft.eval.report "$O"/quality_*.runs.jsonl --out "$O" --name qwen
grep -l -E "Traceback" "$O"/log_*.txt | head
# one archive: a device call brings back only a few files
[ -n "${OUT:-}" ] && (cd "$O" && for f in log_*.txt; do tail -c 2000 "$f" > "$f.tail"; done &&
  tar czf "$OUT/qwen_runs.tgz" ./*.runs.jsonl ./quality_qwen.* ./log_*.txt.tail ./status.txt 2>/dev/null)
true
