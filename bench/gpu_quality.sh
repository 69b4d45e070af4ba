#!/usr/bin/env bash
# One GPU call: SmolLM2 task quality of every method at 4K/8K and length extrapolation past
# the trained 8K, dense beside it. Independent `kvloft eval` processes share the GPU (the
# 135M model leaves it mostly idle); each streams its runs to a .runs.jsonl as they finish,
# so one stopped by its time limit keeps its work; the tables are rebuilt from all of them.
# Usage (on the GPU machine, repo root): bash bench/gpu_quality.sh GGUF_PATH [SECONDS] [GPUS]
# GPUS: how many GPUs to spread the processes over (default 1).
# Works in /tmp/quality; leaves quality_h200.md and quality.tar.gz (every file) under $OUT.
O=/tmp/quality
. bench/eval_procs.sh "$@"
# x-*: length extrapolation, dense vs remapped positions (+x), trained length 8K;
# m-*: every method at 4K and 8K, budget 1024 (the same samples for every method)
ev x-passkey --tasks passkey --lengths 16k,32k,64k --methods dense,exact+x --budget 1024 --samples 3
ev m-single --tasks passkey,niah_single_number --lengths 4k,8k \
  --methods dense,exact,tokenselect,recycled,hip,actqkv --budget 1024 --samples 2
ev x-niah --tasks niah_single_number --lengths 16k,32k,64k --methods dense,exact+x --budget 1024 --samples 2
ev m-multi --tasks niah_multikey,vt --lengths 4k,8k \
  --methods dense,exact,tokenselect,recycled,hip,actqkv --budget 1024 --samples 2
ev x-passkey-more --tasks passkey --lengths 64k --methods exact+x --budget 1024 --samples 3 --seed 1
ev m-graph --tasks passkey,niah_single_number,niah_multikey,vt --lengths 4k,8k --methods attention_graph \
  --budget 1024 --samples 1
wait
tail -n 2 "$O"/log_*.txt
# the tables, rebuilt from whatever each process finished
python3 -m kvloft.cli eval --from-runs "$O"/quality_x-*.runs.jsonl --name h200-extrapolation \
  --out "$O/quality_h200_extrapolation.json" --doc "$O/quality_h200.md" \
  --note "H200; +x = remapped positions (SmolLM2 trained at 8K); each cell's n is the samples that finished"
python3 -m kvloft.cli eval --from-runs "$O"/quality_m-*.runs.jsonl --name h200-4k-8k \
  --out "$O/quality_h200_4k8k.json" --doc "$O/quality_h200.md" \
  --note "H200, bf16, Triton kernels; each cell's n is the samples that finished"
cp "$O/quality_h200.md" "${OUT:-bench/results}/" 2>/dev/null
tar czf "${OUT:-bench/results}/quality.tar.gz" -C "$O" .
