#!/usr/bin/env bash
# One device call: the Qwen2.5-Coder-0.5B suite at budget 2048 with every length at once, as
# three gpu_quality_qwen.sh runs side by side (4K+8K, 16K, 32K), the weight cache filled first
# so the processes load in seconds. Usage: bash bench/gpu_qwen_grid.sh GGUF OUT_DIR SAMPLES SECONDS [extra options]
set -u
G=$1 O=$2 N=$3 S=$4; shift 4
export PYTHONPATH=.:${PYTHONPATH:-}
t0=$(date +%s)
python3 -c "import kvloft,sys; kvloft.load_model(sys.argv[1], device='cuda', dtype='bfloat16')" "$G" 2>&1 | tail -1
echo "cache filled in $(( $(date +%s) - t0 )) s"
common=(--methods dense,exact,tokenselect,recycled,hip,actqkv --budgets 2048
        --tasks passkey,niah_single_number,niah_multikey,vt --samples "$N" --procs 6 "$@")
bash bench/gpu_quality_qwen.sh "$G" "$O" "${common[@]}" --lengths 4k,8k --seconds "$S" --tag a- > "$O.a.log" 2>&1 &
bash bench/gpu_quality_qwen.sh "$G" "$O" "${common[@]}" --lengths 16k --seconds "$S" --tag b- > "$O.b.log" 2>&1 &
bash bench/gpu_quality_qwen.sh "$G" "$O" "${common[@]}" --lengths 32k --seconds "$S" --tag c- > "$O.c.log" 2>&1 &
wait
python3 -m kvloft.eval.report "$O"/quality_*.runs.jsonl --out "$O" --name qwen
tail -n 3 "$O"/log_*.txt | grep -i -E "error|Traceback" | head -20
cat "$O"/status.txt
