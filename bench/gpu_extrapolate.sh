#!/usr/bin/env bash
# One GPU call: SmolLM2 pass key / single needle past the trained 8K with remapped positions
# (exact+x: the extrapolate defaults, budget 1024, sink 64, window 512), dense beside it.
# Many `kvloft eval` processes side by side (the 135M model leaves the GPUs mostly idle),
# one seed each, spread over the GPUs; each streams its runs to a .runs.jsonl as they finish,
# so one stopped by its time limit keeps its work; the table is rebuilt from all of them.
# Usage (GPU machine, repo root): bash bench/gpu_extrapolate.sh GGUF_PATH [SECONDS] [GPUS]
# Leaves quality_x.md and quality_x.tar.gz (every file) under $OUT.
O=/tmp/quality_x
. bench/eval_procs.sh "$@"
x() { ev "$@" --budget 1024 --sink 64 --window 512; }  # every cell: budget 1024, sink 64, window 512
# DTYPE: the model's dtype (default float32: SmolLM2 in bf16 misses pass keys even at 4K/8K dense)
D=${DTYPE:-float32}
for s in 0 1 2 3 4; do x "p64-s$s" --dtype "$D" --tasks passkey --lengths 64k --methods exact+x --samples 3 --seed "$s"; done
x n64 --dtype "$D" --tasks niah_single_number --lengths 64k --methods exact+x --samples 3 --seed 0
x d64 --dtype "$D" --tasks passkey,niah_single_number --lengths 64k --methods dense --samples 3 --seed 0
# dense at the trained length on the same seeds (the model's own accuracy), in the same dtype and in bf16
for dt in "$D" bfloat16; do
  for s in 0 1 2 3 4; do x "ref8k-$dt-s$s" --dtype "$dt" --tasks passkey --lengths 8k --methods dense --samples 3 --seed "$s"; done
done
wait
tail -n 3 "$O"/log_*.txt
python3 -m kvloft.cli eval --from-runs "$O"/quality_p64-*.runs.jsonl "$O"/quality_n64.runs.jsonl "$O"/quality_d64.runs.jsonl \
  --name h200-extrapolation-64k --out "$O/quality_x.json" --doc "$O/quality_x.md" \
  --note "H200 (2-GPU machine, eval processes side by side), $D; +x = remapped positions, SmolLM2 trained at 8K; one process per seed, each cell's n is the samples that finished in ${T} s"
for dt in "$D" bfloat16; do
  python3 -m kvloft.cli eval --from-runs "$O"/quality_ref8k-$dt-*.runs.jsonl --name "h200-dense-8k-$dt" \
    --out "$O/quality_ref8k_$dt.json" --doc "$O/quality_x.md" \
    --note "H200, $dt; dense at the trained length on the seeds of the 64K rows (seeds 0-4, 3 depths each)"
done
cp "$O/quality_x.md" "${OUT:-bench/results}/" 2>/dev/null
tar czf "${OUT:-bench/results}/quality_x.tar.gz" -C "$O" .
