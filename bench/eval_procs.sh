# Sourced by the GPU quality scripts with their arguments and O (work dir) set:
#   O=/tmp/work; . bench/eval_procs.sh "$@"    (arguments: GGUF_PATH [SECONDS] [GPUS])
# Sets G (GGUF path), T (seconds per process, default 480), NG (GPUs, default 1); ev NAME ARGS...
# starts one process on GPU (i mod NG), its JSON, markdown and log under $O. `wait` for them.
set -u
G=${1:?path to the SmolLM2 GGUF}
T=${2:-480}
NG=${3:-1}
mkdir -p "$O"
export PYTHONPATH=.:${PYTHONPATH:-} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=3
i=0
ev() {  # name, then eval arguments
  local name=$1; shift
  CUDA_VISIBLE_DEVICES=$((i % NG)) timeout "$T" python3 -m kvloft.cli eval --model "$G" --device cuda \
    --no-progress --name "$name" --out "$O/quality_$name.json" --doc "$O/quality_$name.md" "$@" \
    > "$O/log_$name.txt" 2>&1 &
  i=$((i + 1))
}
