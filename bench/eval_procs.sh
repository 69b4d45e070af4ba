# Sourced by the GPU quality scripts: background `kvloft eval` processes spread over GPUs.
# Needs G (GGUF path), T (seconds per process), NG (GPUs), O (work dir); ev NAME ARGS... starts
# one process on GPU (i mod NG), its JSON, markdown and log under $O. `wait` for them.
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
