#!/usr/bin/env bash
# RULER-style task quality of Qwen2.5-Coder-0.5B-Instruct (trained at 32K) under every retrieval
# method, on one GPU: several `kvloft eval` processes at once (the 0.5B model leaves the GPU
# mostly idle), each a share of the (method, budget) pairs over the same seeded samples, in bf16,
# prompts in the model's own chat template. Each process streams its runs to a .runs.jsonl as they
# finish, so one stopped by its time limit keeps its work; kvloft.eval.report then merges every
# runs file into one table (accuracy, 95% Wilson interval, keys attended and scanned per step)
# and a plot when matplotlib is installed.
#
# Usage (repo root, GPU machine with 16 cores):
#   bash bench/gpu_quality_qwen.sh GGUF OUT_DIR [options]
# Options (defaults: the full run):
#   --samples N       samples per (task, length) cell                        (20)
#   --methods LIST    comma list; dense runs once, the others at each budget
#                     (dense,exact,attention_graph,tokenselect,recycled,hip,actqkv,faiss)
#   --budgets LIST    host tokens retrieved per step                         (1024,2048)
#   --lengths LIST    prompt lengths                                         (4k,8k,16k,32k)
#   --tasks LIST      (passkey,niah_single_number,niah_multikey,niah_multivalue,vt,cwe)
#   --procs P         processes at once; the 16 cores are shared among them (8)
#   --seconds S       time limit of each process                             (3000)
#   --sink N --window N                                                       (64, 512)
#   --seed N                                                                  (0)
#   --prefill-chunk N tokens per prefill chunk                                 (4096)
#   --tag T           prefix of this call's file names, so calls into one OUT_DIR add up  (a time stamp)
# A reduced run that ends within 8 minutes on an H100/H200 (model load included):
#   bash bench/gpu_quality_qwen.sh GGUF /tmp/q --methods dense,exact,hip --budgets 1024 \
#     --lengths 4k,8k --tasks passkey,niah_multikey --samples 2 --procs 3 --seconds 420
# Leaves under OUT_DIR: quality_<tag>p<i>-b<budget>.runs.jsonl/.json/.md and log_*.txt per
# process, and quality_qwen.{json,md[,png]} merged from every runs file in OUT_DIR (earlier calls'
# too); copies the merged files and a tarball of OUT_DIR to $OUT if set. The full grid (15
# method/budget pairs x 6 tasks x 4 lengths x 20 samples = 7,200 runs) outlasts one 10-minute
# device call: split it by --methods/--lengths over calls with --seconds under the call's limit,
# or start it detached (setsid) and collect OUT_DIR later.
# Calls with the same --seed draw the same samples: give each (method, budget, length) to one
# call, or add samples to a cell with another --seed (the report pools seeds).
set -u
G=${1:?usage: bash bench/gpu_quality_qwen.sh GGUF OUT_DIR [options]}
O=${2:?usage: bash bench/gpu_quality_qwen.sh GGUF OUT_DIR [options]}
shift 2
SAMPLES=20
METHODS=dense,exact,attention_graph,tokenselect,recycled,hip,actqkv,faiss
BUDGETS=1024,2048
LENGTHS=4k,8k,16k,32k
TASKS=passkey,niah_single_number,niah_multikey,niah_multivalue,vt,cwe
PROCS=8
SECONDS_EACH=3000
SINK=64
WINDOW=512
SEED=0
CHUNK=4096
TAG=$(date +%H%M%S)-
DEVICE=${KVLOFT_EVAL_DEVICE:-cuda}  # KVLOFT_EVAL_DEVICE=cpu KVLOFT_EVAL_DTYPE=float32: a smoke test
DTYPE=${KVLOFT_EVAL_DTYPE:-bfloat16}
while [ $# -gt 0 ]; do
  case $1 in
    --samples) SAMPLES=$2 ;; --methods) METHODS=$2 ;; --budgets) BUDGETS=$2 ;;
    --lengths) LENGTHS=$2 ;; --tasks) TASKS=$2 ;; --procs) PROCS=$2 ;; --seconds) SECONDS_EACH=$2 ;;
    --sink) SINK=$2 ;; --window) WINDOW=$2 ;; --seed) SEED=$2 ;; --tag) TAG=$2 ;; --prefill-chunk) CHUNK=$2 ;;
    *) echo "unknown option $1 (see the head of $0)" >&2; exit 2 ;;
  esac
  shift 2
done
[ -f "$G" ] || { echo "no GGUF at $G" >&2; exit 2; }
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=$(( $(nproc) / PROCS > 0 ? $(nproc) / PROCS : 1 ))

# (budget, method) pairs, dense once; dealt round-robin to PROCS groups, one `kvloft eval` per
# (group, budget) so a process loads the model once per budget it serves
IFS=, read -ra methods <<< "$METHODS"
IFS=, read -ra budgets <<< "$BUDGETS"
pairs=()
for m in "${methods[@]}"; do
  if [ "$m" = dense ]; then pairs+=("${budgets[0]}:dense"); continue; fi
  for b in "${budgets[@]}"; do pairs+=("$b:$m"); done
done
declare -A group
for i in "${!pairs[@]}"; do
  p=$(( i % PROCS )); b=${pairs[$i]%%:*}; m=${pairs[$i]#*:}
  key="$p:$b"; group[$key]="${group[$key]:+${group[$key]},}$m"
done

run_group() {  # proc index: its evals one after another, within SECONDS_EACH together
  local p=$1 end=$(( $(date +%s) + SECONDS_EACH )) key b left name
  for key in "${!group[@]}"; do
    [ "${key%%:*}" = "$p" ] || continue
    b=${key#*:}; name="${TAG}p$p-b$b"; left=$(( end - $(date +%s) ))
    [ "$left" -gt 10 ] || break
    timeout "$left" python3 -m kvloft.cli eval --model "$G" --device "$DEVICE" --dtype "$DTYPE" --chat \
      --no-progress --tasks "$TASKS" --lengths "$LENGTHS" --methods "${group[$key]}" --budget "$b" \
      --samples "$SAMPLES" --seed "$SEED" --sink "$SINK" --window "$WINDOW" --prefill-chunk "$CHUNK" --name "$name" --out "$O" \
      > "$O/log_$name.txt" 2>&1
    echo "$name (${group[$key]} @ $b): exit $?" >> "$O/status.txt"
  done
}
echo "$(( ${#pairs[@]} )) (method, budget) pairs over $PROCS processes, $OMP_NUM_THREADS threads each" >&2
for p in $(seq 0 $(( PROCS - 1 ))); do run_group "$p" & done
wait
cat "$O/status.txt" >&2
python3 -m kvloft.eval.report "$O"/quality_*.runs.jsonl --out "$O" --name qwen
if [ -n "${OUT:-}" ]; then
  cp "$O"/quality_qwen.* "$OUT"/ 2>/dev/null
  tar czf "$OUT/quality_qwen.tar.gz" -C "$O" .
fi
